"""Whole-split bits per byte: every token after a shard's first is scored once, from its window's context."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmpipe.model import GPT, ModelConfig
from llmpipe.train.score import score_split, split_windows


def test_windows_cover_every_token_once_and_overlap_by_one():
    shards = [np.arange(10), np.arange(100, 107)]
    windows = list(split_windows(shards, seq_len=4))
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9],
                                             [100, 101, 102, 103, 104], [104, 105, 106]]
    targets = [t for w in windows for t in w[1:].tolist()]
    assert targets == list(range(1, 10)) + list(range(101, 107))  # each target once, none across shards


@pytest.mark.parametrize("batch_size", [1, 3])
def test_score_is_the_summed_cross_entropy_over_all_targets_in_bits_per_byte(batch_size):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=32, max_seq_len=8))
    shards = [np.random.default_rng(1).integers(0, 50, 29), np.random.default_rng(2).integers(0, 50, 11)]
    score = score_split(model, shards, num_bytes=123, seq_len=8, batch_size=batch_size)
    nats = 0.0
    with torch.no_grad():  # by hand: each window alone
        for w in split_windows(shards, 8):
            x = torch.from_numpy(w)[None]
            logits, _ = model(x[:, :-1])
            nats += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
    assert score.tokens == 28 + 10
    assert score.nats == pytest.approx(nats, rel=1e-5)
    assert score.bpb == pytest.approx(nats / math.log(2) / 123, rel=1e-5)
    assert score.loss == pytest.approx(nats / 38, rel=1e-5)
    assert model.training  # left as it was found
