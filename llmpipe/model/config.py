"""Model configuration and the named presets.

A preset is derived from two dials, nanochat style: `depth` (number of layers) and `width`
(d_model). Everything else follows from them:

    n_head     = width / 64            (head_dim 64, the GPT-2 / Llama-small choice)
    n_kv_head  = n_head / kv_group     (kv_group 1 = plain multi-head attention)
    mlp_hidden = 8/3 * width, rounded up to a multiple of 64 (SwiGLU keeps the 4x-MLP FLOPs)

Parameter counts at vocab 50304 with tied embeddings (`ModelConfig.num_params()`, exact):

    tiny        4 x 256   kv 2 of 4 heads    (at vocab 4096: 4,000,000)
    draft       6 x 384   kv 2 of 6 heads          28,758,912
    gpt2-124m  12 x 768   MHA, 12 heads           123,587,328
    350m       24 x 1024  MHA, 16 heads           355,124,224
    1b         20 x 2048  kv 8 of 32 heads        989,153,280

This module imports only the standard library (it is read by the planner and the CLI too).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from llmpipe.errors import UserError  # standard library only, like this module

HEAD_DIM = 64  # every preset uses 64-wide heads; width must be a multiple of it
ATTN_BACKENDS = ("auto", "flash_attn", "sdpa", "math")
MLPS = ("swiglu", "relu2")


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """8/3 * d_model rounded up to `multiple_of`: the SwiGLU MLP then costs what a 4x GELU MLP costs."""
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


def default_hidden(mlp: str, d_model: int) -> int:
    """The MLP width that costs what a 4x two-matrix MLP costs: 8/3 x for SwiGLU's three matrices, 4 x for relu^2."""
    return swiglu_hidden(d_model) if mlp == "swiglu" else 4 * d_model


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int | None = None  # None -> n_head (MHA); a divisor of n_head gives grouped-query attention
    d_model: int
    mlp_hidden: int | None = None  # None -> default_hidden(mlp, d_model)
    mlp: str = "swiglu"  # swiglu (Llama) | relu2: relu(x)^2, two matrices (Primer, modded-nanogpt)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    qk_norm: bool = False  # RMSNorm on q and k per head, before RoPE (Qwen3 / OLMo-2 style)
    logit_softcap: float | None = None  # logits = c * tanh(logits / c) (Gemma 2); None: off
    zero_init_proj: bool = False  # wo and w_down start at zero: each block starts as the identity (modded-nanogpt)
    attn_backend: str = "auto"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp not in MLPS:
            raise UserError(f"invalid ModelConfig: mlp {self.mlp!r} is not one of {', '.join(MLPS)}")
        if self.mlp_hidden is None:
            self.mlp_hidden = default_hidden(self.mlp, self.d_model) if isinstance(self.d_model, int) else None
        problems = []
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "mlp_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:
            raise UserError("invalid ModelConfig: " + "; ".join(problems))
        if self.d_model % self.n_head:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        elif (self.d_model // self.n_head) % 2:
            problems.append(f"head_dim = d_model / n_head = {self.d_model // self.n_head} must be even (RoPE rotates pairs)")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.attn_backend not in ATTN_BACKENDS:
            problems.append(f"attn_backend {self.attn_backend!r} is not one of {', '.join(ATTN_BACKENDS)}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            problems.append(f"logit_softcap must be > 0 (or null: off), got {self.logit_softcap!r}")
        if problems:
            raise UserError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    # ---- parameter counts (analytic; tests check them against the built model) ----
    def layer_params(self) -> int:
        """Parameters of one transformer block."""
        d, q = self.d_model, self.head_dim
        attn = d * self.n_head * q * 2 + d * self.n_kv_head * q * 2  # wq, wo + wk, wv
        mlp = (3 if self.mlp == "swiglu" else 2) * d * self.mlp_hidden  # (w_gate,) w_up, w_down
        norms = 2 * d + (2 * q if self.qk_norm else 0)
        return attn + mlp + norms

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied embedding counts once). `exclude_embeddings` drops the token
        embedding matrix and, when untied, the lm_head too (Kaplan's "non-embedding" count)."""
        embed = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else embed
        total = self.n_layer * self.layer_params() + self.d_model + embed + head  # + final norm
        return total - embed - head if exclude_embeddings else total

    # ---- presets ----
    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides) -> "ModelConfig":
        """Build a named preset for `vocab_size`; `overrides` replace any field.

        Changing `d_model` re-derives the heads (width / 64, same kv grouping) unless `n_head` is
        also given; changing `n_head` re-derives `n_kv_head` unless given. `mlp_hidden` follows
        the final d_model unless given.
        """
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        unknown = sorted(set(overrides) - _field_names())
        if unknown:
            raise UserError(f"unknown ModelConfig field(s) {unknown}; valid: {sorted(_field_names())}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        kwargs = dict(PRESETS[name])
        kv_group = kwargs["n_head"] // kwargs["n_kv_head"]
        if "d_model" in overrides and "n_head" not in overrides:
            if overrides["d_model"] % HEAD_DIM:
                raise UserError(f"d_model override {overrides['d_model']} must be a multiple of {HEAD_DIM} "
                                f"to derive the heads, or pass n_head as well")
            overrides["n_head"] = overrides["d_model"] // HEAD_DIM
        if "n_head" in overrides and "n_kv_head" not in overrides:
            n_head = overrides["n_head"]
            overrides["n_kv_head"] = n_head // kv_group if n_head % kv_group == 0 else n_head
        kwargs.update(overrides)
        return cls(vocab_size=vocab_size, **kwargs)

    # ---- serialization ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        unknown = sorted(set(data) - _field_names())
        if unknown:
            raise UserError(f"unknown ModelConfig key(s) {unknown}; valid keys: {sorted(_field_names())}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise UserError(f"ModelConfig is missing required key(s) {missing}")
        return cls(**data)


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig)}


def _from_dials(depth: int, width: int, kv_group: int, max_seq_len: int) -> dict:
    """The two dials (plus the kv grouping and context) -> ModelConfig keyword arguments."""
    assert width % HEAD_DIM == 0, width
    n_head = width // HEAD_DIM
    assert n_head % kv_group == 0, (n_head, kv_group)
    return dict(n_layer=depth, d_model=width, n_head=n_head, n_kv_head=n_head // kv_group,
                max_seq_len=max_seq_len, tie_embeddings=True)


# name -> ModelConfig kwargs (all but vocab_size). mlp_hidden is derived from d_model at build time.
PRESETS: dict[str, dict] = {
    # CPU demo and tests: GQA on so the CPU tests exercise the grouped path.
    "tiny": _from_dials(depth=4, width=256, kv_group=2, max_seq_len=256),
    # small draft model for speculative decoding against the bigger presets (same vocab).
    "draft": _from_dials(depth=6, width=384, kv_group=3, max_seq_len=1024),
    # GPT-2 small's shape (12 x 768, 12 heads, T 1024) in the Llama layout; MHA like GPT-2.
    "gpt2-124m": _from_dials(depth=12, width=768, kv_group=1, max_seq_len=1024),
    # GPT-2 medium's shape (24 x 1024, 16 heads).
    "350m": _from_dials(depth=24, width=1024, kv_group=1, max_seq_len=1024),
    # ~1B at vocab 50304; GQA 4:1 as in Llama-3.2-1B.
    "1b": _from_dials(depth=20, width=2048, kv_group=4, max_seq_len=2048),
}
