"""The training loop's optimizer: AdamW, or Muon for the blocks' matrices and AdamW for the rest.

Muon (torch.optim.Muon, Keller Jordan's) orthogonalizes each 2-D update by a Newton-Schulz iteration,
so every direction of a matrix moves at the same rate. It suits the hidden matrices only; the token
embedding (a lookup), an untied lm_head (an output layer) and the norm gains keep AdamW, as in the
speedrun recipes:

    muon:  attn.wq/wk/wv/wo, mlp.w_gate/w_up/w_down of every block       lr muon_lr, momentum muon_momentum
    adamw: tok_embeddings (= lm_head when tied), lm_head, norm gains     lr, betas, no decay on gains/embedding

Each group carries its own peak rate (`peak_lr`); the schedule scales them all by one factor per step,
so both follow the same warmup and decay and a resumed run sets the same rates as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from llmpipe.errors import UserError
from llmpipe.model import GPT

OPTIMIZERS = ("adamw", "muon")
# parameter names (suffixes) that Muon updates: the hidden matrices of a block. Under LoRA (peft) the
# frozen base weight is `...wq.base_layer.weight` and the adapters `...lora_A...`: none match, so Muon
# never sees an adapter's low-rank factors.
BLOCK_MATRICES = tuple(f"{m}.weight" for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo",
                                               "mlp.w_gate", "mlp.w_up", "mlp.w_down"))


class Optimizers:
    """One or two torch optimizers stepped as one; `.optimizers` is what checkpoints save and load."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """Per-parameter state (moments, momentum buffers) of all of them, read-only."""
        return {p: st for opt in self.optimizers for p, st in opt.state.items()}

    def scale_lr(self, factor: float) -> None:
        """Set every group's rate to its peak times `factor` (the schedule's value over the peak)."""
        for group in self.param_groups:
            group["lr"] = group["peak_lr"] * factor

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def build(model: GPT, *, optimizer: str, lr: float, betas: tuple[float, float], weight_decay: float,
          muon_lr: float, muon_momentum: float, device: torch.device) -> Optimizers:
    """The optimizer(s) over `model`'s trainable parameters (frozen ones are left out)."""
    return Optimizers([cls(groups, **kwargs) for cls, groups, kwargs in
                       _plan(model, optimizer, lr, betas, weight_decay, muon_lr, muon_momentum, device)])


def reset_hyperparameters(opt: Optimizers, model: GPT, *, optimizer: str, lr: float, betas: tuple[float, float],
                          weight_decay: float, muon_lr: float, muon_momentum: float) -> None:
    """After loading a checkpoint's optimizer state: this run's settings decide the hyperparameters
    (the saved groups carry the old ones), the state (moments, momentum buffers) stays."""
    fresh = [g for _, groups, _ in _plan(model, optimizer, lr, betas, weight_decay, muon_lr, muon_momentum,
                                         torch.device("cpu")) for g in groups]
    for group, new in zip(opt.param_groups, fresh, strict=True):
        group.update({k: v for k, v in new.items() if k != "params"})


def _plan(model: GPT, optimizer: str, lr: float, betas: tuple[float, float], weight_decay: float, muon_lr: float,
          muon_momentum: float, device: torch.device) -> list[tuple[type, list[dict], dict]]:
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    decay, no_decay = model.param_groups(weight_decay)
    fused = {"fused": device.type == "cuda"}
    if optimizer == "adamw":
        return [(torch.optim.AdamW, [_adam(decay, lr, betas), _adam(no_decay, lr, betas)], fused)]
    matrices = {id(p) for name, p in model.named_parameters() if name.endswith(BLOCK_MATRICES)}
    muon = [p for p in decay["params"] if id(p) in matrices]
    if not muon:
        raise UserError("optimizer muon: no block matrix is trainable (under LoRA only the adapters train); "
                        "use optimizer: adamw")
    rest = {**decay, "params": [p for p in decay["params"] if id(p) not in matrices]}
    muon_group = {"params": muon, "weight_decay": weight_decay, "lr": muon_lr, "peak_lr": muon_lr,
                  "momentum": muon_momentum}
    return [(torch.optim.Muon, [muon_group], {"adjust_lr_fn": "original"}),
            (torch.optim.AdamW, [_adam(g, lr, betas) for g in (rest, no_decay) if g["params"]], fused)]


def _adam(group: dict, lr: float, betas: tuple[float, float]) -> dict:
    """An AdamW group with its hyperparameters in it (so a resume can reset them from this run's settings)."""
    return {**group, "lr": lr, "peak_lr": lr, "betas": betas}
