"""The optimizer plan: Muon for the blocks' matrices and AdamW for the rest, on one schedule, resumable."""

import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig
from llmpipe.train import optim
from tests.train.test_loop import small_trainer

SETTINGS = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, muon_lr=0.02, muon_momentum=0.95,
                device=torch.device("cpu"))


@pytest.mark.parametrize("tie", [True, False])
def test_muon_gets_the_block_matrices_and_adamw_everything_else_once(tie):
    model = GPT(ModelConfig.from_preset("tiny", 128, n_layer=2, d_model=64, tie_embeddings=tie))
    opt = optim.build(model, optimizer="muon", **SETTINGS)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    in_adamw = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # each parameter exactly once
    assert len(in_muon) == 2 * 7 and all(n.startswith("layers.") for n in in_muon)
    assert "tok_embeddings.weight" in in_adamw and ("lm_head.weight" in in_adamw) == (not tie)
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.95 for g in muon.param_groups)
    opt.scale_lr(0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01] + [1.5e-3] * len(adamw.param_groups)


def test_muon_with_only_adapters_trainable_is_refused():
    model = GPT(ModelConfig.from_preset("tiny", 128, n_layer=1, d_model=64))
    for name, p in model.named_parameters():
        p.requires_grad_(name == "norm.weight")
    with pytest.raises(UserError, match="use optimizer: adamw"):
        optim.build(model, optimizer="muon", **SETTINGS)
    with pytest.raises(UserError, match="optimizer 'sgd' is not one of adamw, muon"):
        optim.build(model, optimizer="sgd", **SETTINGS)


def test_a_muon_run_learns_follows_the_schedule_and_resumes_to_the_same_weights(tmp_path):
    straight = small_trainer(tmp_path / "a", optimizer="muon")
    first = straight.train_step()["train/loss"]
    muon_group = straight.opt.optimizers[0].param_groups[0]
    assert muon_group["lr"] == pytest.approx(0.02 * straight.schedule.lr_at(0) / 3e-3)
    straight.fit()
    assert straight.last["train/loss"] < first - 0.2  # 12 steps: 5.55 -> 5.30
    crashing = small_trainer(tmp_path / "b", optimizer="muon")
    step = crashing.train_step
    crashing.train_step = lambda: step() if crashing.step < 9 else (_ for _ in ()).throw(RuntimeError("power cut"))
    with pytest.raises(RuntimeError, match="power cut"):
        crashing.fit()  # after the checkpoint at step 8: Muon's momentum buffers and AdamW's moments
    resumed = small_trainer(tmp_path / "b", optimizer="muon")
    assert resumed.resume() == 8
    assert resumed.opt.state[resumed.model.layers[0].attn.wq.weight]["momentum_buffer"].abs().sum() > 0
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("nesterov", [True, False])
def test_our_muon_in_bf16_is_torchs_muon_bit_for_bit_and_fp32_is_close(nesterov):
    torch.manual_seed(0)
    weights = [torch.randn(48, 16), torch.randn(16, 16), torch.randn(16, 40)]  # tall, square, wide
    runs = {}
    for name, make in {"torch": lambda ps: torch.optim.Muon(ps, lr=0.02, nesterov=nesterov),
                       "bf16": lambda ps: optim.Muon(ps, ns_dtype=torch.bfloat16, lr=0.02, nesterov=nesterov),
                       "fp32": lambda ps: optim.Muon(ps, ns_dtype=torch.float32, lr=0.02, nesterov=nesterov)}.items():
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = make(params)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):  # the momentum buffer matters from the second step on
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs[name] = [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
    for a, b in zip(runs["torch"], runs["bf16"]):
        assert torch.equal(a, b)
    for a, b in zip(runs["torch"], runs["fp32"]):
        torch.testing.assert_close(a, b, atol=3e-3, rtol=0)  # bf16 keeps ~3 digits of the update
    assert any(not torch.equal(a, b) for a, b in zip(runs["torch"], runs["fp32"]))  # fp32 really ran
