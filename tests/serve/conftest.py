"""Fixtures for the engine and the commands: a real tokenizer, and a project with a model trained a
few steps (longer context than test_load's, so a chat has room for history)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpipe.model import ModelConfig
from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer
from llmpipe.train.data import TokenWindows
from llmpipe.train.loop import TrainConfig, Trainer
from tests.helpers import torch_threads
from tests.serve.test_load import write_tokenizer
from tests.train.synthetic import markov_tokens

SERVE_SEQ_LEN = 96


@pytest.fixture(scope="session")
def served_project(tmp_path_factory) -> Path:
    """A project (tokenizer + pretrain final/ after 2 steps) that `llmpipe generate`/`chat` find by default."""
    root = tmp_path_factory.mktemp("served")
    (root / "dvc.yaml").write_text("stages: {}\n")
    tok = Tokenizer.load(write_tokenizer(root / "models" / "tokenizer", docs=300, vocab_size=400))
    stream = markov_tokens(4_000, tok.vocab_size, seed=5)
    cfg = TrainConfig(seq_len=SERVE_SEQ_LEN, micro_batch=2, global_batch_tokens=2 * SERVE_SEQ_LEN, max_steps=2,
                      lr=3e-3, warmup_steps=1, eval_every=2, eval_batches=1, checkpoint_every=2, sample_tokens=0)
    model_cfg = ModelConfig.from_preset("tiny", tok.vocab_size, n_layer=1, d_model=64, max_seq_len=SERVE_SEQ_LEN)
    with torch_threads(1):
        Trainer(model_cfg, cfg, TokenWindows([stream], SERVE_SEQ_LEN), TokenWindows([stream[:1000]], SERVE_SEQ_LEN),
                root / "models" / "pretrain", {"hash": tok.hash, "vocab_size": tok.vocab_size}, 3.0).fit()
    return root


@pytest.fixture(scope="session")
def tokenizer(served_project) -> Tokenizer:
    return Tokenizer.load(served_project / "models" / "tokenizer")
