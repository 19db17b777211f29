"""Incremental decoding: the KV cache, rotary offsets, Lq != Lk attention and left-padding masks.

The reference for every test is the cacheless forward over the whole sequence, the training path:
a cached forward must give the same logits (fp32, within 1e-5) however the tokens were fed.
"""

import logging

import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig, attention
from llmpipe.model.attention import masked_attention, resolve_masked_backend

V = 97
BACKENDS = ["sdpa", "math", "auto"]  # those that run on CPU; auto is sdpa here
SHAPES = {
    "gqa": dict(n_head=4, n_kv_head=2),
    "mha_qk_norm": dict(n_head=4, n_kv_head=4, qk_norm=True),
}
TOL = dict(atol=1e-5, rtol=1e-5)


def model_for(backend: str, shape: str, max_seq_len: int = 32) -> GPT:
    torch.manual_seed(0)
    # a larger init than training's so logits are far from uniform and a wrong position shows
    cfg = ModelConfig(vocab_size=V, n_layer=2, d_model=64, max_seq_len=max_seq_len, attn_backend=backend,
                      init_std=0.1, **SHAPES[shape])
    return GPT(cfg).eval()


def full_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the cacheless forward over the whole sequence (B, V)."""
    return model(ids)[0][:, -1]


def greedy_recompute(model: GPT, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ids, per_step = prompt, []
    for _ in range(steps):
        logits = full_logits(model, ids)
        per_step.append(logits)
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
    return ids, per_step


def greedy_cached(model: GPT, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cache = model.new_cache(prompt.shape[0])
    logits = model(prompt, cache=cache, logits_to_keep=1)[0][:, -1]
    ids, per_step = prompt, []
    for step in range(steps):
        if step:
            logits = model(ids[:, -1:], cache=cache, logits_to_keep=1)[0][:, -1]
        per_step.append(logits)
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
    return ids, per_step


@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_with_the_cache_equals_greedy_recomputing_everything(backend, shape):
    model = model_for(backend, shape)
    prompt = torch.randint(0, V, (2, 5))
    expected, expected_logits = greedy_recompute(model, prompt, 20)
    got, got_logits = greedy_cached(model, prompt, 20)
    for step, (a, b) in enumerate(zip(got_logits, expected_logits)):
        torch.testing.assert_close(a, b, **TOL, msg=f"step {step}")
    assert torch.equal(got, expected)
    assert torch.equal(model.generate(prompt, 20, temperature=0), expected)  # what training samples use


@torch.no_grad()
def test_generate_past_max_seq_len_sees_the_last_window_like_a_cacheless_loop():
    model = model_for("sdpa", "gqa", max_seq_len=12)
    prompt = torch.randint(0, V, (2, 5))
    ids = prompt
    for _ in range(20):  # the old loop: crop to the window, recompute it
        ids = torch.cat((ids, full_logits(model, ids[:, -12:]).argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(model.generate(prompt, 20, temperature=0), ids)


@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_left_padded_batch_decodes_like_each_prompt_alone(backend, shape):
    model = model_for(backend, shape)
    prompts = [torch.randint(1, V, (n,)) for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)  # pad id 0, on the left
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):], mask[row, width - len(p):] = p, True
    cache = model.new_cache(len(prompts))
    logits = model(batch, cache=cache, attention_mask=mask)[0]
    assert torch.isfinite(logits).all()  # pad query rows too: garbage, but no nan to spread
    logits, steps = logits[:, -1], []
    for step in range(6):
        nxt = logits.argmax(-1, keepdim=True)
        steps.append(nxt)
        logits = model(nxt, cache=cache)[0][:, -1]
    generated = torch.cat(steps, dim=1)
    for row, p in enumerate(prompts):
        alone, alone_logits = greedy_recompute(model, p[None], 7)
        assert torch.equal(generated[row], alone[0, len(p):len(p) + 6]), f"prompt {row}"
        torch.testing.assert_close(logits[row], alone_logits[6][0], **TOL)
    assert cache.lengths.tolist() == [len(p) + 6 for p in prompts]


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_truncating_the_cache_then_redecoding_matches_never_having_gone_past(backend):
    model = model_for(backend, "gqa")
    prompt = torch.randint(0, V, (1, 6))
    seq, _ = greedy_recompute(model, prompt, 10)  # 16 tokens
    cache = model.new_cache(1)
    model(seq[:, :14], cache=cache)  # went 8 tokens past the point we roll back to
    cache.truncate(9)
    assert cache.lengths.tolist() == [9] and cache.end == 9
    # re-decode a chunk at once (Lq = 4 queries, Lk = 13 keys), as a speculative verifier does
    chunk = model(seq[:, 9:13], cache=cache)[0]
    expected = model(seq[:, :13])[0][:, 9:13]
    torch.testing.assert_close(chunk, expected, **TOL)
    for t in (13, 14, 15):
        step = model(seq[:, t:t + 1], cache=cache)[0][:, -1]
        torch.testing.assert_close(step, full_logits(model, seq[:, :t + 1]), **TOL)


@torch.no_grad()
def test_rows_truncated_to_different_lengths_continue_from_their_own_positions():
    model = model_for("sdpa", "mha_qk_norm")
    seqs = torch.randint(0, V, (2, 12))
    cache = model.new_cache(2)
    model(seqs[:, :10], cache=cache)
    cache.truncate(torch.tensor([10, 6]))  # row 1 rejected its last 4 tokens; row 0 keeps all
    assert cache.lengths.tolist() == [10, 6]
    nxt = torch.stack([seqs[0, 10:12], seqs[1, 6:8]])  # each row's own continuation
    got = model(nxt, cache=cache)[0]
    torch.testing.assert_close(got[0], model(seqs[:1, :12])[0][0, 10:12], **TOL)
    rolled_back = torch.cat((seqs[1, :6], seqs[1, 6:8]))[None]
    torch.testing.assert_close(got[1], model(rolled_back)[0][0, 6:8], **TOL)


def test_a_full_cache_and_a_too_long_cache_are_refused():
    model = model_for("sdpa", "gqa", max_seq_len=8)
    with pytest.raises(UserError, match="max_seq_len"):
        model.new_cache(1, max_len=9)
    cache = model.new_cache(1, max_len=6)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(UserError, match="holds 6 tokens; 4 used, 3 more do not fit"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_masked_attention_backends_agree_and_flash_is_not_one_of_them():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.rand(2, 1, 3, 9) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    torch.testing.assert_close(masked_attention(q, k, v, mask, "sdpa"), masked_attention(q, k, v, mask, "math"),
                               **TOL)
    with pytest.raises(UserError, match="sdpa or math"):
        masked_attention(q, k, v, mask, "flash_attn")


def test_auto_on_cuda_with_flash_attn_decodes_with_sdpa_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(attention, "_flash_attn_func", object())  # "installed": only resolution is exercised
    monkeypatch.setattr(attention, "_logged", set())
    with caplog.at_level(logging.INFO, logger="llmpipe.model"):
        assert resolve_masked_backend("auto", "cuda") == "sdpa"
        assert resolve_masked_backend("flash_attn", "cuda") == "sdpa"
    assert "flash_attn has no per-key padding mask" in caplog.text
    assert resolve_masked_backend("math", "cpu") == "math"
