"""Quality per unit of compute: llmpipe's model and recipe against a nanoGPT-style GPT-2, same data.

Both models train on the same token shards (the project's data/tokens/train, made by the tokenizer
stage) for the same wall-clock budget, and separately for the same token budget; each is then
scored on EVERY token of data/tokens/val in bits per byte (llmpipe/train/score.py). Prints one row
per (budget, model), how much better llmpipe is per budget, and the ratio reference / llmpipe in
bits per byte at equal wall clock last (> 1: llmpipe better).

    llmpipe: the project's `pretrain` section (params.yaml, plus any --set KEY=VALUE), trained by the
             real pretrain worker (llmpipe/train/pretrain_worker.py) with its default recipe.
    reference: benchmarks/reference_gpt.py (GPT-2 layout: LayerNorm, learned positions, GELU 4x,
             biases, tied) at the section's depth, width, heads and seq_len, as written in
             params.yaml (--set changes llmpipe's side only, so every recipe trial faces the same
             reference); AdamW (0.9, 0.95), weight decay 0.1 on 2-D weights, cosine to 0.1 x lr after
             the section's warmup, grad clip 1.0; the same batches (seed, micro_batch, accumulation).

Wall clock: a short calibration run of each model (12 steps, the first 2 untimed) measures its step
time; the real run gets floor(seconds / step time) steps. Only optimizer steps count as training
time (the llmpipe trainer's own measure; evals, checkpoints and scoring are outside it): compare
each row's `train s` with the budget.

    # CPU (the demo project; about 17 minutes: 4 minutes per model and budget)
    python benchmarks/quality_per_compute.py --project .
    # a recipe trial (llmpipe's side only), the reference already measured:
    python benchmarks/quality_per_compute.py --only llmpipe --set optimizer=muon --json trial.json
    # GPU: both models at configs/pretrain-gpt2-124m.yaml (124M, seq 1024, bf16, compile), 20 min each
    python benchmarks/quality_per_compute.py --gpu --budget time
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # reference_gpt.py sits next to this file
from reference_gpt import RefGPT  # noqa: E402

from llmpipe.config import load_section, read_params  # noqa: E402
from llmpipe.errors import UserError  # noqa: E402
from llmpipe.model import ModelConfig  # noqa: E402
from llmpipe.tokenizer.shards import TokenSplit, open_split  # noqa: E402
from llmpipe.train import checkpoint as ckpt  # noqa: E402
from llmpipe.train.data import TokenWindows, TrainBatches  # noqa: E402
from llmpipe.train.loop import TrainConfig  # noqa: E402
from llmpipe.train.pretrain import PretrainConfig, model_config  # noqa: E402
from llmpipe.train.pretrain_worker import train  # noqa: E402
from llmpipe.train.schedule import Schedule  # noqa: E402
from llmpipe.train.score import score_split  # noqa: E402

GPU_CONFIG = HERE.parent / "configs" / "pretrain-gpt2-124m.yaml"
CALIBRATION_STEPS, UNTIMED = 12, 2  # the first steps pay for allocation (and compile): not timed
REFERENCE = "reference (nanoGPT GPT-2)"
LLMPIPE = "llmpipe GPT"
BUDGET_NAMES = {"time": "equal wall clock", "tokens": "equal tokens"}


# ---------------- the setup both models share ----------------
@dataclass(frozen=True)
class Setup:
    project: Path
    ours: PretrainConfig  # the section with --set applied: llmpipe's model and recipe
    base: PretrainConfig  # the section as written: the reference's sizes, batch, warmup
    overrides: dict[str, Any]
    vocab_size: int
    train_split: TokenSplit
    val_split: TokenSplit
    device: torch.device
    ref_lr: float
    seed: int

    @property
    def bf16(self) -> bool:
        """The trainer's rule (llmpipe/train/loop.py), so the reference runs at the same precision."""
        dtype = self.base.dtype
        return dtype == "bf16" or (dtype == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def score(self, model: torch.nn.Module, seq_len: int, batch_size: int) -> float:
        """Bits per byte over every token of the val split."""
        meta = self.val_split.meta
        return score_split(model, self.val_split.shards, meta["num_bytes"], seq_len, batch_size, self.device,
                           self.autocast).bpb


def parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY a key of the pretrain section "
                            f"(e.g. --set optimizer=muon)")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def load_sections(source: Path, overrides: dict[str, Any]) -> tuple[PretrainConfig, PretrainConfig]:
    """(the `pretrain` section of `source` as written, the same with the overrides), both validated."""
    params = read_params(source)
    base = load_section(PretrainConfig, params, "pretrain", source)
    merged = {**(params.get("pretrain") or {}), **overrides}
    shown = " ".join(f"{k}={v!r}" for k, v in overrides.items())
    ours = load_section(PretrainConfig, {"pretrain": merged}, "pretrain", f"{source} with --set {shown}")
    return base, ours


def pick_device(asked: str | None, cfg: PretrainConfig) -> torch.device:
    want = asked or cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device cuda asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                        f"use --device cpu")
    return torch.device(want)


def make_setup(args: argparse.Namespace) -> Setup:
    project = Path(args.project).resolve()
    overrides = parse_overrides(args.set)
    base, ours = load_sections(GPU_CONFIG if args.gpu else project / "params.yaml", overrides)
    train_split = open_split(project / "data" / "tokens" / "train")
    val_split = open_split(project / "data" / "tokens" / "val")
    ref_lr = args.ref_lr or (6e-4 if args.gpu else 2e-3)
    return Setup(project, ours, base, overrides, train_split.meta["vocab_size"], train_split, val_split,
                 pick_device(args.device, base), ref_lr, base.seed if args.seed is None else args.seed)


# ---------------- one training run ----------------
@dataclass(frozen=True)
class Run:
    budget: str  # time | tokens
    model: str
    steps: int
    tokens: int
    train_s: float  # summed optimizer-step time
    bpb: float  # whole val split

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s


def llmpipe_resolved(setup: Setup, steps: int, out_dir: Path, **train: Any) -> dict[str, Any]:
    """What llmpipe/train/pretrain.py resolve_config gives the worker, for `steps` steps into `out_dir`."""
    cfg = setup.ours
    settings = cfg.train_settings()
    settings.update(max_steps=steps, warmup_steps=min(cfg.warmup_steps, steps), eval_every=steps,
                    checkpoint_every=steps, log_every=1, sample_tokens=0, seed=setup.seed, **train)
    return {"root": str(setup.project), "train_dir": "data/tokens/train", "val_dir": "data/tokens/val",
            "tokenizer_dir": "models/tokenizer", "out_dir": str(out_dir.resolve()), "device": setup.device.type,
            "model": model_config(cfg, setup.vocab_size).to_dict(), "train": settings, "sample_prompt": "",
            "code": "benchmark"}


def run_llmpipe(setup: Setup, budget: str, steps: int) -> Run:
    with tempfile.TemporaryDirectory(prefix="quality-llmpipe-") as tmp:
        metrics = train(llmpipe_resolved(setup, steps, Path(tmp)))
        model, _, _ = ckpt.load_checkpoint(Path(tmp) / "final", setup.device)
        bpb = setup.score(model, setup.ours.seq_len, setup.ours.micro_batch)
    tokens = int(metrics["tokens_seen"])
    return Run(budget, LLMPIPE, int(metrics["steps"]), tokens, tokens / metrics["tokens_per_s"], bpb)


def llmpipe_step_seconds(setup: Setup) -> float:
    """Mean step time of a short run of the real worker, from its per-step log (first steps untimed)."""
    with tempfile.TemporaryDirectory(prefix="quality-calibrate-") as tmp:
        train(llmpipe_resolved(setup, CALIBRATION_STEPS, Path(tmp), eval_batches=1))
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    per_step = [setup.ours.global_batch_tokens / r["train/tokens_per_s"] for r in records
                if "train/tokens_per_s" in r and r["step"] > UNTIMED]
    return sum(per_step) / len(per_step)


def train_reference(setup: Setup, steps: int) -> tuple[RefGPT, list[float], int]:
    """The nanoGPT recipe on the base section's batches: the model, each step's seconds, the tokens trained on."""
    cfg = setup.base
    mcfg = model_config(cfg, setup.vocab_size)
    accum = TrainConfig(**cfg.train_settings()).accum_steps(1)
    batches = TrainBatches(TokenWindows(setup.train_split.shards, cfg.seq_len, "data/tokens/train"),
                           cfg.micro_batch, setup.seed, accum)
    torch.manual_seed(setup.seed)
    model = RefGPT(setup.vocab_size, cfg.seq_len, mcfg.n_layer, mcfg.n_head, mcfg.d_model).to(setup.device)
    net = torch.compile(model) if cfg.compile else model
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=setup.ref_lr, betas=(0.9, 0.95),
                            fused=setup.device.type == "cuda")
    schedule = Schedule(setup.ref_lr, steps, min(cfg.warmup_steps, steps), "cosine", 0.1)
    seconds, tokens = [], 0
    for step in range(steps):
        t0 = time.perf_counter()
        tokens += reference_step(net, model, opt, schedule.lr_at(step), batches.micro_batches(step), accum, setup)
        seconds.append(time.perf_counter() - t0)
    return model, seconds, tokens


def reference_step(net: Callable, model: RefGPT, opt: torch.optim.Optimizer, lr: float, micro_batches: Any,
                   accum: int, setup: Setup) -> int:
    """One optimizer step; returns the tokens it trained on."""
    for group in opt.param_groups:
        group["lr"] = lr
    tokens = 0
    for x, y in micro_batches:
        tokens += y.numel()
        # contiguous, as nanoGPT's get_batch makes them (its view() needs it; the windows are slices)
        x, y = (t.contiguous().to(setup.device, non_blocking=True) for t in (x, y))
        with setup.autocast():
            _, loss = net(x, y)
        (loss / accum).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()  # waits for the device, as the trainer's step does: the step's time is all in
    return tokens


def run_reference(setup: Setup, budget: str, steps: int) -> Run:
    model, seconds, tokens = train_reference(setup, steps)
    bpb = setup.score(model, setup.base.seq_len, setup.base.micro_batch)
    return Run(budget, REFERENCE, steps, tokens, sum(seconds), bpb)


def reference_step_seconds(setup: Setup) -> float:
    _, seconds, _ = train_reference(setup, CALIBRATION_STEPS)
    timed = seconds[UNTIMED:]
    return sum(timed) / len(timed)


# ---------------- budgets ----------------
def time_budget_steps(setup: Setup, models: list[str], seconds: float) -> dict[str, tuple[int, float]]:
    """Per model: (steps that fit in `seconds`, the calibrated seconds per step)."""
    calibrate = {LLMPIPE: llmpipe_step_seconds, REFERENCE: reference_step_seconds}
    out = {}
    for name in models:
        step_s = calibrate[name](setup)
        out[name] = (max(1, math.floor(seconds / step_s)), step_s)
    return out


def token_budget_steps(setup: Setup, tokens: int) -> dict[str, int]:
    return {LLMPIPE: math.ceil(tokens / setup.ours.global_batch_tokens),
            REFERENCE: math.ceil(tokens / setup.base.global_batch_tokens)}


def run_model(setup: Setup, name: str, budget: str, steps: int) -> Run:
    print(f"training {name}: {steps} steps ({BUDGET_NAMES[budget]})", file=sys.stderr, flush=True)
    return (run_llmpipe if name == LLMPIPE else run_reference)(setup, budget, steps)


# ---------------- output ----------------
def header(setup: Setup, args: argparse.Namespace) -> str:
    ours, base = model_config(setup.ours, setup.vocab_size), model_config(setup.base, setup.vocab_size)
    with torch.device("meta"):  # sizes only: no memory for a 124M count
        ref = RefGPT(setup.vocab_size, setup.base.seq_len, base.n_layer, base.n_head, base.d_model)
    accum = TrainConfig(**setup.base.train_settings()).accum_steps(1)
    overrides = " ".join(f"{k}={v!r}" for k, v in setup.overrides.items()) or "none"
    return (f"quality per compute: {LLMPIPE} ({describe(ours)}, {ours.num_params():,} params; --set {overrides}) vs "
            f"{REFERENCE} ({base.n_layer} x {base.d_model}, {sum(p.numel() for p in ref.parameters()):,} params, "
            f"lr {setup.ref_lr:g})\n"
            f"data {setup.project / 'data' / 'tokens'}: train {setup.train_split.meta['num_tokens']:,} tokens, "
            f"val {setup.val_split.meta['num_tokens']:,} tokens / {setup.val_split.meta['num_bytes']:,} bytes, "
            f"vocab {setup.vocab_size}; reference batch {setup.base.micro_batch} x {setup.base.seq_len} x accum "
            f"{accum} = {setup.base.global_batch_tokens:,} tokens/step; device {setup.device.type}, "
            f"{'bf16 autocast' if setup.bf16 else 'fp32'}, compile {'on' if setup.base.compile else 'off'}, "
            f"torch {torch.__version__}; budget {budgets(args)}")


def budgets(args: argparse.Namespace) -> str:
    shown = {"time": f"{args.seconds:g} s", "tokens": f"{args.tokens:,} tokens"}
    return " and ".join(v for k, v in shown.items() if args.budget in (k, "both")) + " per model"


def describe(cfg: ModelConfig) -> str:
    return (f"{cfg.n_layer} x {cfg.d_model}, {cfg.n_head} heads (kv {cfg.n_kv_head}), {cfg.mlp} {cfg.mlp_hidden}, "
            f"{'tied' if cfg.tie_embeddings else 'untied'}, qk_norm {cfg.qk_norm}")


def table(runs: list[Run]) -> list[str]:
    lines = [f"{'budget':<18}{'model':<28}{'steps':>7}{'tokens':>13}{'train s':>9}{'tokens/s':>11}{'val bpb':>9}"]
    for r in runs:
        lines.append(f"{BUDGET_NAMES[r.budget]:<18}{r.model:<28}{r.steps:>7}{r.tokens:>13,}{r.train_s:>9.1f}"
                     f"{r.tokens_per_s:>11,.0f}{r.bpb:>9.4f}")
    return lines


def comparisons(runs: list[Run]) -> tuple[list[str], dict[str, float]]:
    """Per budget run by both models: llmpipe's gain in %, and the ratio reference / llmpipe."""
    lines, ratios = [], {}
    for budget in ("tokens", "time"):  # wall clock last: its ratio is the benchmark's figure
        pair = {r.model: r.bpb for r in runs if r.budget == budget}
        if len(pair) < 2:
            continue
        gain = (pair[REFERENCE] - pair[LLMPIPE]) / pair[REFERENCE] * 100
        lines.append(f"llmpipe {'better' if gain >= 0 else 'worse'} than reference by {abs(gain):.1f}% "
                     f"(bits per byte, {BUDGET_NAMES[budget]})")
        ratios[budget] = pair[REFERENCE] / pair[LLMPIPE]
    if ratios:  # one ratio, last: equal wall clock's when it was run
        budget = "time" if "time" in ratios else "tokens"
        lines.append(f"ratio reference/llmpipe (bits per byte, {BUDGET_NAMES[budget]}): {ratios[budget]:.4f}")
    return lines, ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=".", help="project root with params.yaml and data/tokens/{train,val} "
                    "(made by the tokenizer stage) (default .)")
    ap.add_argument("--budget", choices=("time", "tokens", "both"), default="both",
                    help="train each model for the same wall clock, the same tokens, or both (default both)")
    ap.add_argument("--seconds", type=float, help="wall-clock training budget per model (default 240; with --gpu 1200)")
    ap.add_argument("--tokens", type=int, help="token budget per model (default: the pretrain section's steps x "
                    "global_batch_tokens; with --gpu that is 2.6B tokens: give --tokens or --budget time)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the pretrain section for llmpipe's model only (repeatable; VALUE is "
                         "YAML), e.g. --set optimizer=muon --set schedule=wsd")
    ap.add_argument("--only", choices=("both", "llmpipe", "reference"), default="both",
                    help="train only one side (the ratio line needs both) (default both)")
    ap.add_argument("--gpu", action="store_true", help="both models at configs/pretrain-gpt2-124m.yaml's pretrain "
                    "settings (gpt2-124m, seq 1024, its batch, lr and warmup; cuda, bf16, compile), reference lr 6e-4")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the pretrain section's device")
    ap.add_argument("--ref-lr", type=float, help="the reference's peak lr (default 2e-3; with --gpu 6e-4)")
    ap.add_argument("--seed", type=int, help="init and data order of both models (default: the section's seed)")
    ap.add_argument("--json", help="write every figure here as JSON (for docs/benchmarks.md)")
    args = ap.parse_args(argv)
    if args.seconds is None:
        args.seconds = 1200.0 if args.gpu else 240.0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup = make_setup(args)
    if args.tokens is None:
        args.tokens = setup.base.steps * setup.base.global_batch_tokens
    print(header(setup, args), flush=True)
    models = {"both": [REFERENCE, LLMPIPE], "llmpipe": [LLMPIPE], "reference": [REFERENCE]}[args.only]
    runs, calibration = [], {}
    if args.budget in ("tokens", "both"):
        steps = token_budget_steps(setup, args.tokens)
        runs += [run_model(setup, name, "tokens", steps[name]) for name in models]
    if args.budget in ("time", "both"):
        planned = time_budget_steps(setup, models, args.seconds)
        for name, (steps, step_s) in planned.items():
            calibration[name] = step_s
            print(f"calibration: {name} {step_s * 1000:.1f} ms/step -> {steps} steps in {args.seconds:g} s",
                  flush=True)
        runs += [run_model(setup, name, "time", planned[name][0]) for name in models]
    lines, ratios = comparisons(runs)
    print("\n".join(table(runs) + lines), flush=True)
    result = {"project": str(setup.project), "overrides": setup.overrides, "device": setup.device.type,
              "seconds": args.seconds, "tokens": args.tokens, "ref_lr": setup.ref_lr, "seed": setup.seed,
              "calibration_step_s": calibration, "runs": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in runs],
              "ratios": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
