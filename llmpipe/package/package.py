"""The `package` stage: the quantized chat model, its exports and its model card, registered in MLflow.

    [quantized] models/quantized/<package.variant>, [hf] models/export/hf, [gguf] models/export/gguf,
    [tokenizer] models/tokenizer, [eval] data/eval, [eval_metrics] metrics/evaluate.json,
    [quantize_metrics] metrics/quantize.json
        ─▶ [package] models/package/README.md       the model card, rendered from the stages' metrics
                     models/package/registered.json  {name, version, created, model_uri, content_sha256}

One MLflow logged model (a pyfunc: `llmpipe.serve.pyfunc`, loading with load_model and generating with
the engine) carries the checkpoint, the tokenizer, the Hugging Face export, the GGUF files and the card;
it becomes a new version of `package.registered_model`, tagged with the lineage (the DVC hashes of
the corpus, tokenizer and every checkpoint, the git commit), the eval metrics and the quantization.
The same content (weights, tokenizer, exports) registered again is the version it already is: nothing
is logged twice. Promotion is not this stage's business: `llmpipe promote` (flows/promote.py) moves
the `production` alias through the gate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.errors import UserError
from llmpipe.io import hash_tree, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

REGISTERED_FILE, CARD_FILE = "registered.json", "README.md"


class PackageConfig(StageConfig):
    """The `package` section of params.yaml."""

    registered_model: str = Field("llmpipe-chat", min_length=1, description="the MLflow registered model's name")
    variant: Literal["int8", "int4"] = Field("int8", description="the quantized checkpoint the pyfunc model serves")


def run(cfg: PackageConfig, ctx: StageContext) -> dict[str, float]:
    from llmpipe.package.card import render_card
    from llmpipe.package.quant import read_quantization

    checkpoint = ctx.input("quantized") / cfg.variant
    if not checkpoint.exists():
        raise UserError(f"{checkpoint} does not exist: add {cfg.variant} to quantize.variants (params.yaml) and rerun "
                        f"the quantize stage, or set package.variant to one it writes")
    _, quantization = read_quantization(checkpoint)
    stage = _model_stage(quantization["source"])
    out = ctx.output("package")
    out.mkdir(parents=True, exist_ok=True)
    card = out / CARD_FILE
    write_text_atomic(card, render_card(ctx.root, stage, cfg.registered_model))
    ctx.tracker.log_artifact(card, "package")
    content = content_sha256(checkpoint, ctx.input("tokenizer"), ctx.input("hf"), ctx.input("gguf"))
    if ctx.tracker.run_id is None:
        ctx.log.warning("package: tracking is off (LLMPIPE_TRACKING=off), so nothing is registered; the card is in %s",
                        card.relative_to(ctx.root))
        write_json_atomic(out / REGISTERED_FILE, {"name": cfg.registered_model, "version": None,
                                                  "content_sha256": content})
        return {"package/registered": 0.0}
    registered = _register(cfg, ctx, checkpoint, card, stage, quantization, content)
    write_json_atomic(out / REGISTERED_FILE, registered)
    ctx.log.info("package: %s version %s (%s)", cfg.registered_model, registered["version"],
                 "new" if registered["created"] else "the same content as before: no new version")
    return {"package/version": float(registered["version"]), "package/created": float(registered["created"])}


def _model_stage(source: str) -> str:
    """The training stage a quantized checkpoint came from: models/<stage>/final -> <stage>."""
    parts = Path(source).parts
    if len(parts) < 2 or parts[0] != "models":
        raise UserError(f"quantization.json names its source {source!r}, not a stage's model under models/: rerun the "
                        f"quantize stage")
    return parts[1]


def content_sha256(*paths: Path) -> str:
    """One hash of what users get (weights, tokenizer, exports): what makes two packages the same."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + bytes.fromhex(hash_tree(path)))
    return digest.hexdigest()


def lineage(root: Path) -> dict[str, str]:
    """{"lineage.<path>": DVC md5} of every stage output before this one (corpus, tokenizer, each
    checkpoint, the exports), from dvc.lock."""
    from llmpipe.stages import STAGES

    lock_file = root / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text()) if lock_file.exists() else {}
    known = {o["path"]: o.get("md5", "") for entry in (lock or {}).get("stages", {}).values()
             for o in entry.get("outs") or []}
    paths = [path for name, spec in STAGES.items() if name != "package" for path in spec.outputs.values()]
    return {f"lineage.{path}": known[path] for path in paths if known.get(path)}


def packaged_metrics(root: Path, stage: str, variant: str) -> dict[str, float]:
    """The numbers the gate and the registry show: the packaged model's eval metrics, the contamination
    of each task and the served variant's quantization measurements."""
    metrics: dict[str, float] = {}
    for name, prefixes in (("evaluate", (f"eval/{stage}/", "decontamination/")), ("quantize", (f"quantize/{variant}/",))):
        path = root / "metrics" / f"{name}.json"  # the stage's eval_metrics / quantize_metrics inputs
        if path.exists():
            values = json.loads(path.read_text())
            metrics.update({k: float(v) for k, v in values.items() if k.startswith(prefixes)})
    return metrics


def _register(cfg: PackageConfig, ctx: StageContext, checkpoint: Path, card: Path, stage: str, quantization: dict,
              content: str) -> dict:
    from llmpipe.package.registry import find_version, register
    from llmpipe.serve.pyfunc import log_packaged_model
    from llmpipe.tracking import configure_mlflow, git_commit

    mlflow = configure_mlflow(ctx.root)
    client = mlflow.MlflowClient()
    existing = find_version(client, cfg.registered_model, content)
    if existing is not None:  # the same package: nothing to log again
        return {"name": cfg.registered_model, "version": existing, "created": False,
                "model_uri": f"models:/{cfg.registered_model}/{existing}", "content_sha256": content}
    gguf = {f"gguf-{p.stem}": p for p in sorted(ctx.input("gguf").glob("*.gguf"))}
    info = log_packaged_model(checkpoint, ctx.input("tokenizer"), {"hf": ctx.input("hf"), "card": card, **gguf})
    tags = {**lineage(ctx.root), "git_commit": git_commit(ctx.root), "model_stage": stage,
            "quantization.variant": quantization["variant"], "quantization.bits": str(quantization.get("bits", ""))}
    metrics = packaged_metrics(ctx.root, stage, cfg.variant)
    version, created = register(client, info.model_uri, cfg.registered_model, content, metrics, tags)
    return {"name": cfg.registered_model, "version": version, "created": created, "model_uri": info.model_uri,
            "content_sha256": content}
