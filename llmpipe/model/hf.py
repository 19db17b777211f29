"""Our parameter names and config <-> Hugging Face Llama, without importing transformers.

The export step (and the parity test) uses these two functions; the weights themselves are copied
unchanged, since the rotary convention is the same (rotate-half, see gpt.apply_rotary).
"""

from __future__ import annotations

import re

from llmpipe.model.config import ModelConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",  # Qwen3 naming; Llama has no QK-norm
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def hf_llama_name(name: str) -> str:
    """Our state_dict key -> the LlamaForCausalLM key (ValueError for a name we do not know)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"no Hugging Face Llama name for parameter {name!r}")


def llama_incompatibilities(cfg: ModelConfig) -> list[str]:
    """What in `cfg` the Llama layout (Hugging Face LlamaForCausalLM, llama.cpp's `llama`) cannot hold."""
    found = []
    if cfg.qk_norm:
        found.append("QK-norm (qk_norm: true)")
    if cfg.mlp != "swiglu":
        found.append(f"a {cfg.mlp} MLP (mlp: {cfg.mlp}; Llama's is swiglu)")
    if cfg.logit_softcap is not None:
        found.append(f"logit soft-capping (logit_softcap: {cfg.logit_softcap})")
    return found


def hf_llama_config(cfg: ModelConfig) -> dict:
    """Keyword arguments for transformers.LlamaConfig describing the same network (qk_norm excluded:
    Llama has none; such a model exports as Qwen3, whose other fields match these)."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=cfg.init_std,
    )
