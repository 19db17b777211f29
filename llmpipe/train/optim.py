"""The training loop's optimizer: AdamW, or Muon for the blocks' matrices and AdamW for the rest.

Muon (torch.optim.Muon, Keller Jordan's; our subclass below picks the dtype of its iteration)
orthogonalizes each 2-D update by a Newton-Schulz iteration, so every direction of a matrix moves at
the same rate. It suits the hidden matrices only; the token
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


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iteration in a dtype of our choosing.

    torch's runs it in bf16: right on a GPU, but on a CPU without bf16 matrix units a bf16 matmul is
    5-6x slower than fp32 (55 vs 10 ms for a 704 x 256 orthogonalization on this project's 2-core CI
    machine), which made Muon steps 2.7x slower than AdamW's. `ns_dtype` None picks bf16 on CUDA and
    fp32 elsewhere. The rest is torch's algorithm, constructor, defaults and state (`momentum_buffer`),
    so checkpoints are interchangeable; tests/train/test_optim.py checks that ns_dtype bf16 gives
    torch's step bit for bit."""

    def __init__(self, params: Any, ns_dtype: torch.dtype | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None, "the training loop never passes a closure"
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = self.ns_dtype or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)  # torch's "original" scale


def orthogonalize(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (Keller Jordan's): about U V^T of grad."""
    a, b, c = coefficients
    x = grad.to(dtype, copy=True)  # a copy: the iteration works in place, and grad may be the momentum buffer
    tall = grad.size(0) > grad.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is then the smaller one
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


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
    return [(Muon, [muon_group], {"adjust_lr_fn": "original"}),
            (torch.optim.AdamW, [_adam(g, lr, betas) for g in (rest, no_decay) if g["params"]], fused)]


def _adam(group: dict, lr: float, betas: tuple[float, float]) -> dict:
    """An AdamW group with its hyperparameters in it (so a resume can reset them from this run's settings)."""
    return {**group, "lr": lr, "peak_lr": lr, "betas": betas}
