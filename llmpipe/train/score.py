"""Bits per byte of a language model on a WHOLE token split, not a sample of its windows.

The loop's periodic val loss reads a fixed spread of `eval_batches` windows: cheap, and the same
windows every time, which is what a loss curve needs. A model's final figure, and any comparison of
two recipes (benchmarks/quality_per_compute.py), scores every token instead: each shard is cut into
consecutive windows of `seq_len` targets (the last one shorter), so each token after a shard's first
is predicted exactly once, from the context its window holds.

    bits per byte = sum of -ln p(token) / ln 2 / the UTF-8 bytes the split's tokens decode to

Any model with `model(idx, targets) -> (logits, loss)` (llmpipe's GPT, the benchmark's reference)
can be scored. Imports torch and numpy only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SplitScore:
    nats: float  # summed over every scored token
    tokens: int  # tokens scored (every token but each shard's first)
    num_bytes: int  # of the split's text

    @property
    def loss(self) -> float:
        """Mean nats per scored token."""
        return self.nats / self.tokens

    @property
    def bpb(self) -> float:
        return self.nats / math.log(2) / self.num_bytes


def split_windows(shards: Sequence[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """Consecutive (up to) seq_len + 1 token windows, overlapping by one, covering each shard."""
    for shard in shards:
        for start in range(0, len(shard) - 1, seq_len):
            yield np.asarray(shard[start:start + seq_len + 1], dtype=np.int64)


@torch.no_grad()
def score_split(model: torch.nn.Module, shards: Sequence[np.ndarray], num_bytes: int, seq_len: int,
                batch_size: int = 8, device: torch.device | str = "cpu",
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> SplitScore:
    """Score every token of `shards` (one split) with `model`; `num_bytes` is the split's text size."""
    was_training = model.training
    model.eval()
    nats, tokens = 0.0, 0
    batch: list[np.ndarray] = []

    def flush() -> None:
        nonlocal nats, tokens
        window = torch.from_numpy(np.stack(batch)).to(device)  # (B, T + 1), one length per batch
        idx, targets = window[:, :-1], window[:, 1:]
        with autocast():
            logits, _ = model(idx, None)
        nats += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum"))
        tokens += targets.numel()
        batch.clear()

    for window in split_windows(shards, seq_len):
        if batch and len(window) != len(batch[0]):
            flush()  # a shard's shorter last window goes in a batch of its own: no padding
        batch.append(window)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    model.train(was_training)
    return SplitScore(nats, tokens, num_bytes)
