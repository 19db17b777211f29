"""Fixtures for the engine and the commands: a real tokenizer, and a project with a model trained a
few steps (longer context than test_load's, so a chat has room for history)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmpipe.model import ModelConfig
from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer
from llmpipe.train.data import TokenWindows
from llmpipe.train.loop import TrainConfig, Trainer
from llmpipe.train.task import pretraining_task
from tests.helpers import torch_threads
from tests.serve.test_load import write_tokenizer
from tests.tokenizer.synthetic import make_corpus

SERVE_SEQ_LEN = 2048  # room for a reply long enough to interrupt


@pytest.fixture(scope="session")
def served_project(tmp_path_factory) -> Path:
    """A project (tokenizer + pretrain final/ after 60 steps) that `llmpipe generate`/`chat` find by default."""
    root = tmp_path_factory.mktemp("served")
    (root / "dvc.yaml").write_text("stages: {}\n")
    tok = Tokenizer.load(write_tokenizer(root / "models" / "tokenizer", docs=300, vocab_size=400))
    # real text without any special token, so the model learns never to end a reply by itself: a
    # greedy reply runs to max_new_tokens (long enough to interrupt)
    stream = np.array(tok.encode(" ".join(make_corpus(300))), dtype=np.int64)
    cfg = TrainConfig(seq_len=SERVE_SEQ_LEN, micro_batch=1, global_batch_tokens=SERVE_SEQ_LEN, max_steps=60,
                      lr=1e-2, warmup_steps=5, eval_every=60, eval_batches=1, checkpoint_every=60, sample_tokens=0)
    model_cfg = ModelConfig.from_preset("tiny", tok.vocab_size, n_layer=1, d_model=64, max_seq_len=SERVE_SEQ_LEN)
    with torch_threads(1):
        task = pretraining_task(TokenWindows([stream], SERVE_SEQ_LEN), TokenWindows([stream[:3000]], SERVE_SEQ_LEN), cfg)
        Trainer(model_cfg, cfg, task, root / "models" / "pretrain", {"hash": tok.hash, "vocab_size": tok.vocab_size}).fit()
    return root


@pytest.fixture(scope="session")
def tokenizer(served_project) -> Tokenizer:
    return Tokenizer.load(served_project / "models" / "tokenizer")
