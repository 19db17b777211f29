"""Batches of token windows read straight from the memmapped token shards.

A training window is `seq_len + 1` consecutive tokens from one shard (inputs = window[:-1],
targets = window[1:]). Windows never cross a shard boundary; each valid start position has a flat
index, and a micro-batch is `batch_size` flat indices drawn by a numpy Generator seeded from
(seed, step, global micro index). So:

- resume is exact: the data "position" is the step number, nothing else;
- the batches do not depend on the world size: micro-batch g of step s is the same windows whether
  one process runs all micro-batches or rank r runs g = r * accum + m. DDP over W ranks therefore
  sees exactly what one process with W times the accumulation sees.

Validation uses a fixed set of evenly spaced windows over the whole val split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from llmpipe.errors import UserError


class TokenWindows:
    """Every start position of a `seq_len + 1` window in a list of 1-D token arrays."""

    def __init__(self, shards: Sequence[np.ndarray], seq_len: int, name: str = "split"):
        self.shards = list(shards)
        self.seq_len = seq_len
        starts_per_shard = np.array([max(0, len(s) - seq_len) for s in self.shards], dtype=np.int64)
        self._cum = np.cumsum(starts_per_shard)  # window index -> shard via searchsorted
        self.num_windows = int(self._cum[-1]) if len(self._cum) else 0
        if self.num_windows == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise UserError(f"{name}: no shard holds seq_len + 1 = {seq_len + 1} tokens (longest has {longest}); "
                            f"lower seq_len or tokenize more text")

    def gather(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat window indices (B,) -> inputs, targets, both (B, T) int64."""
        shard_ids = np.searchsorted(self._cum, index, side="right")
        offsets = index - np.concatenate([[0], self._cum])[shard_ids]
        rows = [np.asarray(self.shards[s][o:o + self.seq_len + 1], dtype=np.int64) for s, o in zip(shard_ids, offsets)]
        window = torch.from_numpy(np.stack(rows))  # (B, T+1)
        return window[:, :-1], window[:, 1:]


class TrainBatches:
    """The micro-batches one rank runs at a given step."""

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int, accum: int, rank: int = 0):
        self.windows, self.batch_size, self.seed, self.accum, self.rank = windows, batch_size, seed, accum, rank

    def indices(self, step: int, micro: int) -> np.ndarray:
        """Flat window indices of global micro-batch `micro` at `step` (the world-size-free key)."""
        rng = np.random.default_rng([self.seed, step, micro])
        return rng.integers(0, self.windows.num_windows, size=self.batch_size)

    def micro_batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for m in range(self.accum):
            yield self.windows.gather(self.indices(step, self.rank * self.accum + m))


def val_batches(windows: TokenWindows, num_batches: int, batch_size: int, rank: int = 0,
                world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share (batches rank, rank + W, ...) of a fixed set of evenly spaced val windows."""
    if num_batches % world_size:
        raise UserError(f"eval_batches ({num_batches}) must be a multiple of the world size ({world_size}) "
                        f"so every rank evaluates the same number of batches")
    n = num_batches * batch_size
    index = np.arange(n, dtype=np.int64) * windows.num_windows // n
    batches = index.reshape(num_batches, batch_size)[rank::world_size]
    return [windows.gather(b) for b in batches]
