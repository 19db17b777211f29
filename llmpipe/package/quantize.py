"""The `quantize` stage: the packaged model, quantized and exported, each variant measured.

    [model] models/<quantize.model>/final (dpo by default), [tokenizer] models/tokenizer,
    [eval] data/eval/tasks (the evaluate stage's local tasks)
        ─▶ [quantized] models/quantized/<variant>/   int8 / int4 weights (torchao), our checkpoint format,
                                                     loadable with load_model; report.md + quantize.png
        ─▶ [hf]        models/export/hf/             a Hugging Face Llama directory (transformers, no custom code)
        ─▶ [gguf]      models/export/gguf/<model>-<type>.gguf   llama.cpp files (f16, q8_0, ...)

Every variant is measured against the unquantized weights in the same run, on the same data:
file size, held-out bits per byte through lm-eval on the evaluate stage's `llmpipe_bpb` task (the
numbers the evaluate stage reports, not a second definition), and greedy tokens/s of the generation
engine. The table is metrics/quantize.json (`quantize/<variant>/<measure>`), report.md and an MLflow
artifact. The targets (int8 <= 0.3x the fp32 file within +0.5 % bpb; int4 <= 0.18x within +3 %) are
checked and reported, not enforced: a miss is a finding for the promotion gate, not a crash.

The exports are written from the fp32 checkpoint: the Hugging Face directory in fp32 (transformers
casts at load), GGUF in each requested type (llama.cpp quantizes its own way; q8_0 is its int8).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.errors import UserError
from llmpipe.io import atomic_path, remove_temp_leftovers, write_text_atomic

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

BPB_TASK = "llmpipe_bpb"
BASELINE = "fp32"
# (max file size / fp32's, max bpb change): the issue's targets, shown next to each measurement
TARGETS = {"int8": (0.30, 0.005), "int4": (0.18, 0.03)}


class SpeedSection(StageConfig):
    prompt: str = Field("ROMEO:", description="the prompt greedy decoding starts from")
    new_tokens: int = Field(64, ge=1, description="tokens generated per measurement")
    repeats: int = Field(3, ge=1, description="measurements per variant; the fastest counts (least disturbed)")


class QuantizeConfig(StageConfig):
    """The `quantize` section of params.yaml."""

    model: Literal["pretrain", "sft", "dpo"] = Field("dpo", description="the stage whose final model is packaged")
    variants: list[Literal["int8", "int4"]] = Field(["int8", "int4"], min_length=1,
                                                    description="weight-only quantizations written and measured")
    group_size: int = Field(32, ge=8, description="int4: weights sharing one scale (along the input dimension)")
    gguf: list[Literal["f32", "f16", "bf16", "q8_0"]] = Field(["f16", "q8_0"], min_length=1,
                                                          description="GGUF files to write")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where bpb and tokens/s are measured")
    batch_size: int = Field(16, ge=1, description="lm-eval batch size for the bpb task")
    speed: SpeedSection = Field(default_factory=SpeedSection)


def run(cfg: QuantizeConfig, ctx: StageContext) -> dict[str, float]:
    from llmpipe.serve.load import load_model
    from llmpipe.train.checkpoint import find_checkpoint

    tasks = _bpb_task_dir(ctx.input("eval"))
    remove_temp_leftovers(*(ctx.output(role) for role in ctx.spec.outputs))
    source = find_checkpoint(ctx.input(cfg.model))
    device = _device(cfg.device)
    model, tok, _ = load_model(source)
    rows = {BASELINE: _measure(cfg, ctx, source, source, tasks, device)}
    with atomic_path(ctx.output("quantized")) as tmp:
        tmp.mkdir()
        for variant in dict.fromkeys(cfg.variants):
            path = _quantize(cfg, ctx, model, variant, source, tmp / variant)
            rows[variant] = _measure(cfg, ctx, path, source, tasks, device)
        metrics = table_metrics(rows)
        write_report(tmp, cfg.model, rows)
    exports = _export(cfg, ctx, source, tok)
    metrics.update(exports)
    quantized = ctx.output("quantized")
    for artifact in (quantized / "report.md", quantized / "quantize.png"):
        ctx.tracker.log_artifact(artifact, "quantize")
    return metrics


def _bpb_task_dir(eval_dir: Path) -> Path:
    """The evaluate stage's task directory, which must hold the bits-per-byte task."""
    tasks = eval_dir / "tasks"
    if not (tasks / f"{BPB_TASK}.yaml").exists():
        raise UserError(f"{tasks} has no {BPB_TASK} task, which the quantize stage scores each variant on: keep "
                        f"{BPB_TASK} in evaluate.tasks (params.yaml) and rerun the evaluate stage")
    return tasks


def _device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("quantize.device is cuda, but torch sees no CUDA device; use auto or cpu")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def _quantize(cfg: QuantizeConfig, ctx: StageContext, model, variant: str, source: Path, out: Path) -> Path:
    from llmpipe.package.quant import QuantSpec, quantize_model, save_quantized
    from llmpipe.train.checkpoint import read_tokenizer_ref, weights_hash

    spec = QuantSpec(variant=variant, group_size=cfg.group_size)
    quantized = quantize_model(copy.deepcopy(model), spec)  # the fp32 model stays for the next variant
    meta = {"source": str(source.relative_to(ctx.root)), "source_weights_sha256": weights_hash(source)}
    ctx.log.info("quantize: %s -> %s", source.relative_to(ctx.root), variant)
    return save_quantized(quantized, spec, out, read_tokenizer_ref(source), meta)


def _measure(cfg: QuantizeConfig, ctx: StageContext, checkpoint: Path, source: Path, tasks: Path,
             device: str) -> dict[str, float]:
    """size (bytes of model.safetensors), bits per byte on the held-out task, greedy tokens/s."""
    from llmpipe.evaluate.evaluate import score

    results, _ = score(checkpoint, [BPB_TASK], tasks, device=device, batch_size=cfg.batch_size)
    bpb = results["results"][BPB_TASK]["bits_per_byte,none"]
    speed = tokens_per_s(checkpoint, cfg.speed, device)
    size = (checkpoint / "model.safetensors").stat().st_size
    ctx.log.info("quantize: %s: %.2f MB, %.4f bits/byte, %.0f tokens/s", checkpoint.name, size / 1e6, bpb, speed)
    return {"size_bytes": float(size), "bpb": float(bpb), "tokens_per_s": speed}


def tokens_per_s(checkpoint: Path, speed: SpeedSection, device: str) -> float:
    """Greedy decoding speed of the generation engine on `checkpoint`."""
    from llmpipe.serve.engine import Engine
    from llmpipe.serve.load import load_model

    model, tok, _ = load_model(checkpoint, device=device)
    return decode_speed(Engine(model, tok, device), [speed.prompt], speed.new_tokens, speed.repeats)


def decode_speed(engine, prompts: list[str], new_tokens: int, repeats: int) -> float:
    """Greedy tokens/s of `engine`, one prompt at a time (batch 1): the fastest of `repeats` passes over
    `prompts` after a warm-up (first-call allocations are not decoding speed). benchmarks/quantize.py too."""
    import torch

    from llmpipe.serve.engine import tokens_per_second
    from llmpipe.serve.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    cuda = engine.device.type == "cuda"
    engine.generate(prompts[:1], params)
    best = 0.0
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        started, completions = time.perf_counter(), []
        for prompt in prompts:
            completions += engine.generate([prompt], params)
        if cuda:
            torch.cuda.synchronize()
        best = max(best, tokens_per_second(completions, time.perf_counter() - started))
    return best


def table_metrics(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"quantize/<variant>/<measure>": value}, with each variant's ratios to the fp32 row."""
    base = rows[BASELINE]
    metrics = {}
    for variant, row in rows.items():
        metrics.update({f"quantize/{variant}/{k}": v for k, v in row.items()})
        if variant != BASELINE:
            metrics[f"quantize/{variant}/size_ratio"] = row["size_bytes"] / base["size_bytes"]
            metrics[f"quantize/{variant}/bpb_change"] = row["bpb"] / base["bpb"] - 1
            metrics[f"quantize/{variant}/speed_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
    return metrics


def write_report(out: Path, model: str, rows: dict[str, dict[str, float]]) -> None:
    """report.md (the size/quality/speed table with the targets) and quantize.png (size vs bpb)."""
    base = rows[BASELINE]
    lines = [f"# quantize: the {model} model", "",
             "| variant | size (MB) | × fp32 | bits/byte | change | tokens/s | × fp32 | target |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for variant, row in rows.items():
        size, change = row["size_bytes"] / base["size_bytes"], row["bpb"] / base["bpb"] - 1
        target = ""
        if variant in TARGETS:
            max_size, max_change = TARGETS[variant]
            met = size <= max_size and change <= max_change
            target = f"{'met' if met else 'MISSED'} (≤ {max_size}×, ≤ +{max_change:.1%})"
        lines.append(f"| {variant} | {row['size_bytes'] / 1e6:.2f} | {size:.3f} | {row['bpb']:.4f} | {change:+.2%} | "
                     f"{row['tokens_per_s']:.0f} | {row['tokens_per_s'] / base['tokens_per_s']:.2f} | {target} |")
    lines += ["", f"bits/byte: lm-eval's `{BPB_TASK}` (the evaluate stage's held-out documents); tokens/s: greedy "
                  "decoding through the generation engine, batch 1, fastest of the repeats.", "",
              "![size vs bits per byte](quantize.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    _plot(out / "quantize.png", rows)


def _plot(path: Path, rows: dict[str, dict[str, float]]) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for variant, row in rows.items():
        ax.scatter(row["size_bytes"] / 1e6, row["bpb"], s=40)
        ax.annotate(variant, (row["size_bytes"] / 1e6, row["bpb"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("quantization: size against quality", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _export(cfg: QuantizeConfig, ctx: StageContext, source: Path, tok) -> dict[str, float]:
    """The Hugging Face directory and the GGUF files (each written whole, then renamed); their sizes."""
    from llmpipe.package.export_gguf import export_gguf
    from llmpipe.package.export_hf import export_hf

    out = export_hf(source, tok, ctx.output("hf"))
    metrics = {"export/hf/size_bytes": float(sum(f.stat().st_size for f in out.iterdir() if f.is_file()))}
    ctx.log.info("quantize: Hugging Face export in %s", out.relative_to(ctx.root))
    with atomic_path(ctx.output("gguf")) as tmp:
        tmp.mkdir()
        for file_type in dict.fromkeys(cfg.gguf):
            path = export_gguf(source, tok, tmp / f"{cfg.model}-{file_type}.gguf", file_type)
            metrics[f"export/gguf/{file_type}/size_bytes"] = float(path.stat().st_size)
    ctx.log.info("quantize: GGUF %s in %s", ", ".join(cfg.gguf), ctx.output("gguf").relative_to(ctx.root))
    return metrics
