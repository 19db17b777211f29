import logging
import math

import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.model import attention
from llmpipe.model.attention import causal_attention, flash_attn_available, resolve_backend


def naive_attention(q, k, v):
    """Loop over heads and query positions: the definition, with query head h reading kv head h // group."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    out = torch.empty_like(q)
    for h in range(H):
        kh, vh = k[:, h // group], v[:, h // group]  # (B, T, D)
        for t in range(T):
            w = torch.softmax(q[:, h, t : t + 1] @ kh[:, : t + 1].transpose(-2, -1) / math.sqrt(D), dim=-1)
            out[:, h, t] = (w @ vh[:, : t + 1])[:, 0]
    return out


@pytest.mark.parametrize("n_kv", [6, 3, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("T", [1, 13])  # 13: not a multiple of any block size
def test_cpu_backends_agree_with_the_definition(n_kv, T):
    torch.manual_seed(0)
    q = torch.randn(2, 6, T, 16)
    k, v = torch.randn(2, n_kv, T, 16), torch.randn(2, n_kv, T, 16)
    expected = naive_attention(q, k, v)
    for backend in ("sdpa", "math", "auto"):
        out = causal_attention(q, k, v, backend)
        assert out.shape == (2, 6, T, 16)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=backend)


def test_cpu_backends_agree_on_gradients_and_bf16():
    torch.manual_seed(1)
    base = [torch.randn(2, n, 21, 32) for n in (8, 2, 2)]
    grads = {}
    for backend in ("sdpa", "math"):
        q, k, v = (t.clone().requires_grad_() for t in base)
        causal_attention(q, k, v, backend).square().sum().backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    for a, b in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    half = [t.bfloat16() for t in base]
    torch.testing.assert_close(causal_attention(*half, "sdpa").float(), causal_attention(*half, "math").float(),
                               atol=2e-2, rtol=2e-2)


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("math", "cpu") == "math"
    with pytest.raises(UserError, match="flash_attn, sdpa, math"):
        resolve_backend("xformers", "cpu")
    with pytest.raises(UserError, match="flash_attn"):
        resolve_backend("flash_attn", "cpu")  # not installed, or installed but CPU: both refused


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed here")
def test_missing_flash_attn_says_how_to_install():
    with pytest.raises(UserError, match="pip install flash-attn"):
        resolve_backend("flash_attn", "cuda")


def test_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(attention, "_logged", set())
    with caplog.at_level(logging.INFO, logger="llmpipe.model"):
        for _ in range(3):
            resolve_backend("auto", "cpu")
    assert [r.getMessage() for r in caplog.records] == ["attention backend: sdpa (asked for 'auto' on cpu)"]
