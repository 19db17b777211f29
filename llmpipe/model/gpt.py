"""The GPT: a decoder-only transformer in the Llama layout.

Pre-norm RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP, no biases,
optional tied embeddings and optional QK-norm. Recipe options outside the Llama layout (a relu^2
MLP, logit soft-capping) train and generate here but do not export to Hugging Face or GGUF.
Read top to bottom: RMSNorm, rotary, Attention,
MLP, Block, GPT.

Parameter names map one to one onto Hugging Face `LlamaForCausalLM` (see `hf.py`), with no
reshaping or permutation of any weight, because our rotary uses the same rotate-half convention:

    tok_embeddings.weight            model.embed_tokens.weight
    layers.N.attn_norm.weight        model.layers.N.input_layernorm.weight
    layers.N.attn.wq/wk/wv/wo.weight model.layers.N.self_attn.q_proj/k_proj/v_proj/o_proj.weight
    layers.N.attn.q_norm/k_norm      model.layers.N.self_attn.q_norm/k_norm (Qwen3 names; qk_norm only)
    layers.N.mlp_norm.weight         model.layers.N.post_attention_layernorm.weight
    layers.N.mlp.w_gate/w_up/w_down  model.layers.N.mlp.gate_proj/up_proj/down_proj.weight
    norm.weight                      model.norm.weight
    lm_head.weight                   lm_head.weight (the same tensor as tok_embeddings when tied)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmpipe.errors import UserError
from llmpipe.model.attention import (causal_attention, masked_attention, masked_backend_name, resolve_backend,
                                     resolve_masked_backend, segment_mask)
from llmpipe.model.cache import KVCache
from llmpipe.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 like HF Llama (bf16 mean-of-squares loses digits), cast back after the scale
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim / 2), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by position. Rotate-half convention (HF Llama): dimension i pairs with
    i + D/2, not with its neighbour i + 1 as in the original RoFormer/Meta code.

    cos/sin are (T, D/2), the same positions for every row (training), or (B, T, D/2), each row's own
    positions (decoding: a row's offset in the cache, left padding)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
    rows = None if cos.ndim == 2 else slice(None)  # (1, T, 1, D/2) or (B, T, 1, D/2)
    cos = cos[rows, :, None, :].to(x.dtype)
    sin = sin[rows, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, T, H, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.backend = cfg.attn_backend
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cached: "_Cached | None" = None,
                layer: int = 0, packed: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
        if packed is not None:  # (B, 1, T, T) causal within each packed conversation
            y = masked_attention(q, k, v, packed, masked_backend_name(self.backend))  # (B, H, T, D)
        elif cached is None:
            y = causal_attention(q, k, v, self.backend)  # (B, H, T, D)
        else:  # the new tokens against everything cached so far, themselves included
            k, v = cached.cache.write(layer, cached.start, k, v)  # (B, Hkv, S, D)
            y = masked_attention(q, k, v, cached.mask, cached.backend)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.wo(y)  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x); relu2: w_down(relu(w_up x)^2), no gate (Primer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False) if cfg.mlp == "swiglu" else None
        self.w_up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w_down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate is None:
            return self.w_down(F.relu(self.w_up(x)).square())  # (B, T, F) -> (B, T, C)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # (B, T, F) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cached: "_Cached | None" = None,
                layer: int = 0, packed: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cached, layer, packed)
        return x + self.mlp(self.mlp_norm(x))


class _Cached:
    """What every layer of one cached forward shares: the cache, the first slot written, the mask, the backend."""

    def __init__(self, cache: KVCache, start: int, mask: torch.Tensor, backend: str):
        self.cache, self.start, self.mask, self.backend = cache, start, mask, backend


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # Rotary tables are derived, not learned: not saved in checkpoints (persistent=False).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the rotary tables in place.

        Call it after `to_empty(device=...)` when the model was built on the meta device (FSDP).
        Weights ~ N(0, init_std); the two projections that write into the residual stream (wo, w_down)
        use init_std / sqrt(2 * n_layer) so the residual's variance does not grow with depth (GPT-2),
        or start at zero with `zero_init_proj` (every block then starts as the identity, and the
        gradient still reaches the other weights through the residual stream).
        """
        cfg = self.config
        device = self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if p.ndim == 1:  # norm gains
                nn.init.ones_(p)
            elif name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
                if cfg.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=cfg.init_std)

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (default and limit: max_seq_len)."""
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= cfg.max_seq_len:
            raise UserError(f"KV cache length {max_len} must be in 1..max_seq_len ({cfg.max_seq_len}): "
                            f"rotary positions beyond max_seq_len were never trained")
        weight = self.tok_embeddings.weight
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim, dtype or weight.dtype, weight.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        loss is the mean cross-entropy over targets != -100 (the ignore index that fine-tuning uses to
        mask prompt tokens); a batch whose targets are all -100 gives nan.

        Decoding: with `cache`, idx are the next tokens after what the cache holds (rotary positions
        continue each row's count, attention covers the cache and idx, causal within idx) and their
        keys/values are appended to it. `attention_mask` (B, T), False at padding (left padding of a
        batch of prompts), implies a fresh cache when none is given. `logits_to_keep` n > 0 computes
        the logits of the last n positions only (decoding needs the last one, not the whole prompt's);
        targets, if given, must then cover those n positions.

        Packed training rows: `segments` (B, T) long, 0 at padding and 1..n for the conversation each
        token belongs to; attention is then causal AND within one segment, so each conversation's
        logits are those it would get alone. Positions do not restart at a segment's start: rotary
        scores depend only on the distance between query and key, which is the same wherever a
        conversation sits in the row (and max_seq_len bounds the row, so the tables cover it).
        """
        if segments is not None and (cache is not None or attention_mask is not None):
            raise UserError("GPT.forward: `segments` (packed training rows) cannot be combined with a KV cache "
                            "or attention_mask; pass one or the other")
        if cache is not None or attention_mask is not None:
            return self._forward_cached(idx, targets, cache, attention_mask, logits_to_keep)
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise UserError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        packed = None
        if segments is not None:
            if segments.shape != idx.shape:
                raise UserError(f"GPT.forward: segments {tuple(segments.shape)} must have the shape of idx "
                                f"{tuple(idx.shape)}")
            if not torch.compiler.is_compiling():
                resolve_masked_backend(self.config.attn_backend, idx.device)
            packed = segment_mask(segments)  # (B, 1, T, T), shared by every layer
        elif not torch.compiler.is_compiling():  # validate the backend and log the choice once, eagerly
            resolve_backend(self.config.attn_backend, idx.device)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        x = self.tok_embeddings(idx)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin, packed=packed)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self._head(x, targets)

    def _forward_cached(self, idx: torch.Tensor, targets: torch.Tensor | None, cache: KVCache | None,
                        attention_mask: torch.Tensor | None, logits_to_keep: int
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if cache is None:
            cache = self.new_cache(B, T)
        backend = resolve_masked_backend(self.config.attn_backend, idx.device)
        positions, mask, start = cache.append(B, T, attention_mask)
        cached = _Cached(cache, start, mask, backend)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, D/2)
        x = self.tok_embeddings(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cached, i)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self._head(x, targets)

    def _head(self, x: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if self.config.logit_softcap is not None:  # smooth bound |logit| < cap (in fp32: tanh saturates early in bf16)
            cap = self.config.logit_softcap
            logits = (cap * torch.tanh(logits.float() / cap)).to(logits.dtype)
        if targets is None:
            return logits, None
        B, T = targets.shape
        # cross_entropy runs in fp32 under autocast; -100 positions contribute nothing
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights once). exclude_embeddings drops tok_embeddings and, when
        untied, lm_head: the "non-embedding" count."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay the 2-D matmul weights (incl. an untied lm_head); no decay for norm
        gains and the token embedding (which, when tied, is also the lm_head: it is not decayed).

        Frozen parameters (requires_grad False: the base weights under LoRA) are left out: the optimizer
        is for what trains. In it they would enter the checkpointed optimizer state, and any grad they
        were handed (a zeroed one included) would let decoupled weight decay shrink weights meant to stay."""
        embedding = self.tok_embeddings.weight
        decay, no_decay = [], []
        for p in self.parameters():  # shared tensors appear once
            if not p.requires_grad:
                continue
            (decay if p.ndim == 2 and p is not embedding else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, eos_id: int | None = None) -> torch.Tensor:
        """Sample max_new_tokens after idx (B, T); returns (B, T + n). temperature 0 is greedy. With
        eos_id, a row that produced it keeps emitting eos_id and generation stops early once every row has.

        Uses a KV cache: one forward over the prompt, then one token per step. Once the context fills
        max_seq_len, each step recomputes the last max_seq_len tokens from scratch (the window a
        cacheless loop would see), since rotary positions cannot slide inside a cache."""
        if max_new_tokens <= 0:
            return idx
        window = self.config.max_seq_len
        cache = self.new_cache(idx.shape[0])
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        logits, _ = self(idx[:, -window:], cache=cache, logits_to_keep=1)
        for step in range(max_new_tokens):
            if step:
                if cache.end == window:  # full: start over on the last `window` tokens
                    cache.reset()
                    logits, _ = self(idx[:, -window:], cache=cache, logits_to_keep=1)
                else:
                    logits, _ = self(idx[:, -1:], cache=cache, logits_to_keep=1)
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            if eos_id is not None:
                nxt = nxt.masked_fill(finished[:, None], eos_id)
                finished |= nxt[:, 0] == eos_id
            idx = torch.cat((idx, nxt), dim=1)
            if eos_id is not None and bool(finished.all()):
                break
        return idx
