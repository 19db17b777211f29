"""The `pretrain` stage: data/tokens + models/tokenizer -> models/pretrain (and the optional
`pretrain_draft` stage, the same code with a smaller model -> models/pretrain_draft).

The one module of llmpipe.train that imports more than torch, numpy and the standard library at
module level (pydantic, with llmpipe's config and stage registry); what runs on each rank is in
pretrain_worker.py. The stage resolves params.yaml into a plain JSON file
(`models/pretrain/resolved_config.json`) and trains in this process, or, with nproc_per_node > 1,
launches `torchrun ... -m llmpipe.train.pretrain_worker --config <that file>` and forwards rank 0's
metrics log to the tracker while it runs. Rerunning after a crash resumes from the newest checkpoint
(models/pretrain is `persist: true` in dvc.yaml); a rerun with other settings or code is refused.

Several nodes: `python -m llmpipe.train.pretrain` writes the resolved config and prints its path;
start on every node (from the project root, same paths everywhere)

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=<node0>:29500 \
        --rdzv-id=pretrain -m llmpipe.train.pretrain_worker --config models/pretrain/resolved_config.json

then `llmpipe stage pretrain` on node 0 finds the finished checkpoint, evaluates it and records the
outputs (plots, metrics, MLflow) without training again.

Outputs: models/pretrain/{checkpoints/step-XXXXXX, final, metrics.jsonl, samples.jsonl, samples.txt},
plots/pretrain_loss.csv (step, train_loss, val_loss, lr). Paths come from the stage registry
(llmpipe/stages.py); the resolved config carries them as plain paths for the torch-only worker.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llmpipe.errors import UserError
from llmpipe.io import read_json, write_json_atomic, write_text_atomic
from llmpipe.model import ModelConfig
from llmpipe.stages import StageContext, code_deps
from llmpipe.train import checkpoint as ckpt
from llmpipe.train.launch import MetricsForwarder, launch_torchrun, system_metrics
from llmpipe.train.settings import TrainSettings
from llmpipe.train.pretrain_worker import train

STAGE = "pretrain"
WORKER = "llmpipe.train.pretrain_worker"  # what torchrun runs on every rank
RESOLVED_CONFIG = "resolved_config.json"  # in the model output: the settings the checkpoints were trained with


class PretrainConfig(TrainSettings):
    """The `pretrain` section of params.yaml: the model's size, then the training settings."""

    # model: a preset, optionally with some of its sizes overridden
    preset: Literal["tiny", "draft", "gpt2-124m", "350m", "1b"] = Field("tiny", description="model size preset")
    n_layer: int | None = Field(None, ge=1, description="override the preset's depth")
    d_model: int | None = Field(None, ge=64, description="override the preset's width (heads follow at 64 wide)")
    n_head: int | None = Field(None, ge=1)
    n_kv_head: int | None = Field(None, ge=1)
    mlp_hidden: int | None = Field(None, ge=1)
    qk_norm: bool | None = None
    mlp: Literal["swiglu", "relu2"] | None = Field(None, description="swiglu (Llama; exports) | relu2 (no HF/GGUF export)")
    logit_softcap: float | None = Field(None, gt=0, description="logits = c tanh(logits / c); null: off (no HF/GGUF export)")
    zero_init_proj: bool | None = Field(None, description="wo and w_down start at zero")
    tie_embeddings: bool | None = Field(None, description="lm_head shares the token embedding (the presets: true)")
    attn_backend: Literal["auto", "flash_attn", "sdpa", "math"] = "auto"
    sample_prompt: str = Field("ROMEO:", description="the text each eval's sample continues")


class DraftConfig(PretrainConfig):
    """The `pretrain_draft` section: the same training on the same tokens, a smaller model by default.

    A draft pays when one forward of it costs a small fraction of the target's and it predicts the
    target's next token often (docs/benchmarks.md has the measured ratios). The defaults (1 x 256) are
    the size that measured best as the draft of the `tiny` CPU model, where it still does not pay (0.85x
    plain decoding): the stage is off by default; with a GPU target use the `draft` preset."""

    enabled: bool = Field(False, description="true adds the stage to dvc.yaml (then: llmpipe init --update .)")
    n_layer: int | None = Field(1, ge=1, description="override the preset's depth")
    d_model: int | None = Field(256, ge=64, description="override the preset's width (heads follow at 64 wide)")


def resolve_config(cfg: PretrainConfig, ctx: StageContext) -> dict[str, Any]:
    """params.yaml's section -> the plain JSON the worker reads (no pydantic there)."""
    tokens, tokenizer = ctx.input("tokens"), ctx.input("tokenizer")
    meta = _token_meta(tokens / "train", tokenizer)
    model = model_config(cfg, meta["vocab_size"])
    train_settings = cfg.train_settings()
    return {"root": str(ctx.root.resolve()), "train_dir": _relative(ctx, tokens / "train"),
            "val_dir": _relative(ctx, tokens / "val"), "tokenizer_dir": _relative(ctx, tokenizer),
            "out_dir": _relative(ctx, ctx.output("model")), "device": cfg.device, "model": model.to_dict(),
            "train": train_settings, "sample_prompt": cfg.sample_prompt, "code": ctx.code_fingerprint}


# the section's keys that override a field of the preset's ModelConfig (None keeps the preset's)
MODEL_OVERRIDES = ("n_layer", "d_model", "n_head", "n_kv_head", "mlp_hidden", "qk_norm", "mlp", "logit_softcap",
                   "zero_init_proj", "tie_embeddings")


def model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    """The model the section describes: its preset, its overrides, a context of seq_len."""
    sizes = {k: getattr(cfg, k) for k in MODEL_OVERRIDES}
    return ModelConfig.from_preset(cfg.preset, vocab_size, max_seq_len=cfg.seq_len, attn_backend=cfg.attn_backend,
                                   **sizes)


def _token_meta(train_dir: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """The train split's meta.json, after checking it was encoded by the tokenizer in `tokenizer_dir`."""
    meta_path = train_dir / "meta.json"
    if not meta_path.exists():
        raise UserError(f"{meta_path} not found: run the tokenizer stage first")
    meta = read_json(meta_path)
    tok_file = tokenizer_dir / "tokenizer.json"  # the tokenizer stage's description of its model
    if not tok_file.exists() or read_json(tok_file).get("hash") != meta["tokenizer_hash"]:
        raise UserError(f"{tok_file} is missing or disagrees with {meta_path} on the tokenizer hash: "
                        f"rerun the tokenizer stage")
    return meta


def _relative(ctx: StageContext, path: Path) -> str:
    return path.relative_to(ctx.root).as_posix()


# Settings a rerun may change and still continue the same run from its newest checkpoint: more steps,
# another process count (the data order does not depend on it), and how often to evaluate/save/log.
CONTINUABLE = {"max_steps", "eval_every", "eval_batches", "checkpoint_every", "keep_last", "log_every", "compile",
               "distributed", "sample_tokens", "sample_temperature", "sample_top_k"}


def check_continuation(ctx: StageContext, resolved: dict[str, Any]) -> None:
    """Refuse to resume checkpoints that another training setup or other code produced.

    DVC reruns this stage when any pretrain param or code dep changes; the persisted checkpoints then
    belong to the old setup, and continuing them would record a model the new params and code never
    trained. (The model shape, tokenizer and data are checked again by the trainer, on every rank's
    behalf, when it loads a checkpoint.)"""
    out = ctx.output("model")
    previous = out / RESOLVED_CONFIG
    if not previous.exists() or ckpt.latest_checkpoint(out / "checkpoints") is None:
        return
    old = read_json(previous)
    diffs = (_settings_diffs(ctx.name, old["train"], resolved["train"])
             + _code_diffs(ctx, old.get("code"), resolved["code"]))
    if diffs:
        raise UserError(f"{out / 'checkpoints'} holds a run trained with other settings or code:\n  "
                        + "\n  ".join(diffs) + f"\nRestore them to continue it, or delete {out} to train "
                        f"from scratch.")


def _settings_diffs(section: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{section}.{k}: checkpoints {old.get(k)!r} != params.yaml {new.get(k)!r}"
            for k in sorted(set(old) | set(new)) if k not in CONTINUABLE and old.get(k) != new.get(k)]


def _code_diffs(ctx: StageContext, old: str | None, new: str) -> list[str]:
    if old == new:
        return []
    deps = ", ".join(code_deps(ctx.root, ctx.name))
    then = "not recorded (saved by an older llmpipe)" if old is None else repr(old)
    return [f"code ({deps}, the {ctx.name} code deps in dvc.yaml): checkpoints {then} != now {new!r}"]


def write_resolved_config(cfg: PretrainConfig, ctx: StageContext) -> tuple[Path, dict[str, Any]]:
    """Resolve, refuse a continuation of other settings or code, then write the worker's config file."""
    resolved = resolve_config(cfg, ctx)
    check_continuation(ctx, resolved)
    config_file = ctx.output("model") / RESOLVED_CONFIG
    write_json_atomic(config_file, resolved)
    return config_file, resolved


def run(cfg: PretrainConfig, ctx: StageContext) -> dict[str, float]:
    if isinstance(cfg, DraftConfig) and not cfg.enabled:
        raise UserError(f"{ctx.name} is off: set {ctx.name}.enabled: true in params.yaml, then "
                        f"`llmpipe init --update .` adds it to dvc.yaml")
    config_file, resolved = write_resolved_config(cfg, ctx)
    log_resolved(ctx, cfg, resolved)
    with system_metrics(ctx.tracker):
        if cfg.nproc_per_node > 1:
            metrics = train_under_torchrun(cfg, ctx, config_file)
        else:
            metrics = train(resolved, ctx.tracker)
    publish_outputs(cfg, ctx, config_file)
    return {k: float(v) for k, v in metrics.items()}


def log_resolved(ctx: StageContext, cfg: PretrainConfig, resolved: dict[str, Any]) -> None:
    """What params.yaml's preset and overrides came to: the model's sizes, steps and parameter count."""
    model = ModelConfig.from_dict(resolved["model"])
    ctx.tracker.log_params({f"resolved.model.{k}": v for k, v in resolved["model"].items()}
                           | {"resolved.max_steps": cfg.steps, "resolved.params": model.num_params()})


def train_under_torchrun(cfg: PretrainConfig, ctx: StageContext, config_file: Path) -> dict[str, float]:
    """Train with nproc_per_node processes on this node; rank 0's metrics reach the tracker as they are logged."""
    out = ctx.output("model")
    forwarder = MetricsForwarder(out / "metrics.jsonl", ctx.tracker, resume_step(out / "checkpoints"))
    return launch_torchrun(WORKER, config_file, cfg.nproc_per_node, cwd=ctx.root, poll=forwarder)


def resume_step(checkpoints: Path) -> int:
    """The step the worker will resume from: that of the newest intact checkpoint, else 0."""
    latest = ckpt.newest_intact_checkpoint(checkpoints)
    return ckpt.read_meta(latest)["step"] if latest else 0


def publish_outputs(cfg: PretrainConfig, ctx: StageContext, config_file: Path) -> None:
    """The loss plot and the samples from the logs; samples, settings and (log_model) weights to the tracker."""
    out = ctx.output("model")
    [plot] = ctx.spec.plots  # the one plot the registry declares for this stage
    write_text_atomic(ctx.path(plot), loss_csv(out / "metrics.jsonl"))
    samples = out / "samples.txt"
    write_text_atomic(samples, samples_text(out / "samples.jsonl"))
    ctx.tracker.log_artifact(samples)
    ctx.tracker.log_artifact(config_file)
    if cfg.log_model:
        ctx.tracker.log_artifact(out / "final", artifact_path="final")


def loss_csv(metrics_log: Path) -> str:
    """metrics.jsonl -> step,train_loss,val_loss,lr (val_loss empty between evals)."""
    rows: dict[int, dict[str, Any]] = {}
    if metrics_log.exists():
        for line in metrics_log.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            row = rows.setdefault(record["step"], {"step": record["step"]})
            for key, name in (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("train/lr", "lr")):
                if key in record:
                    row[name] = record[key]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "train_loss", "val_loss", "lr"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[s] for s in sorted(rows))
    return buf.getvalue()


def samples_text(samples_log: Path) -> str:
    if not samples_log.exists():
        return ""
    records = [json.loads(line) for line in samples_log.read_text(encoding="utf-8").splitlines()]
    return "".join(f"=== step {r['step']} ===\n{r['text']}\n\n" for r in records)


if __name__ == "__main__":  # multi-node: write the config every node's torchrun reads, print its path
    from llmpipe.config import load_stage_config
    from llmpipe.io import project_root

    root = project_root()
    stage_ctx = StageContext(root=root, name=STAGE)
    print(write_resolved_config(load_stage_config(PretrainConfig, STAGE, root / "params.yaml"), stage_ctx)[0])
