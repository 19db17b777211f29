"""Fixtures for the tokenizer tests: a tiny tokenizer trained in-process on the synthetic corpus
(hermetic: no network, about a second), shared by the whole session."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from llmpipe.tokenizer.sentencepiece_bpe import MODEL_FILE, TOKENIZER_META_FILE, Tokenizer
from tests.tokenizer.synthetic import make_corpus


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus(400)


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    from llmpipe.tokenizer import train

    sentences = [s for doc in corpus for s in train.training_sentences(doc)]
    model = train.train_sentencepiece(sentences, vocab_size=600, character_coverage=0.9995, num_threads=2)
    out = tmp_path_factory.mktemp("tokenizer")
    (out / MODEL_FILE).write_bytes(model)
    (out / TOKENIZER_META_FILE).write_text('{"hash": "%s"}' % hashlib.sha256(model).hexdigest())
    return out


@pytest.fixture(scope="session")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)
