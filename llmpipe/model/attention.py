"""Causal self-attention, one function with three interchangeable backends.

    flash_attn  the flash-attn package (`flash_attn_func`, FA2; or `flash_attn.cute`, FA4, where only
                that is installed, on Hopper/Blackwell). CUDA, fp16/bf16, grouped-query natively.
    sdpa        torch.nn.functional.scaled_dot_product_attention(enable_gqa=True). On CUDA it asks
                for cuDNN attention first on Hopper (capability 9.x), FlashAttention-2 first elsewhere,
                then the memory-efficient and math kernels. Runs on CPU too.
    math        softmax(QK^T / sqrt(d) + causal mask) V written out: the readable reference.

All three take q (B, H, T, D), k and v (B, Hkv, T, D) with H a multiple of Hkv (query head h reads
kv head h // (H / Hkv), the Llama / repeat_interleave grouping) and return (B, H, T, D).

`masked_attention` is the decoding form: Tq new queries against Tk >= Tq cached keys under an
explicit (B, 1, Tq, Tk) mask (causal and padding in one; see cache.py). sdpa and math run it;
flash_attn's varlen/kv-cache API has no per-key mask for left padding, so a cached forward asked for
flash_attn (or auto on CUDA) runs sdpa and logs why (`resolve_masked_backend`).

`segment_mask` turns packed training rows (several conversations concatenated in one row) into
such a mask: causal and within one conversation, so packing changes no conversation's logits.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmpipe.errors import UserError

log = logging.getLogger("llmpipe.model")

BACKENDS = ("flash_attn", "sdpa", "math")
FLASH_DTYPES = (torch.float16, torch.bfloat16)

# flash-attn is optional: imported once here so the compiled forward never imports anything.
# A broken install (CUDA/ABI mismatch) counts as absent; the reason is kept for the error message.
_flash_attn_func = None
_flash_import_error = "not installed"
try:
    from flash_attn import flash_attn_func as _flash_attn_func  # FA2: (B, T, H, D) in and out
except Exception as exc:  # noqa: BLE001 - ImportError, OSError (missing CUDA libs), RuntimeError
    _flash_import_error = f"{type(exc).__name__}: {exc}"
    try:
        from flash_attn.cute import flash_attn_func as _flash_attn_func  # FA4: returns (out, lse)
    except Exception:  # noqa: BLE001
        pass

_logged: set[tuple[str, str, str]] = set()


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


def _auto(device_type: str, dtype: torch.dtype | None) -> str:
    if device_type == "cuda" and flash_attn_available() and (dtype is None or dtype in FLASH_DTYPES):
        return "flash_attn"
    return "sdpa"


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The concrete backend `name` means on `device` ('auto' -> flash_attn if usable, else sdpa).

    `dtype` is the dtype attention will see (bf16 under autocast); None assumes a half type on CUDA.
    Raises UserError for an unknown name or for flash_attn where it cannot run. Logs each choice once.
    """
    device = torch.device(device)
    if name not in ("auto", *BACKENDS):
        raise UserError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    if name == "flash_attn":
        if not flash_attn_available():
            raise UserError(f"attn_backend 'flash_attn' needs the flash-attn package ({_flash_import_error}); "
                            "install it with `pip install flash-attn` on a CUDA machine, or use 'sdpa'")
        if device.type != "cuda":
            raise UserError(f"attn_backend 'flash_attn' runs on CUDA only, not {device}; use 'sdpa' or 'auto'")
    choice = _auto(device.type, dtype) if name == "auto" else name
    if (name, str(device), choice) not in _logged:
        _logged.add((name, str(device), choice))
        log.info("attention backend: %s (asked for %r on %s)", choice, name, device)
    return choice


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Causal attention: q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D)."""
    B, H, T, D = q.shape
    assert k.shape == v.shape == (B, k.shape[1], T, D) and H % k.shape[1] == 0, (q.shape, k.shape, v.shape)
    if backend == "auto":  # pure function of device and dtype, so torch.compile traces straight through
        backend = _auto(q.device.type, q.dtype)
    if backend == "sdpa":
        return _sdpa(q, k, v)
    if backend == "math":
        return _math(q, k, v)
    if backend == "flash_attn":
        return _flash(q, k, v)
    raise UserError(f"unknown attention backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if _flash_attn_func is None:
        raise UserError("attention backend 'flash_attn' needs `pip install flash-attn`")
    if q.dtype not in FLASH_DTYPES:
        raise UserError(f"flash_attn needs fp16/bf16 inputs, got {q.dtype}: train under bf16 autocast or use 'sdpa'")
    # (B, H, T, D) -> (B, T, H, D): flash-attn's layout. Views only: q/k/v were made as (B, T, H, D).
    out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    if isinstance(out, tuple):  # flash_attn.cute returns (out, lse)
        out = out[0]
    return out.transpose(1, 2)  # (B, H, T, D)


def resolve_masked_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend a cached (masked) forward runs for the configured `name`: sdpa in place of flash_attn."""
    choice = resolve_backend(name, device, dtype)  # validates the name and device as training would
    if choice == "flash_attn":
        key = ("masked", str(device), choice)
        if key not in _logged:
            _logged.add(key)
            log.info("attention backend for cached decoding: sdpa (asked for %r on %s; flash_attn has no "
                     "per-key padding mask, which left-padded batches need)", name, device)
        return "sdpa"
    return choice


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     backend: str = "sdpa") -> torch.Tensor:
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D), mask (B, 1, Tq, Tk) bool (True: attend) -> (B, H, Tq, D).

    `backend` is a resolved one (see resolve_masked_backend): "sdpa" or "math"."""
    B, H, Tq, D = q.shape
    assert k.shape == v.shape == (B, k.shape[1], k.shape[2], D) and H % k.shape[1] == 0, (q.shape, k.shape)
    assert mask.shape == (B, 1, Tq, k.shape[2]), (mask.shape, q.shape, k.shape)
    if backend == "math":
        return _math(q, k, v, mask)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != H)
    raise UserError(f"attention backend {backend!r} cannot run a masked (cached) forward; use sdpa or math")


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments (B, T) long, 0 at padding and 1..n for the conversation each token belongs to ->
    (B, 1, T, T) bool, True where query t may attend to key s: s <= t and the same segment.

    Padding attends to earlier padding only (never to a conversation), so no query row is fully
    masked (the diagonal is always allowed) and softmax never sees a row of -inf (which gives nan)."""
    T = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]  # (B, Tq, Tk)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (Tq, Tk)
    return (same & causal)[:, None]  # (B, 1, T, T)


def masked_backend_name(name: str) -> str:
    """The masked backend for a configured `name`, as a pure function (torch.compile traces through):
    math stays math, everything else runs sdpa (the reason is in resolve_masked_backend)."""
    return "math" if name == "math" else "sdpa"


@torch.compiler.assume_constant_result
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _sdpa_order(device_index: int, grouped: bool) -> list[SDPBackend]:
    rest = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    # cuDNN attention is the fastest kernel on Hopper. With grouped kv heads we put FlashAttention-2
    # first: torch documents GQA support for flash and math, and we do not rely on cuDNN for it.
    if _cuda_major(device_index) == 9 and not grouped:
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, *rest]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, *rest]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    grouped = k.shape[1] != q.shape[1]
    if q.device.type != "cuda":  # CPU: torch picks its flash-style CPU kernel or math by itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
    with sdpa_kernel(_sdpa_order(q.device.index, grouped), set_priority=True):  # a CUDA tensor's index is set
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)  # (B, H, T, D)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mask None: causal over T queries and T keys; else (B, 1, Tq, Tk) bool, True where a query may look."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    if group > 1:  # share each kv head with `group` consecutive query heads
        k = k.repeat_interleave(group, dim=1)  # (B, H, T, D)
        v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, Tq, Tk)
    if mask is None:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    else:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # softmax in fp32 for bf16 inputs
    return probs @ v  # (B, H, T, D)
