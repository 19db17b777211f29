"""Fixtures for quantization and export: a tokenizer trained on real text (byte fallback, digits, the
corpus' own punctuation) and a project whose pretrain final/ has trained weights (norm gains away from 1,
so a parity test cannot pass on a model that is still at its initialisation)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from llmpipe.model import ModelConfig
from llmpipe.tokenizer import train
from llmpipe.tokenizer.sentencepiece_bpe import MODEL_FILE, TOKENIZER_META_FILE, Tokenizer
from llmpipe.train.data import TokenWindows
from llmpipe.train.loop import TrainConfig, Trainer
from llmpipe.train.task import pretraining_task
from tests.helpers import torch_threads

SEQ_LEN = 128


@pytest.fixture(scope="session")
def corpus_text(demo_slice: Path) -> str:
    """The demo slice's plays and poems, concatenated (~280k characters of real text)."""
    with tarfile.open(demo_slice) as tar:
        texts = [tar.extractfile(m).read().decode("utf-8", errors="replace") for m in tar.getmembers() if m.isfile()]
    return "\n\n".join(texts)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory, corpus_text: str) -> Path:
    """A project: models/tokenizer (1024 pieces, trained on real text) and models/pretrain/final after
    200 steps of a 2 x 128 model with grouped-query attention (2 heads, 1 kv head)."""
    root = tmp_path_factory.mktemp("packaged")
    (root / "dvc.yaml").write_text("stages: {}\n")
    tok_dir = root / "models" / "tokenizer"
    tok_dir.mkdir(parents=True)
    sentences = [s for doc in corpus_text.split("\n\n") for s in train.training_sentences(doc)]
    model = train.train_sentencepiece(sentences, vocab_size=1024, character_coverage=0.9995, num_threads=1)
    (tok_dir / MODEL_FILE).write_bytes(model)
    (tok_dir / TOKENIZER_META_FILE).write_text(json.dumps({"hash": hashlib.sha256(model).hexdigest()}))
    tok = Tokenizer.load(tok_dir)
    stream = np.array(tok.encode(corpus_text), dtype=np.int64)
    cut = len(stream) * 9 // 10
    cfg = TrainConfig(seq_len=SEQ_LEN, micro_batch=8, global_batch_tokens=8 * SEQ_LEN, max_steps=200, lr=4e-3,
                      warmup_steps=10, eval_every=200, eval_batches=4, checkpoint_every=200, sample_tokens=0)
    model_cfg = ModelConfig.from_preset("tiny", tok.vocab_size, n_layer=2, d_model=128, max_seq_len=SEQ_LEN)
    with torch_threads(2):
        task = pretraining_task(TokenWindows([stream[:cut]], SEQ_LEN), TokenWindows([stream[cut:]], SEQ_LEN), cfg)
        Trainer(model_cfg, cfg, task, root / "models" / "pretrain", {"hash": tok.hash, "vocab_size": tok.vocab_size}).fit()
    return root
