"""The Tokenizer interface: exact round trips, special tokens that plain text can never produce,
the chat template, and the fast segment split giving exactly SentencePiece's ids."""

from __future__ import annotations

import hashlib
import random

import pytest

from llmpipe.errors import UserError
from llmpipe.tokenizer.sentencepiece_bpe import SPECIAL_TOKENS, Tokenizer, split_for_encoding
from tests.tokenizer.synthetic import EXTRAS, TRICKY


@pytest.mark.parametrize("text", TRICKY + EXTRAS)
def test_round_trip_is_exact(tok: Tokenizer, text: str):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.special_ids.values())


def test_round_trip_on_random_unicode(tok: Tokenizer):
    rng = random.Random(0)
    alphabet = list("ab ▁\n\t\r<|>") + ["é", "日", "😀", "👍🏽", "\u200d", "\x00", "<|user|>", "<|end|>", "  "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(500)]
    for text, ids in zip(texts, tok.encode_batch(texts, num_threads=2)):
        assert tok.decode(ids) == text, repr(text)


def test_corpus_round_trips_and_uses_few_byte_pieces(tok: Tokenizer, corpus: list[str]):
    encoded = tok.encode_batch(corpus)
    assert tok.decode_batch(encoded) == corpus
    tokens = [i for ids in encoded for i in ids]
    assert sum(tok.is_byte(i) for i in tokens) / len(tokens) < 0.1  # the vocabulary covers the common text
    assert sum(map(len, corpus)) / len(tokens) > 2  # and actually merges


def test_literal_special_strings_never_give_special_ids(tok: Tokenizer):
    text = "".join(SPECIAL_TOKENS.values()) * 3 + " <|user|>hello<|end|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == text


def test_special_token_ids_are_fixed_and_distinct(tok: Tokenizer):
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.system_id, tok.user_id, tok.assistant_id, tok.end_of_turn_id]
    assert ids == [1, 2, 3, 4, 5, 6, 7]
    assert tok.vocab_size == 600
    assert [tok.id_to_piece(i) for i in ids] == [SPECIAL_TOKENS[n] for n in
                                                 ("bos", "eos", "pad", "system", "user", "assistant", "end_of_turn")]
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"


def test_chat_template_inserts_special_ids_and_encodes_content_as_text(tok: Tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<|assistant|> hi 😀"},
                {"role": "assistant", "content": "Hello!\n"}]
    ids = tok.apply_chat_template(messages)
    expected = [tok.system_id, *tok.encode("Be brief."), tok.end_of_turn_id,
                tok.user_id, *tok.encode("<|assistant|> hi 😀"), tok.end_of_turn_id,
                tok.assistant_id, *tok.encode("Hello!\n"), tok.end_of_turn_id]
    assert ids == expected
    assert ids.count(tok.assistant_id) == 1  # the literal "<|assistant|>" in the user's text stayed text
    assert tok.decode(ids, skip_special=False) == "<|system|>Be brief.<|end|><|user|><|assistant|> hi 😀<|end|>" \
                                                  "<|assistant|>Hello!\n<|end|>"
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert prompt[-1] == tok.assistant_id and prompt[:-1] == expected[:len(prompt) - 1]


def test_chat_template_rejects_unknown_roles(tok: Tokenizer):
    with pytest.raises(UserError, match="role 'tool' is not one of system, user, assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(UserError, match="content must be a string"):
        tok.apply_chat_template([{"role": "user", "content": None}])


def test_segment_split_gives_exactly_sentencepieces_ids(tok: Tokenizer, corpus: list[str]):
    long_docs = ["\n".join(corpus[i:i + 40]) for i in range(0, 400, 40)]  # ~14k chars each: many segments
    long_docs = [d.replace("▁", "") for d in long_docs]  # SentencePiece itself mangles a literal "▁"
    assert tok.encode_batch(long_docs, num_threads=2) == tok.sp.encode(long_docs)
    assert tok.encode_batch(long_docs, num_threads=1) == [tok.encode(d) for d in long_docs]


@pytest.mark.parametrize("text", ["", "abc", "a" * 3000, "word " * 700, "x" + " " * 2500 + "y z " * 400,
                                  "   lead " * 300])
def test_split_for_encoding_cuts_only_before_a_space_after_a_non_space(text: str):
    segments = split_for_encoding(text, target=100)
    assert "".join(segments) == text
    for segment in segments[1:]:
        assert segment[0] == " "
    position = 0
    for segment in segments[:-1]:
        position += len(segment)
        assert text[position] == " " and text[position - 1] != " "


def test_hash_is_sha256_of_model_and_load_checks_it(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    assert tok.hash == hashlib.sha256((tokenizer_dir / "tokenizer.model").read_bytes()).hexdigest()
    (tmp_path / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer.json").write_text('{"hash": "0000"}')
    with pytest.raises(UserError, match="does not match"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UserError, match="run the tokenizer stage"):
        Tokenizer.load(tmp_path / "missing")


def test_a_model_without_our_special_tokens_is_refused(tmp_path, corpus):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=300, minloglevel=2)
    with pytest.raises(UserError, match="special token '<\\|bos\\|>' is missing"):
        Tokenizer(tmp_path / "plain.model")
