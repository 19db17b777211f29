"""Training FLOPs per token and model FLOPs utilisation (MFU).

Convention (PaLM appendix B, nanoGPT's estimate_mfu): one token of training (forward + backward)
costs

    6 * N  +  12 * L * H * Q * T

N: every parameter that takes part in a matmul, i.e. all parameters except the input token
   embedding (a table lookup, no FLOPs) but including the lm_head matrix. With tied embeddings
   the shared matrix is counted once, as the lm_head. Norm gains are included (negligible).
   -> N = num_params(exclude_embeddings=True) + vocab_size * d_model in both cases.
L, H, Q, T: layers, query heads, head dim, sequence length. The attention term counts QK^T and AV
   over the full T x T square (2 matmuls x 2 FLOPs x 3 for fwd+bwd = 12), as PaLM does, although
   causal kernels skip the upper half. Grouped kv heads do not change it (QK^T still has H heads).
MFU = achieved FLOPs/s (from measured tokens/s and this count) / the chip's dense bf16 peak.
"""

from __future__ import annotations

import logging

import torch

from llmpipe.model.config import ModelConfig

log = logging.getLogger("llmpipe.model")

# Dense (no sparsity) bf16 tensor-core peak per GPU, FLOP/s, from the vendors' datasheets.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100-SXM": 989.5e12,
    "H100-PCIe": 756e12,
    "H200": 989.5e12,
    "A100": 312e12,
    "L4": 121e12,
    "L40S": 362e12,
    "B200": 2250e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """N in 6N: parameters except the input embedding, lm_head matrix included (see module doc)."""
    return cfg.num_params(exclude_embeddings=True) + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context length seq_len."""
    N = matmul_params(cfg)
    return 6.0 * N + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len  # 6N + 12·L·H·Q·T


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, peak: float | None) -> float:
    """Fraction of `peak` FLOP/s achieved; nan when there is no meaningful peak (CPU, unknown GPU)."""
    if not peak:
        return float("nan")
    return tokens_per_s * flops_per_token(cfg, seq_len) / peak


def gpu_kind(name: str) -> str | None:
    """A CUDA device name ("NVIDIA H100 80GB HBM3") -> a PEAK_BF16_FLOPS key, or None if unknown."""
    n = name.upper()
    if "H200" in n:
        return "H200"
    if "H100" in n:
        if "PCIE" in n:
            return "H100-PCIe"
        return None if "NVL" in n else "H100-SXM"  # SXM boards report "HBM3"; NVL has its own peak
    for key in ("A100", "L40S", "B200"):
        if key in n:
            return key
    if n.endswith(" L4") or n == "L4":
        return "L4"
    return None


def detect_peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of a CUDA device from its name; None on CPU or for a GPU not in the table."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = gpu_kind(name)
    if kind is None:
        log.warning("no bf16 peak known for GPU %r: MFU will be nan (known: %s)", name, ", ".join(PEAK_BF16_FLOPS))
        return None
    return PEAK_BF16_FLOPS[kind]
