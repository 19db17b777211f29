"""Pretraining throughput: llmpipe's GPT against a minimal nanoGPT-style GPT-2, in the same run.

The reference (benchmarks/reference_gpt.py, shared with quality_per_compute.py) and llmpipe's
GPT get the same width, depth, heads, vocabulary, batch and sequence length, the same
AdamW (fused on CUDA), bf16 autocast on CUDA and the same torch.compile setting. Each is timed
over --steps full training steps (forward, backward, optimizer) after --warmup untimed ones, on
one fixed random batch (data loading is not part of this benchmark). Prints a table, then the
ratio ours / reference in tokens/s last.

    python benchmarks/pretrain_throughput.py --preset gpt2-124m --batch 16 --seq-len 1024   # GPU
    python benchmarks/pretrain_throughput.py --preset tiny --vocab-size 4096 --batch 4 --seq-len 128 \
        --steps 5 --warmup 2                                                               # CPU smoke run

MFU uses the PaLM count 6N + 12·L·H·Q·T (llmpipe/model/flops.py) for each model with its own N
(the reference's learned position table is a lookup and is left out of its N, as nanoGPT does).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from llmpipe.model import GPT, ModelConfig
from llmpipe.model.flops import detect_peak_flops, flops_per_token

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_gpt.py sits next to this file
from reference_gpt import RefGPT, reference_flops_per_token  # noqa: E402

GiB = 2**30


# ---------------- timing ----------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, model: nn.Module, fpt: float, args, device: torch.device, peak: float | None) -> dict:
    cuda = device.type == "cuda"
    n_params = sum(p.numel() for p in model.parameters())
    row = dict(name=name, params=n_params, tokens_per_s=float("nan"), mfu=float("nan"), step_ms=float("nan"),
               peak_gib=float("nan"), loss=float("nan"))
    try:
        model.to(device)
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95), fused=cuda)
        run = torch.compile(model) if args.compile else model
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, args.vocab_size, (args.batch, args.seq_len + 1), generator=gen).to(device)
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

        def step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                _, loss = run(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for _ in range(args.warmup):  # compile, cuDNN/cuBLAS autotuning, allocator warm-up
            step()
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync(device)
        elapsed = time.perf_counter() - start
        tokens_per_s = args.batch * args.seq_len * args.steps / elapsed
        row.update(tokens_per_s=tokens_per_s, step_ms=1000 * elapsed / args.steps, loss=loss.item(),
                   mfu=tokens_per_s * fpt / peak if peak else float("nan"),
                   peak_gib=torch.cuda.max_memory_allocated(device) / GiB if cuda else float("nan"))
    except torch.cuda.OutOfMemoryError:
        row["name"] += " (out of memory)"
    return row


def release(device: torch.device) -> None:
    """Free what one measurement left behind (compiled graphs, optimizer state) before the next."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-124m", help="llmpipe model preset (default gpt2-124m)")
    ap.add_argument("--vocab-size", type=int, default=50304, help="vocabulary size for both models (default 50304)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile both models (default: on for CUDA, off for CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--attn-backend", default="auto", help="llmpipe attention backend (default auto)")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.compile is None:
        args.compile = device.type == "cuda"
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left on CUDA, for both models
    cfg = ModelConfig.from_preset(args.preset, args.vocab_size, max_seq_len=max(args.seq_len, 1),
                                  attn_backend=args.attn_backend)
    peak = detect_peak_flops(device)
    where = f"{device.type} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    print(f"pretrain throughput: preset {args.preset} ({cfg.n_layer} x {cfg.d_model}, {cfg.n_head} heads), "
          f"vocab {args.vocab_size}, batch {args.batch} x {args.seq_len}, {args.steps} steps after {args.warmup} "
          f"warmup, {where}, compile {'on' if args.compile else 'off'}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, torch {torch.__version__}")

    reference = RefGPT(args.vocab_size, args.seq_len, cfg.n_layer, cfg.n_head, cfg.d_model)
    rows = [measure("reference (nanoGPT GPT-2)", reference, reference_flops_per_token(reference, cfg, args.seq_len),
                    args, device, peak)]
    del reference
    release(device)
    rows.append(measure("llmpipe GPT", GPT(cfg), flops_per_token(cfg, args.seq_len), args, device, peak))

    print(f"{'model':<28}{'params':>10}{'tokens/s':>12}{'step ms':>10}{'MFU':>8}{'peak GiB':>10}{'loss':>8}")
    for r in rows:
        mfu_text = "n/a" if math.isnan(r["mfu"]) else f"{r['mfu']:.1%}"
        mem_text = "n/a" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.2f}"
        print(f"{r['name']:<28}{r['params'] / 1e6:>9.1f}M{r['tokens_per_s']:>12,.0f}{r['step_ms']:>10.1f}"
              f"{mfu_text:>8}{mem_text:>10}{r['loss']:>8.3f}")
    print(f"ratio ours/reference (tokens/s): {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
