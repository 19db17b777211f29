"""The model card: the package's README.md, rendered from the project's own records.

Every number comes from a file a stage wrote: the packaged checkpoint's model_config.json and
checkpoint.json, dvc.lock (the hashes of the corpus, tokenizer and each checkpoint), params.yaml,
metrics/<stage>.json, metrics/evaluate.json (`eval/<model>/<task>/<metric>`, `decontamination/<task>/
fraction`) and metrics/quantize.json (`quantize/<variant>/<measure>`), plus the git commit. What no
file records shows as "not measured": a card never carries a number typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from llmpipe.errors import UserError
from llmpipe.model import ModelConfig
from llmpipe.tracking import git_commit

NOT_MEASURED = "not measured"
# What the model was built from, in pipeline order: each path's hash in dvc.lock is its lineage.
LINEAGE = {"data/dedup": "corpus (deduplicated text)", "models/tokenizer": "tokenizer",
           "data/tokens": "tokenized corpus", "data/chat": "chat and preference data",
           "models/pretrain": "pretrained checkpoint", "models/sft": "SFT checkpoint",
           "models/dpo": "DPO checkpoint"}
TRAINING_STAGES = ("tokenizer", "pretrain", "sft", "dpo")
EVAL_MODELS = {"pretrain": "base", "sft": "SFT", "dpo": "DPO"}
QUANT_MEASURES = ("size_bytes", "size_ratio", "bpb", "bpb_change", "tokens_per_s", "speed_ratio")
HF_EXPORT = "models/export/hf"
GGUF_EXPORT = "models/export/gguf"


def render_card(root: Path, model_stage: str, registered_name: str) -> str:
    """The README.md of the model packaged from `model_stage`'s final checkpoint."""
    evaluate = _read_json(root / "metrics" / "evaluate.json")
    sections = [
        f"# {registered_name}\n\nA small decoder-only language model trained by llmpipe from raw text "
        f"(stage `{model_stage}`). Every figure below is read from the pipeline's records.",
        _architecture(root, model_stage),
        _lineage(root),
        _params(root),
        _eval_table(evaluate),
        _quant_table(_read_json(root / "metrics" / "quantize.json")),
        _decontamination(evaluate, _params_section(root, "evaluate").get("decontamination") or {}),
        _intended_use(root, model_stage, evaluate),
        _how_to_load(root, registered_name),
    ]
    return "\n\n".join(sections) + "\n"


# -- reading ------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); rerun the stage that writes it (`dvc repro`)") from e


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e}); fix the file or regenerate it (`dvc repro`)") from e


def _params_section(root: Path, name: str) -> dict[str, Any]:
    return _read_yaml(root / "params.yaml").get(name) or {}


def locked_hashes(root: Path) -> dict[str, str]:
    """{path: md5} of every stage output dvc.lock records."""
    lock = _read_yaml(root / "dvc.lock")
    return {out["path"]: out.get("md5") or out.get("hash") or NOT_MEASURED
            for entry in (lock.get("stages") or {}).values() for out in entry.get("outs") or []}


def fmt(value: Any) -> str:
    """A metric for a table: integers whole, other numbers to 4 decimals, absent ones as not measured."""
    if value is None:
        return NOT_MEASURED
    value = float(value)
    return f"{int(value):,}" if value.is_integer() else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# -- sections -----------------------------------------------------------------------------------

def _architecture(root: Path, model_stage: str) -> str:
    final = root / "models" / model_stage / "final"
    raw = _read_json(final / "model_config.json")
    marker = _read_json(final / "checkpoint.json")  # written last: without it the checkpoint is incomplete
    if not raw or not marker:
        return f"## Architecture and size\n\n{NOT_MEASURED}: no complete checkpoint in {final.relative_to(root)}."
    cfg = ModelConfig.from_dict(raw)
    rows = [["parameters", fmt(cfg.num_params())], ["non-embedding parameters", fmt(cfg.num_params(True))],
            ["layers", fmt(cfg.n_layer)], ["model width", fmt(cfg.d_model)],
            ["attention heads (kv heads)", f"{cfg.n_head} ({cfg.n_kv_head or cfg.n_head})"],
            ["MLP hidden", fmt(cfg.mlp_hidden)], ["context length", fmt(cfg.max_seq_len)],
            ["vocabulary", fmt(cfg.vocab_size)], ["tied embeddings", str(cfg.tie_embeddings).lower()],
            ["training steps", fmt(marker.get("step"))], ["tokens seen", fmt(marker.get("tokens_seen"))],
            ["weights (model.safetensors) sha256",
             (marker.get("files") or {}).get("model.safetensors", {}).get("sha256", NOT_MEASURED)]]
    return "## Architecture and size\n\nA GPT-style decoder (RMSNorm, rotary positions, SwiGLU MLP).\n\n" \
        + _table(["", "value"], rows)


def _lineage(root: Path) -> str:
    hashes = locked_hashes(root)
    rows = [[f"`{path}`", what, f"`{hashes[path]}`" if path in hashes else NOT_MEASURED]
            for path, what in LINEAGE.items()]
    rows.append(["git commit", "the code", f"`{git_commit(root)}`"])
    return ("## Training data lineage\n\nThe DVC hashes (dvc.lock) of what the model was built from; "
            "`dvc checkout` at this commit restores exactly these bytes.\n\n" + _table(["path", "what", "md5"], rows))


def _params(root: Path) -> str:
    params = _read_yaml(root / "params.yaml")
    chosen = {name: params[name] for name in TRAINING_STAGES if name in params}
    body = yaml.safe_dump(chosen, sort_keys=False).strip() if chosen else f"# {NOT_MEASURED}: no params.yaml"
    return f"## Params\n\nThe training stages' sections of params.yaml:\n\n```yaml\n{body}\n```"


def eval_rows(evaluate: dict[str, float]) -> dict[tuple[str, str], dict[str, float]]:
    """{(task, metric): {model: value}} from `eval/<model>/<task>/<metric>`; stderr and sizes left out."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in evaluate.items():
        parts = key.split("/")
        if len(parts) != 4 or parts[0] != "eval" or parts[3].endswith("_stderr") or parts[3] == "sample_len":
            continue
        rows.setdefault((parts[2], parts[3]), {})[parts[1]] = value
    return dict(sorted(rows.items()))


def _eval_table(evaluate: dict[str, float]) -> str:
    rows = eval_rows(evaluate)
    if not rows:
        return f"## Evaluation\n\n{NOT_MEASURED}: no eval/ metrics in metrics/evaluate.json."
    body = [[task, metric, *(_with_stderr(evaluate, m, task, metric, values) for m in EVAL_MODELS)]
            for (task, metric), values in rows.items()]
    return ("## Evaluation\n\nlm-evaluation-harness on held-out, decontaminated examples (stderr in brackets).\n\n"
            + _table(["task", "metric", *(f"{label} ({m})" for m, label in EVAL_MODELS.items())], body))


def _with_stderr(evaluate: dict[str, float], model: str, task: str, metric: str, values: dict[str, float]) -> str:
    if model not in values:
        return NOT_MEASURED
    stderr = evaluate.get(f"eval/{model}/{task}/{metric}_stderr")
    return fmt(values[model]) + (f" (±{fmt(stderr)})" if stderr is not None else "")


def _quant_table(quantize: dict[str, float]) -> str:
    variants = sorted({key.split("/")[1] for key in quantize if key.startswith("quantize/") and key.count("/") == 2},
                      key=lambda v: (v != "fp32", v))
    if not variants:
        return f"## Quantization\n\n{NOT_MEASURED}: no quantize/ metrics in metrics/quantize.json."
    rows = [[v, *(fmt(quantize.get(f"quantize/{v}/{m}")) for m in QUANT_MEASURES)] for v in variants]
    return ("## Quantization\n\nWeight-only variants against fp32: size, bits per byte on the held-out text and "
            "decoding speed.\n\n" + _table(["variant", *QUANT_MEASURES], rows))


def _decontamination(evaluate: dict[str, float], settings: dict[str, Any]) -> str:
    rows = [[key.split("/")[1], fmt(value)] for key, value in sorted(evaluate.items())
            if key.startswith("decontamination/") and key.endswith("/fraction")]
    how = (f"An example counts as contaminated when it shares a {settings.get('n', NOT_MEASURED)}-gram with the "
           f"training data (pretraining corpus and chat train split); mode: {settings.get('mode', NOT_MEASURED)}.")
    if not rows:
        return f"## Decontamination\n\n{how}\n\n{NOT_MEASURED}: no decontamination/ metrics in metrics/evaluate.json."
    return f"## Decontamination\n\n{how}\n\n" + _table(["task", "contaminated fraction"], rows)


def _intended_use(root: Path, model_stage: str, evaluate: dict[str, float]) -> str:
    stage_metrics = _read_json(root / "metrics" / f"{model_stage}.json")
    pretrain = _read_json(root / "metrics" / "pretrain.json")
    bpb = evaluate.get(f"eval/{model_stage}/llmpipe_bpb/bits_per_byte")
    return (
        "## Intended use and limitations\n\n"
        "A demonstration of the pipeline (raw text to a promoted, served model), for experiments, teaching and "
        "testing of the tooling around it. It is not meant for any decision or for users who might take its "
        "text as fact.\n\n"
        f"- Size: {fmt(stage_metrics.get('params'))} parameters, pretrained on "
        f"{fmt(pretrain.get('tokens_seen'))} tokens; at this scale it produces text in the style of its corpus, "
        "not reliable facts, instructions or reasoning.\n"
        f"- Held-out bits per byte: {fmt(bpb)}; the corpus is English (the demo: Shakespeare and Milton), "
        "so other languages and modern text score worse.\n"
        "- Chat behaviour comes from small conversation and preference sets; the model has no safety "
        "training beyond the corpus filters (quality, PII replacement, a word-list toxicity filter).\n"
        "- Evaluation tasks are built from held-out splits of the same sources and decontaminated by n-gram "
        "overlap; they say little about other data.")


def _how_to_load(root: Path, registered_name: str) -> str:
    ggufs = sorted(p.name for p in (root / GGUF_EXPORT).glob("*.gguf"))
    gguf = ggufs[-1] if ggufs else "<model>-q8_0.gguf"
    gguf_note = f"files: {', '.join(ggufs)}" if ggufs else f"{NOT_MEASURED}: no GGUF export in {GGUF_EXPORT}"
    uri = f"models:/{registered_name}@production"
    return (
        "## How to load it\n\n"
        f"With llmpipe (from the registry, or `--model <checkpoint dir>`):\n\n```bash\n"
        f"llmpipe chat --model {uri}\nllmpipe generate --model {uri} --prompt \"ROMEO:\"\n"
        f"mlflow models serve -m {uri} --env-manager local   # POST /invocations\n```\n\n"
        f"With transformers, from the Hugging Face export (the `hf` artifact, `{HF_EXPORT}` in the project):\n\n"
        f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained(\"{HF_EXPORT}\")\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{HF_EXPORT}\")\n```\n\n"
        f"With llama.cpp, from the GGUF export (the `gguf` artifact, {gguf_note}):\n\n"
        f"```bash\nllama-cli -m {GGUF_EXPORT}/{gguf} -p \"ROMEO:\" -n 64\n```")
