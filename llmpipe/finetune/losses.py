"""The DPO loss the Trainer plugs in (the next-token loss of pretraining and SFT is llmpipe.train.task.lm_loss).

A `LossFn` takes the network the Trainer steps (maybe wrapped by DDP or torch.compile) and one
micro-batch, and returns (scalar loss, named detached metrics). Targets follow the pretraining
convention: `targets[t]` is the token at t + 1, -100 where no loss is taken (prompt, padding).

A DPO micro-batch is {"idx": (2B, T), "targets": (2B, T)}: rows 0..B-1 are prompt + chosen, rows
B..2B-1 the same prompts + rejected, targets -100 outside the response; plus "ref_logp": (2B,) when
the reference log-probs were computed once and cached.

torch only, like llmpipe.model and llmpipe.train: the loss runs on a bare GPU node.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmpipe.train.task import IGNORE

# "cached": the batch carries ref_logp; "disable_adapter": the policy is a peft model and the reference
# is the same model with its adapter off (no second copy); a module: a frozen copy (full fine-tune).
Reference = Literal["cached", "disable_adapter"] | nn.Module


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (N, T, V), targets (N, T) -> (N,): sum of log p(target) over positions where target != -100.

    The log-softmax runs in fp32: in bf16 a response's summed log-prob loses the small differences
    between chosen and rejected that DPO learns from.
    """
    N, T, V = logits.shape
    # cross_entropy with reduction="none" is -log p(target) per position and exactly 0 at ignored ones
    nll = F.cross_entropy(logits.float().reshape(N * T, V), targets.reshape(N * T), ignore_index=IGNORE,
                          reduction="none")  # (N*T,)
    return -nll.view(N, T).sum(dim=1)  # (N,)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss over B pairs of summed response log-probs, each (B,).

    Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
    (NeurIPS 2023, arXiv:2305.18290), eq. 7:
        L = -E[ log sigmoid( beta * (log pi(y_w|x) - log ref(y_w|x)) - beta * (log pi(y_l|x) - log ref(y_l|x)) ) ]
    The implicit reward of a response is beta * (policy logp - reference logp); the reward margin is
    chosen reward - rejected reward, and accuracy the share of pairs where it is positive.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_reward = beta * (policy_rejected - ref_rejected)  # (B,)
    margin = chosen_reward - rejected_reward  # (B,)
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "dpo/reward_margin": margin.mean(),
        "dpo/reward_accuracy": (margin > 0).float().mean(),
        "dpo/chosen_reward": chosen_reward.mean(),
        "dpo/rejected_reward": rejected_reward.mean(),
        "dpo/chosen_logp": policy_chosen.mean(),
        "dpo/rejected_logp": policy_rejected.mean(),
    }
    return loss, {name: value.detach() for name, value in metrics.items()}


def _peft_model(net: nn.Module) -> nn.Module:
    """The peft model inside `net` (through torch.compile's _orig_mod and DDP's module)."""
    module = net
    while not hasattr(module, "disable_adapter"):
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if inner is None:
            raise ValueError(f"reference 'disable_adapter' needs a peft (LoRA) model, got {type(net).__name__}; "
                             f"for a full fine-tune pass a frozen reference module instead")
        module = inner
    return module


@torch.no_grad()
def reference_logprobs(net: nn.Module, batch: dict, reference: Reference) -> torch.Tensor:
    """(2B,) summed response log-probs of the reference model on a DPO batch; what the cache stores."""
    if isinstance(reference, nn.Module):
        logits, _ = reference(batch["idx"])
    elif reference == "cached":
        if "ref_logp" not in batch:
            raise ValueError("DpoLoss(reference='cached') got a batch without 'ref_logp': the batch source "
                             "must attach the cached reference log-probs, or use another reference")
        return batch["ref_logp"].float()
    elif reference == "disable_adapter":
        peft_model = _peft_model(net)
        with peft_model.disable_adapter():
            logits, _ = peft_model(batch["idx"])
    else:
        raise ValueError(f"unknown DPO reference {reference!r}: use 'cached', 'disable_adapter' or a module")
    return sequence_logprobs(logits, batch["targets"])


class DpoLoss:
    """A LossFn for DPO batches with a fixed `beta` and a reference (see `Reference`).

    A module given as the reference is frozen here (no grads, eval mode): it is the SFT weights DPO
    measures the policy against, never trained.
    """

    def __init__(self, beta: float, reference: Reference):
        if isinstance(reference, nn.Module):
            reference.requires_grad_(False).eval()
        elif reference not in ("cached", "disable_adapter"):
            raise ValueError(f"unknown DPO reference {reference!r}: use 'cached', 'disable_adapter' or a module")
        self.beta = beta
        self.reference = reference

    def __call__(self, net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx, targets = batch["idx"], batch["targets"]
        if idx.shape[0] % 2:
            raise ValueError(f"a DPO batch holds chosen rows then rejected rows, got an odd row count {idx.shape[0]}")
        ref = reference_logprobs(net, batch, self.reference)  # (2B,)
        logits, _ = net(idx)  # (2B, T, V)
        policy = sequence_logprobs(logits, targets)  # (2B,)
        B = idx.shape[0] // 2
        return dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], self.beta)
