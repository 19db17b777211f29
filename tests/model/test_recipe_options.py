"""The model's recipe options (issue 15): each builds, counts its parameters, trains, and does what it says."""

import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig
from llmpipe.model.hf import llama_incompatibilities

V = 97


def small(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("options", [
    {"mlp": "relu2"}, {"logit_softcap": 15.0}, {"zero_init_proj": True}, {"tie_embeddings": False},
    {"qk_norm": True}, {"mlp": "relu2", "logit_softcap": 30.0, "zero_init_proj": True, "tie_embeddings": False},
], ids=lambda o: "+".join(o))
def test_each_option_counts_its_parameters_and_learns_a_batch(options):
    torch.manual_seed(0)
    model = GPT(small(**options))
    assert model.num_params() == model.config.num_params()
    idx = torch.randint(0, V, (4, 17))
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-2)
    losses = []
    for _ in range(40):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]  # from ln(97) = 4.6


def test_relu2_mlp_has_two_matrices_four_times_wide():
    model = GPT(small(mlp="relu2"))
    mlp = model.layers[0].mlp
    assert mlp.w_gate is None and mlp.w_up.weight.shape == (4 * 64, 64) and mlp.w_down.weight.shape == (64, 4 * 64)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(mlp(x), mlp.w_down(torch.relu(mlp.w_up(x)) ** 2))
    with pytest.raises(UserError, match="mlp 'gelu' is not one of swiglu, relu2"):
        small(mlp="gelu")


def test_softcap_bounds_the_logits_and_is_tanh_of_the_plain_ones():
    torch.manual_seed(0)
    plain = GPT(small())
    capped = GPT(small(logit_softcap=2.0))
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.lm_head.weight.mul_(50)  # large logits, where the cap bites
        capped.lm_head.weight.copy_(plain.lm_head.weight)
    idx = torch.randint(0, V, (2, 8))
    raw, got = plain(idx)[0], capped(idx)[0]
    assert raw.abs().max() > 10 and got.abs().max() <= 2.0
    torch.testing.assert_close(got, 2.0 * torch.tanh(raw / 2.0))
    with pytest.raises(UserError, match="logit_softcap must be > 0"):
        small(logit_softcap=0.0)


def test_zero_init_makes_every_block_the_identity_at_step_0():
    torch.manual_seed(0)
    model = GPT(small(zero_init_proj=True))
    for block in model.layers:
        assert not block.attn.wo.weight.any() and not block.mlp.w_down.weight.any()
        x = torch.randn(1, 5, 64)
        cos, sin = model.rope_cos[:5], model.rope_sin[:5]
        torch.testing.assert_close(block(x, cos, sin), x)
    # the other weights still get a gradient through the residual stream, so training can start
    idx = torch.randint(0, V, (2, 9))
    model(idx, idx)[1].backward()
    assert model.layers[0].attn.wo.weight.grad.abs().sum() > 0


def test_options_outside_the_llama_layout_are_named_for_the_exports():
    assert llama_incompatibilities(small()) == [] and llama_incompatibilities(small(tie_embeddings=False)) == []
    found = llama_incompatibilities(small(mlp="relu2", logit_softcap=30.0, qk_norm=True))
    assert len(found) == 3 and "mlp: relu2" in found[1] and "logit_softcap: 30.0" in found[2]


def test_presets_take_the_options_as_overrides():
    cfg = ModelConfig.from_preset("tiny", 4096, mlp="relu2", zero_init_proj=True)
    assert cfg.mlp_hidden == 4 * 256 and cfg.zero_init_proj
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
