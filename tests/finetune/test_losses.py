"""The loss functions: hand-computed values, and DPO's three ways to get the reference agreeing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llmpipe.finetune.losses import DpoLoss, dpo_loss, reference_logprobs, sequence_logprobs
from llmpipe.train.task import lm_loss
from llmpipe.finetune.lora import LoraSettings, apply_lora
from llmpipe.model.config import ModelConfig
from llmpipe.model.gpt import GPT
from tests.helpers import torch_threads

CFG = ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=16)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- hand-computed examples ---------------------------------------------------------------------

def test_dpo_loss_and_metrics_equal_a_hand_computed_example():
    beta = 0.1
    # pair 1: policy chosen -1.0, rejected -2.0; reference -1.5 for both
    #   chosen reward 0.1 * (-1.0 + 1.5) = 0.05, rejected reward 0.1 * (-2.0 + 1.5) = -0.05, margin 0.1
    #   loss -log(sigmoid(0.1)) = 0.6443966600
    # pair 2: policy chosen -3.0, rejected -1.0; reference -2.0 for both
    #   chosen reward -0.1, rejected reward 0.1, margin -0.2, loss -log(sigmoid(-0.2)) = 0.7981388693
    loss, metrics = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]),
                             torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0]), beta)
    expected = -(log_sigmoid(beta * ((-1.0 + 1.5) - (-2.0 + 1.5))) + log_sigmoid(beta * ((-3.0 + 2.0) - (-1.0 + 2.0)))) / 2
    assert expected == pytest.approx((0.6443966600 + 0.7981388693) / 2, abs=1e-9)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["dpo/reward_margin"].item() == pytest.approx((0.1 - 0.2) / 2, abs=1e-6)
    assert metrics["dpo/reward_accuracy"].item() == 0.5  # pair 1 right, pair 2 wrong
    assert metrics["dpo/chosen_reward"].item() == pytest.approx((0.05 - 0.1) / 2, abs=1e-6)
    assert metrics["dpo/rejected_reward"].item() == pytest.approx((-0.05 + 0.1) / 2, abs=1e-6)
    assert metrics["dpo/chosen_logp"].item() == pytest.approx(-2.0)
    assert metrics["dpo/rejected_logp"].item() == pytest.approx(-1.5)
    assert all(not m.requires_grad for m in metrics.values())


def test_sequence_logprobs_sum_only_the_supervised_positions():
    # a 3-token vocabulary; the logits are logs of counts, so the probabilities are simple fractions
    logits = torch.tensor([[1.0, 2.0, 1.0],  # p = 1/4, 1/2, 1/4
                           [1.0, 1.0, 1.0],  # p = 1/3 each
                           [3.0, 1.0, 4.0]]).log()  # p = 3/8, 1/8, 4/8
    logits = logits.expand(3, 3, 3)  # the same 3 positions in 3 rows
    targets = torch.tensor([[1, -100, 2],
                            [0, 2, -100],
                            [-100, -100, -100]])
    expected = [math.log(1 / 2) + math.log(4 / 8), math.log(1 / 4) + math.log(1 / 3), 0.0]
    got = sequence_logprobs(logits, targets)
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_sequence_logprobs_of_bf16_logits_are_computed_in_fp32():
    torch.manual_seed(0)
    logits = (torch.randn(2, 64, 512) * 4).bfloat16()
    targets = torch.randint(0, 512, (2, 64))
    got = sequence_logprobs(logits, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sequence_logprobs(logits.float(), targets), rtol=0, atol=1e-4)


def test_lm_loss_is_the_mean_token_nll_over_supervised_targets():
    torch.manual_seed(0)
    model = GPT(CFG)
    b = dpo_batch(pairs=2)
    loss, metrics = lm_loss(model, b)
    with torch.no_grad():
        logits, _ = model(b["idx"])
    supervised = (b["targets"] != -100).sum()
    torch.testing.assert_close(loss, -sequence_logprobs(logits, b["targets"]).sum() / supervised)
    assert metrics == {}


def test_lm_loss_on_a_packed_row_keeps_each_conversation_to_itself():
    torch.manual_seed(0)
    model = GPT(CFG)
    first, second = torch.randint(0, CFG.vocab_size, (1, 5)), torch.randint(0, CFG.vocab_size, (1, 7))
    alone = {"idx": second[:, :-1], "targets": second[:, 1:]}
    ignored = torch.full((1, 5), -100)  # only the second conversation is supervised
    packed = {"idx": torch.cat((first, second[:, :-1]), dim=1), "targets": torch.cat((ignored, second[:, 1:]), dim=1),
              "segments": torch.tensor([[1] * 5 + [2] * 6])}
    with torch.no_grad():
        expected, _ = lm_loss(model, alone)
        got, _ = lm_loss(model, packed)
        leaky, _ = lm_loss(model, {k: v for k, v in packed.items() if k != "segments"})
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (leaky - expected).abs() > 1e-4  # without the segments the first conversation would leak in


# ---- DPO with a model -----------------------------------------------------------------------------

def dpo_batch(pairs: int = 3, T: int = 12, prompt: int = 4, seed: int = 0) -> dict:
    """2 * pairs rows: chosen then rejected, the same prompt per pair, loss on the response only."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, CFG.vocab_size, (pairs, prompt), generator=g)
    responses = torch.randint(0, CFG.vocab_size, (2 * pairs, T + 1 - prompt), generator=g)
    ids = torch.cat((prompts.repeat(2, 1), responses), dim=1)  # (2B, T + 1)
    targets = ids[:, 1:].clone()
    targets[:, : prompt - 1] = -100  # targets[t] is token t + 1: the first response token is at t = prompt - 1
    targets[pairs - 1, -2:] = -100  # one shorter response: padding carries no loss either
    return {"idx": ids[:, :-1], "targets": targets}


def sft_adapter():
    """(frozen copy of the base, a LoRA model whose adapter was trained a few steps: policy != base)."""
    torch.manual_seed(0)
    base = GPT(CFG)
    reference = copy.deepcopy(base)
    policy = apply_lora(base, LoraSettings())
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(3):
        loss, _ = lm_loss(policy, dpo_batch(seed=seed + 10))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return reference, policy


def loss_and_grads(loss_fn, policy, batch):
    loss, metrics = loss_fn(policy, batch)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, trainable)
    return loss.detach(), metrics, grads


def test_cached_disabled_adapter_and_frozen_module_references_give_the_same_loss_and_gradients():
    reference, policy = sft_adapter()
    b = dpo_batch()
    cached = dict(b, ref_logp=reference_logprobs(policy, b, "disable_adapter"))
    results = [loss_and_grads(DpoLoss(0.1, "cached"), policy, cached),
               loss_and_grads(DpoLoss(0.1, "disable_adapter"), policy, b),
               loss_and_grads(DpoLoss(0.1, reference), policy, b)]
    first_loss, first_metrics, first_grads = results[0]
    assert first_metrics["dpo/chosen_reward"].abs() > 1e-4  # the policy really differs from its reference
    assert not math.isclose(first_loss.item(), math.log(2), abs_tol=1e-5)
    for loss, metrics, grads in results[1:]:
        torch.testing.assert_close(loss, first_loss, rtol=0, atol=1e-6)
        for name in first_metrics:
            torch.testing.assert_close(metrics[name], first_metrics[name], rtol=0, atol=1e-6)
        for g, g0 in zip(grads, first_grads):
            torch.testing.assert_close(g, g0, rtol=0, atol=1e-6)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())


def test_a_fresh_adapter_is_its_own_reference_loss_log_2():
    torch.manual_seed(0)
    policy = apply_lora(GPT(CFG), LoraSettings())  # B = 0: the adapted model is the base
    loss, metrics = DpoLoss(0.1, "disable_adapter")(policy, dpo_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["dpo/reward_margin"].item() == 0.0
    assert metrics["dpo/reward_accuracy"].item() == 0.0


def test_the_reference_is_found_inside_a_ddp_style_wrapper():
    class Wrapper(torch.nn.Module):  # DDP keeps the wrapped model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    _, policy = sft_adapter()
    b = dpo_batch()
    direct, _ = DpoLoss(0.1, "disable_adapter")(policy, b)
    wrapped, _ = DpoLoss(0.1, "disable_adapter")(Wrapper(policy), b)
    assert torch.equal(direct, wrapped)
    with pytest.raises(ValueError, match="frozen reference module"):
        DpoLoss(0.1, "disable_adapter")(GPT(CFG), b)


def test_the_first_half_of_the_rows_are_the_chosen_responses():
    _, policy = sft_adapter()
    b = dpo_batch(pairs=3)
    with torch.no_grad():
        policy_logp = sequence_logprobs(policy(b["idx"])[0], b["targets"])  # (6,)
    # a reference 1 nat below the policy on rows 0..2 and 1 nat above on rows 3..5: chosen reward +beta,
    # rejected reward -beta, margin 2 * beta on every pair
    shift = torch.tensor([-1.0] * 3 + [1.0] * 3)
    loss, metrics = DpoLoss(0.1, "cached")(policy, dict(b, ref_logp=policy_logp + shift))
    assert metrics["dpo/reward_margin"].item() == pytest.approx(0.2, abs=1e-5)
    assert metrics["dpo/reward_accuracy"].item() == 1.0
    assert metrics["dpo/chosen_logp"].item() == pytest.approx(policy_logp[:3].mean().item(), abs=1e-5)
    assert loss.item() == pytest.approx(-log_sigmoid(0.2), abs=1e-5)


def test_a_cached_reference_needs_ref_logp_in_the_batch():
    _, policy = sft_adapter()
    with pytest.raises(ValueError, match="ref_logp"):
        DpoLoss(0.1, "cached")(policy, dpo_batch())


def test_a_few_dpo_steps_raise_the_margin_on_their_pairs():
    _, policy = sft_adapter()
    loss_fn = DpoLoss(0.5, "disable_adapter")
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    b = dpo_batch()
    _, start = loss_fn(policy, b)
    for _ in range(10):
        loss, _ = loss_fn(policy, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _, end = loss_fn(policy, b)
    assert end["dpo/reward_margin"] > start["dpo/reward_margin"] + 0.1
    assert end["dpo/reward_accuracy"] == 1.0
