import numpy as np
import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.train.data import TokenWindows, TrainBatches, val_batches


def windows(seq_len: int = 8) -> TokenWindows:
    # two shards of distinct ranges so a window that crossed the boundary would be visible
    return TokenWindows([np.arange(0, 100, dtype=np.uint16), np.arange(1000, 1050, dtype=np.uint16)], seq_len)


def test_windows_are_consecutive_tokens_inside_one_shard_with_shifted_targets():
    w = windows()
    assert w.num_windows == (100 - 8) + (50 - 8)
    x, y = w.gather(np.arange(w.num_windows))
    assert x.shape == (w.num_windows, 8) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.all(x[:, -1] + 1 == y[:, -1])  # consecutive: no shard boundary inside a window
    assert x[0, 0] == 0 and x[92, 0] == 1000 and y[-1, -1] == 1049  # first/last start of each shard


def test_batches_are_a_function_of_seed_step_and_micro_index():
    w = windows()
    a, b = TrainBatches(w, 4, seed=7, accum=2), TrainBatches(w, 4, seed=7, accum=2)
    for step in (0, 5, 123):
        for (xa, ya), (xb, yb) in zip(a.micro_batches(step), b.micro_batches(step)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(next(a.micro_batches(0))[0], next(a.micro_batches(1))[0])
    assert not np.array_equal(a.indices(0, 0), TrainBatches(w, 4, seed=8, accum=2).indices(0, 0))


def test_resuming_at_a_step_gives_the_batches_of_an_uninterrupted_run():
    w = windows()
    straight = [x for step in range(6) for x, _ in TrainBatches(w, 4, 1, 2).micro_batches(step)]
    resumed = TrainBatches(w, 4, 1, 2)  # a fresh loader (new process) that starts at step 3
    tail = [x for step in range(3, 6) for x, _ in resumed.micro_batches(step)]
    assert all(torch.equal(a, b) for a, b in zip(straight[6:], tail))


def test_ranks_together_see_exactly_the_micro_batches_of_one_process():
    w = windows()
    single = list(TrainBatches(w, 4, seed=3, accum=4).micro_batches(9))
    ranks = [list(TrainBatches(w, 4, seed=3, accum=2, rank=r).micro_batches(9)) for r in range(2)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, ranks[0] + ranks[1]))


def test_val_batches_are_fixed_spread_out_and_split_evenly_across_ranks():
    w = windows()
    full = val_batches(w, 4, 3)
    assert len(full) == 4 and full[0][0][0, 0] == 0
    starts = torch.cat([x[:, 0] for x, _ in full])
    assert len(set(starts.tolist())) == 12  # distinct windows
    shared = val_batches(w, 4, 3, rank=0, world_size=2) + val_batches(w, 4, 3, rank=1, world_size=2)
    assert sorted(torch.cat([x[:, 0] for x, _ in shared]).tolist()) == sorted(starts.tolist())
    with pytest.raises(UserError, match="multiple of the world size"):
        val_batches(w, 3, 3, rank=0, world_size=2)


def test_a_split_too_short_for_one_window_is_a_clear_error():
    with pytest.raises(UserError, match="seq_len \\+ 1 = 65"):
        TokenWindows([np.arange(30, dtype=np.uint16)], 64, name="data/tokens/val")
