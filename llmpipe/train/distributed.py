"""Process groups, model wrapping (DDP or FSDP2) and full state dicts for checkpoints.

The training entry reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); without it, it is
one process and nothing here does any communication. Checkpoints always hold the *full* model and
optimizer state, gathered on rank 0 by `torch.distributed.checkpoint.state_dict` helpers, so one
checkpoint format serves 1 GPU, DDP and FSDP2 alike, and a run may resume under another world size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from llmpipe.errors import UserError

MODES = ("none", "ddp", "fsdp2")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> World:
    """Join the process group torchrun set up (nccl on GPUs, gloo on CPU); one process otherwise."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                        f"use device: auto or cpu")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return World(rank, world_size, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, mode: str, world: World, compile: bool = False) -> torch.nn.Module:
    """The module the loop runs forward/backward on: the model itself, DDP(model), or FSDP2-sharded in place.

    `compile` compiles in place (`Module.compile`), so parameter names and state dicts stay plain.
    """
    if mode not in MODES:
        raise UserError(f"distributed mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "fsdp2" and world.distributed:
        from torch.distributed.fsdp import fully_shard

        # Shard (and compile) each transformer block on its own, so its params are gathered just
        # before it runs; then the root for what is left (embeddings, final norm, head).
        for module in model.modules():
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    if compile:
                        block.compile()
                    fully_shard(block)
        fully_shard(model)
        return model
    if compile:
        model.compile()
    if mode == "ddp" and world.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
    return model


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm`; returns the total norm before clipping as a plain tensor on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor


def all_reduce(value: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """Reduce a tensor across ranks (mean, sum or max); a no-op in one process."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's Python object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- full state dicts (gathered to rank 0's CPU; other ranks get {}) ---------------------------------

_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _load_options() -> StateDictOptions:
    # rank 0 alone reads the checkpoint; the helpers broadcast (and shard, under FSDP2) to the others
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=_SAVE)


def full_optimizer_state(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict:
    """One state dict (keyed by parameter name) for all of `optimizers` (Muon + AdamW save as one)."""
    return get_optimizer_state_dict(model, optimizers, options=_SAVE)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, state, options=_load_options())


def load_optimizer_state(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], state: dict) -> None:
    set_optimizer_state_dict(model, optimizers, state, options=_load_options())
