"""Our GPT against Hugging Face's own Llama (and Qwen3 for QK-norm), weights copied by name only.

Equal logits prove the rotary convention matches (rotate-half), so export needs no permutation. Every
weight is random, norm gains included: with gains left at 1.0, two swapped norms would give the same
logits and a wrong name map would pass.
"""

import pytest
import torch

from llmpipe.model import GPT, ModelConfig
from llmpipe.model.hf import hf_llama_config, hf_llama_name

import transformers  # noqa: E402  (a test dependency: a missing install must fail, not skip)


def _randomize(model: GPT) -> None:
    """Random values in every parameter: matrices around the init scale, norm gains in [0.5, 1.5]."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm gains
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)
    for name, p in model.named_parameters():
        assert p.unique().numel() > p.numel() // 2, f"{name} is not random"


def _copy_into(hf_model, model: GPT) -> None:
    ours = {hf_llama_name(name): tensor for name, tensor in model.state_dict().items()}
    theirs = hf_model.state_dict()
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    hf_model.load_state_dict(ours, strict=True)  # copies values; shapes must match exactly


def _logits_match(hf_model, model: GPT, vocab: int, seq_len: int) -> None:
    torch.manual_seed(1)
    idx = torch.randint(0, vocab, (2, seq_len))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf_model(idx).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [
    # GQA, tied, a non-default rope_theta, full context
    ModelConfig(vocab_size=101, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=48, rope_theta=500.0),
    # MHA, untied, math attention
    ModelConfig(vocab_size=64, n_layer=3, n_head=2, d_model=48, max_seq_len=40, tie_embeddings=False,
                attn_backend="math", norm_eps=1e-6),
], ids=["gqa-tied", "mha-untied"])
def test_logits_match_llama(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    _randomize(model)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(cfg))).eval()
    _copy_into(hf, model)
    _logits_match(hf, model, cfg.vocab_size, cfg.max_seq_len)


def test_logits_match_qwen3_with_qk_norm():
    cfg = ModelConfig(vocab_size=80, n_layer=2, n_head=4, n_kv_head=1, d_model=64, max_seq_len=24, qk_norm=True)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    _randomize(model)
    kwargs = {k: v for k, v in hf_llama_config(cfg).items() if k != "mlp_bias"}
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kwargs)).eval()
    _copy_into(hf, model)
    _logits_match(hf, model, cfg.vocab_size, cfg.max_seq_len)


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="wte"):
        hf_llama_name("transformer.wte.weight")
