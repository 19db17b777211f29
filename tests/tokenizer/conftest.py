"""Fixtures for the tokenizer tests: a tiny tokenizer trained in-process on the synthetic corpus
(hermetic: no network, about a second), shared by the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer
from tests.tokenizer.synthetic import make_corpus, write_small_tokenizer


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus(400)


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    return write_small_tokenizer(tmp_path_factory.mktemp("tokenizer"), corpus)


@pytest.fixture(scope="session")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)
