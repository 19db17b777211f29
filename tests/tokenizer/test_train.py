"""Training: deterministic model bytes, the settings that make decoding exact, and the errors a
user sees for input SentencePiece cannot train on."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llmpipe.errors import UserError
from llmpipe.tokenizer import train
from tests.tokenizer.synthetic import make_corpus


def _sentences(docs):
    return [s for doc in docs for s in train.training_sentences(doc)]


def test_same_sample_gives_identical_model_bytes_with_any_thread_count():
    sentences = _sentences(make_corpus(150, seed=3))
    one = train.train_sentencepiece(sentences, 500, 0.9995, num_threads=1)
    two = train.train_sentencepiece(sentences, 500, 0.9995, num_threads=2)
    again = train.train_sentencepiece(iter(sentences), 500, 0.9995, num_threads=2)
    assert one == two == again


def test_model_settings_keep_text_exact_and_reserve_special_tokens(tokenizer_dir):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tokenizer_dir / "tokenizer.model").read_bytes())
    assert proto.normalizer_spec.name == "identity"
    assert not proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
    assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    types = [p.type for p in proto.pieces]
    assert types[1:8] == [sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL] * 7
    assert types.count(sentencepiece_model_pb2.ModelProto.SentencePiece.BYTE) == 256
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))  # a standard model file
    assert sp.decode(sp.encode("Hello  world\n")) == "Hello  world\n"


def test_training_sentences_fit_sentencepieces_length_limit():
    doc = "x" * 10_000 + " short words " * 1000
    sentences = list(train.training_sentences(doc))
    assert "".join(sentences) == doc
    assert max(len(s.encode()) for s in sentences) <= train.MAX_SENTENCE_BYTES


def test_vocabulary_too_large_for_the_corpus_says_what_to_lower():
    with pytest.raises(UserError, match=r"Vocabulary size too high \(4096\).*Lower tokenizer.vocab_size in "
                                         r"params.yaml to at most \d+"):
        train.train_sentencepiece(_sentences(make_corpus(5)), 4096, 0.9995, num_threads=1)


def test_vocabulary_smaller_than_reserved_pieces_says_what_to_raise():
    with pytest.raises(UserError, match=r"tokenizer.vocab_size=100 is too small.*Raise tokenizer.vocab_size in "
                                         r"params.yaml to at least \d+"):
        train.train_sentencepiece(_sentences(make_corpus(5)), 100, 0.9995, num_threads=1)


def test_empty_training_text_is_a_user_error():
    with pytest.raises(UserError, match="no training text"):
        train.train_sentencepiece([], 600, 0.9995, num_threads=1)


def test_reference_bpe_has_the_same_vocabulary_size_and_counts_tokens(corpus):
    ref = train.train_reference_bpe(_sentences(corpus), 600)
    assert ref.get_vocab_size() == 600
    n = train.count_reference_tokens(ref, corpus[:20])
    assert n == sum(len(ref.encode(doc).ids) for doc in corpus[:20])  # the segment split is exact here too
    assert 0 < n < sum(len(d.encode()) for d in corpus[:20])
