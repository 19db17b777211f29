"""What a training stage plugs into the one training loop (llmpipe/train/loop.py).

The loop owns the optimizer step, schedules, precision, distribution, checkpoints and logs; a stage
owns its data and its objective:

    Task(train=BatchSource, val=[batch, ...], loss=LossFn)

pretraining: token windows + next-token loss (`pretraining_task`); SFT: chat conversations with
targets only on assistant tokens + the same loss; DPO: chosen/rejected pairs + the DPO loss
(llmpipe/finetune/). A batch is a dict of tensors ("idx", "targets", and whatever the loss reads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from llmpipe.train.data import TokenWindows, TrainBatches, val_batches
from llmpipe.train.distributed import World
from llmpipe.train.loop import TrainConfig

Batch = dict[str, torch.Tensor]
# (the module being trained, a micro-batch) -> (scalar loss, named detached scalars to log)
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
IGNORE = -100  # a target that has no loss (padding, prompts): cross_entropy's ignore_index


class BatchSource(Protocol):
    """The training micro-batches of one rank, a pure function of the step (so resume is exact)."""

    num_examples: int  # recorded with the data's identity in every checkpoint

    def micro_batches(self, step: int) -> Iterable[Batch]:
        """The accumulation micro-batches this rank runs at optimizer step `step`."""
        ...

    def tokens(self, batch: Batch) -> int:
        """Tokens with a loss in `batch` (what tokens/s and tokens_seen count)."""
        ...


@dataclass
class Task:
    train: BatchSource
    val: list[Batch]
    loss: LossFn
    bytes_per_token: float | None = None  # of the val text: val loss is then also reported in bits per byte


def lm_loss(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over targets != -100: pretraining's and SFT's objective.

    Packed rows carry `segments`, which the model needs so attention stays inside each conversation."""
    _, loss = net(batch["idx"], batch["targets"], segments=batch.get("segments"))
    return loss, {}


class WindowBatches:
    """Pretraining's BatchSource: random token windows (llmpipe/train/data.py) as batches."""

    def __init__(self, batches: TrainBatches):
        self.batches = batches
        self.num_examples = batches.windows.num_windows

    def micro_batches(self, step: int) -> Iterable[Batch]:
        for x, y in self.batches.micro_batches(step):
            yield {"idx": x, "targets": y}

    def tokens(self, batch: Batch) -> int:
        return batch["targets"].numel()


def pretraining_task(train: TokenWindows, val: TokenWindows, cfg: TrainConfig, world: World = World(),
                     bytes_per_token: float | None = None) -> Task:
    """Random token windows and the next-token loss; val is a fixed spread of windows (bits per byte too)."""
    accum = cfg.accum_steps(world.world_size)
    batches = WindowBatches(TrainBatches(train, cfg.micro_batch, cfg.seed, accum, world.rank))
    val_set = [{"idx": x, "targets": y}
               for x, y in val_batches(val, cfg.eval_batches, cfg.micro_batch, world.rank, world.world_size)]
    return Task(batches, val_set, lm_loss, bytes_per_token)
