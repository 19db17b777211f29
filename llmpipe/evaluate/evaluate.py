"""The `evaluate` stage: the pipeline's models through lm-evaluation-harness -> data/eval.

    [tokens] data/tokens (held-out documents), [chat] data/chat (held-out conversations),
    [tokenizer] models/tokenizer, and the model of each stage in `evaluate.models`
        ─▶ [eval] data/eval/tasks/        the local tasks, lm-eval YAML + JSONL (absolute paths)
                  data/eval/results/<model>.json   lm-eval's results, as its CLI writes them
                  data/eval/report.md, scores.png  base vs SFT vs DPO, with stderr
                  data/eval/decontamination.json   contaminated examples per task

Steps: build the local tasks' examples from held-out data (llmpipe/evaluate/tasks.py), drop (or
flag) examples that share a 13-gram with the training data (decontaminate.py), write the tasks,
then `lm_eval.simple_evaluate` each model through the registered `llmpipe` adapter (adapter.py) on
the local tasks plus any standard lm-eval task named in `evaluate.tasks` (they need the hub, or the
user's own task files in `evaluate.include_path`). Metrics: `eval/<model>/<task>/<metric>` in
metrics/evaluate.json (for `dvc metrics diff`) and MLflow, plus requests/s per request type.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.errors import UserError
from llmpipe.evaluate.tasks import LOCAL_TASKS
from llmpipe.io import write_json_atomic
from llmpipe.stages import StageContext



class DecontaminationSection(StageConfig):
    n: int = Field(13, ge=4, description="words per n-gram shared with the training data (GPT-3: 13)")
    mode: Literal["exclude", "flag"] = Field("exclude", description="drop contaminated examples, or keep and count")


class EvaluateConfig(StageConfig):
    """The `evaluate` section of params.yaml."""

    models: list[str] = Field(["pretrain", "sft", "dpo"], min_length=1,
                              description="stages whose model is evaluated (their final checkpoint)")
    tasks: list[str] = Field(list(LOCAL_TASKS), min_length=1,
                             description="local tasks (llmpipe_*) and any lm-eval task by name (hellaswag, ...)")
    include_path: str | None = Field(None, description="a directory of the user's own lm-eval task YAMLs")
    limit: int = Field(100, ge=1, description="examples per local task")
    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    decontamination: DecontaminationSection = Field(default_factory=DecontaminationSection)


def run(cfg: EvaluateConfig, ctx: StageContext) -> dict[str, float]:
    unknown = [m for m in cfg.models if m not in ctx.spec.inputs]
    if unknown:
        raise UserError(f"evaluate.models: {', '.join(unknown)} is not a model this stage reads; choose among "
                        f"{', '.join(r for r in ctx.spec.inputs if r not in ('tokens', 'chat', 'tokenizer'))}")
    out = ctx.output("eval")
    # files are written one by one, atomically: the tasks name their data by absolute path, so they are
    # written where they stay (DVC removes the whole output before a rerun)
    names, contamination = build_local_tasks(cfg, ctx, out / "tasks")
    write_json_atomic(out / "decontamination.json", contamination)
    tasks = [t for t in cfg.tasks if t not in LOCAL_TASKS or t in names]
    metrics, results = {}, {}
    for model in cfg.models:
        results[model], speed = evaluate_model(cfg, ctx, model, tasks, out / "tasks")
        write_json_atomic(out / "results" / f"{model}.json", results[model])
        metrics.update(flat_metrics(model, results[model]))
        metrics.update({f"eval/{model}/{kind}_requests_per_s": rate for kind, rate in speed.items()})
    write_report(out, cfg.models, tasks, results, contamination)
    for artifact in (*(out / "results" / f"{m}.json" for m in cfg.models), out / "report.md", out / "scores.png",
                     out / "decontamination.json"):
        ctx.tracker.log_artifact(artifact, "evaluate")
    metrics.update({f"decontamination/{task}/fraction": c["fraction"] for task, c in contamination.items()})
    return metrics


def build_local_tasks(cfg: EvaluateConfig, ctx: StageContext, task_dir: Path) -> tuple[list[str], dict[str, dict]]:
    """The local tasks' examples from held-out data, decontaminated against the training data, written
    as lm-eval tasks; returns the task names written and the contamination report per task."""
    from llmpipe.evaluate.decontaminate import NgramIndex, decontaminate, training_texts
    from llmpipe.evaluate.heldout import conversations, split_documents
    from llmpipe.evaluate.tasks import build_examples, example_texts, keep_examples, write_tasks
    from llmpipe.tokenizer import Tokenizer
    from llmpipe.train import checkpoint as ckpt

    tok = Tokenizer.load(ctx.input("tokenizer"))
    docs = list(split_documents(ctx.input("tokens") / "val", tok))
    chats = conversations(ctx.input("chat") / "sft" / "val.parquet", tok)
    # a passage of at most context/2 words (about 0.75 of the context in tokens here) fits every model
    context = min(ckpt.read_model_config(ckpt.find_checkpoint(ctx.input(m))).max_seq_len for m in cfg.models)
    max_words = min(120, context // 2)
    examples = build_examples(docs, chats or None, seed=cfg.seed, limit=cfg.limit, max_words=max_words,
                              min_words=min(20, max_words // 2))
    examples = {task: ex for task, ex in examples.items() if task in cfg.tasks}
    index = NgramIndex.build(training_texts(ctx.root, ctx.input("tokens"), ctx.input("chat"), ctx.input("tokenizer")),
                             n=cfg.decontamination.n)
    kept, report = decontaminate(example_texts(examples), index, cfg.decontamination.mode)
    for task, row in report.items():
        ctx.log.info("evaluate: %s: %d of %d examples share a %d-gram with the training data (%s)", task,
                     row["contaminated"], row["docs"], row["n"], "excluded" if row["excluded"] else "kept")
    return write_tasks(task_dir, keep_examples(examples, kept)), report


def evaluate_model(cfg: EvaluateConfig, ctx: StageContext, model: str, tasks: list[str],
                   task_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """lm-eval's results for one model, and its requests per second per request type."""
    ctx.log.info("evaluate: %s on %s", model, ", ".join(tasks))
    include = [ctx.path(cfg.include_path)] if cfg.include_path else []
    return score(ctx.input(model), tasks, task_dir, device=cfg.device, batch_size=cfg.batch_size, seed=cfg.seed,
                 num_fewshot=cfg.num_fewshot, include=include)


def score(pretrained: Path, tasks: list[str], task_dir: Path, *, device: str = "auto", batch_size: int = 16,
          seed: int = 0, num_fewshot: int = 0, include: list[Path] = ()) -> tuple[dict[str, Any], dict[str, float]]:
    """`lm_eval.simple_evaluate` of one model (anything load_model takes) through the `llmpipe` adapter on
    `tasks`: the local tasks written in `task_dir` and any lm-eval task; (results as JSON, requests/s by kind)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from llmpipe.evaluate.adapter import LlmpipeLM

    device = device if device != "auto" else ("cuda" if _cuda() else "cpu")
    lm = LlmpipeLM(pretrained=str(pretrained), device=device, batch_size=batch_size)
    hub = any(t not in LOCAL_TASKS for t in tasks)
    # lm-eval bootstraps some stderrs in a fork Pool, which deadlocked in CI: at Pool.terminate one
    # worker waited for ever on the task queue's lock that its exiting sibling held. In-process instead.
    with _offline(not hub), _env(DISABLE_MULTIPROC="1"):
        manager = TaskManager(include_path=[str(task_dir), *map(str, include)], include_defaults=hub)
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot,
                                          random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
    speed = {kind: s["requests"] / s["seconds"] for kind, s in lm.stats.items() if s["seconds"] > 0}
    return json.loads(json.dumps(results, default=handle_non_serializable)), speed


def flat_metrics(model: str, results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {"results": {task: {"acc,none": x, "acc_stderr,none": s}}} -> {"eval/<model>/<task>/acc": x, ...}."""
    flat = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                suffix = "" if filt in ("", "none") else f"_{filt}"
                flat[f"eval/{model}/{task}/{name}{suffix}"] = float(value)
    return flat


def write_report(out: Path, models: list[str], tasks: list[str], results: dict[str, dict],
                 contamination: dict[str, dict]) -> None:
    """report.md (a table per task: each metric by model, ± stderr) and scores.png (a bar per model and task)."""
    from llmpipe.io import write_text_atomic

    lines = ["# evaluate: " + " vs ".join(models), ""]
    main: dict[str, dict[str, float]] = {}
    for task in tasks:
        rows = _metric_rows(task, models, results)
        if not rows:
            continue
        lines += [f"## {task}", "", "| metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        lines += [f"| {metric} | " + " | ".join(cells) + " |" for metric, cells in rows]
        if task in contamination:
            c = contamination[task]
            lines += ["", f"{c['contaminated']} of {c['docs']} examples share a "
                          f"{c['n']}-gram with the training data; {c['excluded']} excluded."]
        lines.append("")
        main[task] = {m: results[m]["results"][task][_main_metric(results[m]["results"][task])]
                      for m in models if task in results[m].get("results", {})}
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n![scores](scores.png)\n")
    _plot(out / "scores.png", models, main)


def _metric_rows(task: str, models: list[str], results: dict[str, dict]) -> list[tuple[str, list[str]]]:
    keys = sorted({k for m in models for k in results[m].get("results", {}).get(task, {})
                   if "," in k and "_stderr" not in k})
    rows = []
    for key in keys:
        cells = []
        for m in models:
            values = results[m].get("results", {}).get(task, {})
            value, err = values.get(key), values.get(key.replace(",", "_stderr,", 1))
            cells.append("" if not isinstance(value, (int, float)) else
                         f"{value:.4g}" + (f" ± {err:.2g}" if isinstance(err, (int, float)) else ""))
        rows.append((key.split(",")[0], cells))
    return rows


def _main_metric(values: dict[str, Any]) -> str:
    for name in ("acc_norm,none", "acc,none", "bits_per_byte,none"):
        if name in values:
            return name
    return next(k for k, v in values.items() if isinstance(v, (int, float)) and "_stderr" not in k)


def _plot(path: Path, models: list[str], main: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(main)), figsize=(3.2 * max(1, len(main)), 3), squeeze=False)
    for ax, (task, scores) in zip(axes[0], main.items()):
        ax.bar(list(scores), list(scores.values()), color=["#888", "#4a7", "#47a", "#a74"][:len(scores)])
        ax.set_title(task, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """These environment variables set for the block, then as they were."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _offline(on: bool) -> contextlib.AbstractContextManager:
    """HF_DATASETS_OFFLINE=1 while only local tasks run: nothing may reach for the hub."""
    return _env(HF_DATASETS_OFFLINE="1") if on else contextlib.nullcontext()
