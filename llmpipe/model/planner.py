"""The compute planner behind `llmpipe plan`: how big, how long, how much memory.

Everything here is arithmetic on the config; nothing is allocated. The assumptions, also printed by
format_plan:

* Compute: total FLOPs = flops_per_token(cfg, T) * D  (6N + 12·L·H·Q·T per token, see flops.py).
  Wall time = FLOPs / (num_gpus * peak bf16 FLOP/s * MFU).
* Compute-optimal tokens (Chinchilla, Hoffmann et al. 2022): about 20 tokens per parameter,
  counting all parameters (embeddings included, as they did).
* Memory per GPU, bf16 autocast with fp32 master weights and AdamW:
    state        16 bytes/param: fp32 weights 4 + fp32 grads 4 + AdamW exp_avg 4 + exp_avg_sq 4.
                 DDP replicates it; FSDP2 shards it over the GPUs (16 N / num_gpus).
    working      DDP: the bf16 copies of every weight that autocast makes and keeps for backward,
                 2 bytes/param. FSDP2: two unsharded units at a time (current + prefetched), the
                 largest unit being a block or the embedding, as bf16 params 2 + fp32 grads 4 bytes.
    activations  saved for backward per micro-batch, no recompute, flash/SDPA attention (no T x T
                 scores). Per layer and token, in bytes (h = d_model, f = mlp_hidden, g = kv/q heads):
                     4h  attention-norm input (fp32 residual)     2h  its bf16 output (q/k/v input)
                     2h(1+2g)  q, k, v after RoPE                 2h  attention output (wo input)
                     4h  MLP-norm input (fp32)                    2h  its bf16 output
                     6f  gate, up and silu(gate)*up (bf16)
                 = h(16 + 4g) + 6f; GPT-2's layout gives about Korthikanti et al.'s 34h without
                 their 5·a·T score term. Plus the head: 6h for the final norm, and 10 bytes per
                 vocab entry: bf16 logits 2 + fp32 log-probs 4 + their fp32 gradient 4.
    overhead     1 GiB for the CUDA context, cuBLAS workspaces and allocator slack.
  Memory is in GiB (2^30 bytes), as nvidia-smi reports it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from llmpipe.errors import UserError
from llmpipe.model.config import ModelConfig
from llmpipe.model.flops import PEAK_BF16_FLOPS, flops_per_token, matmul_params

GiB = 2**30
CHINCHILLA_TOKENS_PER_PARAM = 20
STATE_BYTES_PER_PARAM = 16  # fp32 weights + fp32 grads + 2 fp32 AdamW moments
DDP_WORKING_BYTES_PER_PARAM = 2  # bf16 autocast weight copies
FSDP_UNIT_BYTES_PER_PARAM = 2 + 4  # unsharded bf16 params + fp32 grads of one FSDP unit
OVERHEAD_GIB = 1.0
# Memory per GPU in GiB (the usual SKU of each kind).
GPU_MEMORY_GIB: dict[str, float] = {
    "H100-SXM": 80, "H100-PCIe": 80, "H200": 141, "A100": 80, "L4": 24, "L40S": 48, "B200": 180,
}


@dataclass
class Plan:
    config: ModelConfig
    gpu: str
    num_gpus: int
    mfu: float
    micro_batch: int
    seq_len: int
    n_params: int  # unique parameters, embeddings included
    n_params_non_embedding: int
    n_params_matmul: int  # N of 6N
    flops_per_token: float
    tokens: int
    tokens_chinchilla: int
    total_flops: float
    tokens_per_step: int  # micro_batch * seq_len * num_gpus, before any gradient accumulation
    steps: int
    tokens_per_s: float
    wall_time_s: float
    gpu_hours: float
    gpu_memory_gib: float
    state_gib_ddp: float
    state_gib_fsdp: float
    working_gib_ddp: float
    working_gib_fsdp: float
    activation_gib: float
    overhead_gib: float
    total_gib_ddp: float
    total_gib_fsdp: float
    warnings: list[str] = field(default_factory=list)


def parse_count(text: str | int) -> int:
    """'10B' -> 10_000_000_000. Suffixes K, M, B (or G), T (powers of 1000); decimals and 1e9 allowed."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise UserError(f"cannot read token count {text!r}: use a number with an optional K/M/B/T suffix, e.g. 10B")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(round(float(m.group(1)) * scale))


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int) -> float:
    """Bytes saved for backward by one micro-batch (formula in the module docstring)."""
    h, f, g = cfg.d_model, cfg.mlp_hidden, cfg.n_kv_head / cfg.n_head
    per_layer_per_token = h * (16 + 4 * g) + 6 * f
    head_per_token = 6 * h + 10 * cfg.vocab_size
    return micro_batch * seq_len * (cfg.n_layer * per_layer_per_token + head_per_token)


def plan(cfg: ModelConfig, tokens: int | None, gpu: str, num_gpus: int, mfu: float, micro_batch: int,
         seq_len: int, gpu_memory_gb: float | None = None) -> Plan:
    """Compute, time and memory for training `cfg` on `tokens` tokens (None: Chinchilla-optimal)."""
    if gpu not in PEAK_BF16_FLOPS:
        raise UserError(f"unknown GPU {gpu!r}; known: {', '.join(PEAK_BF16_FLOPS)}")
    if not 0 < mfu <= 1:
        raise UserError(f"mfu must be in (0, 1], got {mfu}")
    for name, value in (("num_gpus", num_gpus), ("micro_batch", micro_batch), ("seq_len", seq_len)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    warnings = []
    if seq_len > cfg.max_seq_len:
        warnings.append(f"seq_len {seq_len} is longer than the model's max_seq_len {cfg.max_seq_len}")

    n_params = cfg.num_params()
    tokens_chinchilla = CHINCHILLA_TOKENS_PER_PARAM * n_params
    tokens = tokens_chinchilla if tokens is None else tokens
    if tokens < 1:
        raise UserError(f"tokens must be >= 1, got {tokens}")
    fpt = flops_per_token(cfg, seq_len)
    total_flops = fpt * tokens
    flops_per_s = num_gpus * PEAK_BF16_FLOPS[gpu] * mfu
    wall = total_flops / flops_per_s
    tokens_per_step = micro_batch * seq_len * num_gpus

    largest_unit = max(cfg.layer_params(), cfg.vocab_size * cfg.d_model)
    state_ddp = STATE_BYTES_PER_PARAM * n_params / GiB
    state_fsdp = state_ddp / num_gpus
    working_ddp = DDP_WORKING_BYTES_PER_PARAM * n_params / GiB
    working_fsdp = 2 * largest_unit * FSDP_UNIT_BYTES_PER_PARAM / GiB
    acts = activation_bytes(cfg, micro_batch, seq_len) / GiB
    total_ddp = state_ddp + working_ddp + acts + OVERHEAD_GIB
    total_fsdp = state_fsdp + working_fsdp + acts + OVERHEAD_GIB

    memory = GPU_MEMORY_GIB[gpu] if gpu_memory_gb is None else gpu_memory_gb
    if total_ddp > memory:
        warnings.append(f"DDP needs ~{total_ddp:.1f} GiB per GPU but a {gpu} has {memory:g} GiB: "
                        + ("use FSDP2" if total_fsdp <= memory else "lower --micro-batch or use activation checkpointing"))
    if total_fsdp > memory:
        warnings.append(f"FSDP2 needs ~{total_fsdp:.1f} GiB per GPU (activations {acts:.1f} GiB) but a {gpu} has "
                        f"{memory:g} GiB: lower --micro-batch (use gradient accumulation) or recompute activations")
    return Plan(
        config=cfg, gpu=gpu, num_gpus=num_gpus, mfu=mfu, micro_batch=micro_batch, seq_len=seq_len,
        n_params=n_params, n_params_non_embedding=cfg.num_params(exclude_embeddings=True),
        n_params_matmul=matmul_params(cfg), flops_per_token=fpt, tokens=tokens,
        tokens_chinchilla=tokens_chinchilla, total_flops=total_flops, tokens_per_step=tokens_per_step,
        steps=math.ceil(tokens / tokens_per_step), tokens_per_s=flops_per_s / fpt, wall_time_s=wall,
        gpu_hours=wall / 3600 * num_gpus, gpu_memory_gib=memory, state_gib_ddp=state_ddp,
        state_gib_fsdp=state_fsdp, working_gib_ddp=working_ddp, working_gib_fsdp=working_fsdp,
        activation_gib=acts, overhead_gib=OVERHEAD_GIB, total_gib_ddp=total_ddp, total_gib_fsdp=total_fsdp,
        warnings=warnings,
    )


def _count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(p: Plan) -> str:
    c = p.config
    attn_flops = 12 * c.n_layer * c.n_head * c.head_dim * p.seq_len
    fits = lambda total: "yes" if total <= p.gpu_memory_gib else "NO"  # noqa: E731
    lines = [
        f"model         {c.n_layer} layers x {c.d_model} wide, {c.n_head} heads ({c.n_kv_head} kv), "
        f"SwiGLU {c.mlp_hidden}, vocab {c.vocab_size}, {'tied' if c.tie_embeddings else 'untied'} embeddings",
        f"parameters    {_count(p.n_params)} total ({p.n_params:,}); {_count(p.n_params_non_embedding)} non-embedding; "
        f"N for FLOPs {_count(p.n_params_matmul)}",
        f"FLOPs/token   {p.flops_per_token:.3e} = 6N {6 * p.n_params_matmul:.3e} + attention {attn_flops:.3e} (T={p.seq_len})",
        f"tokens        {_count(p.tokens)}; compute-optimal (Chinchilla, ~{CHINCHILLA_TOKENS_PER_PARAM} tokens/param) "
        f"{_count(p.tokens_chinchilla)}, so this is {p.tokens / p.tokens_chinchilla:.2f}x that",
        f"compute       {p.total_flops:.3e} FLOPs",
        f"speed         {p.num_gpus} x {p.gpu} ({PEAK_BF16_FLOPS[p.gpu] / 1e12:g} TFLOP/s bf16 dense) at MFU "
        f"{p.mfu:.0%}: {_count(p.tokens_per_s)} tokens/s in all",
        f"wall time     {_duration(p.wall_time_s)} ({p.gpu_hours:,.1f} GPU-hours)",
        f"batch         {p.micro_batch} x {p.seq_len} x {p.num_gpus} GPUs = {p.tokens_per_step:,} tokens/step "
        f"(no accumulation) -> {p.steps:,} steps",
        f"memory/GPU    {'GiB':<28}{'DDP':>8}{'FSDP2':>8}",
        f"  {'weights+grads+AdamW (16 B/param)':<38}{p.state_gib_ddp:>8.2f}{p.state_gib_fsdp:>8.2f}",
        f"  {'bf16 working copies':<38}{p.working_gib_ddp:>8.2f}{p.working_gib_fsdp:>8.2f}",
        f"  {f'activations (micro-batch {p.micro_batch})':<38}{p.activation_gib:>8.2f}{p.activation_gib:>8.2f}",
        f"  {'CUDA context + slack':<38}{p.overhead_gib:>8.2f}{p.overhead_gib:>8.2f}",
        f"  {'total':<38}{p.total_gib_ddp:>8.2f}{p.total_gib_fsdp:>8.2f}",
        f"  {f'fits in {p.gpu_memory_gib:g} GiB':<38}{fits(p.total_gib_ddp):>8}{fits(p.total_gib_fsdp):>8}",
        "assumptions   bf16 autocast, fp32 master weights, AdamW, no activation recompute, flash/SDPA attention;",
        "              see llmpipe/model/planner.py for the memory formulas",
    ]
    lines += [f"WARNING       {w}" for w in p.warnings]
    return "\n".join(lines)
