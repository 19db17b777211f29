"""Streaming text: deltas from the incremental detokenizer are whole characters (byte-fallback pieces
held until complete) and join to the decoded text; stop strings split across tokens are caught, and
no delta ever shows part of one."""

from __future__ import annotations

import hashlib
import random

import pytest

from llmpipe.errors import UserError
from llmpipe.serve.text import IncrementalDetokenizer, StopMatcher, incomplete_tail
from llmpipe.tokenizer.sentencepiece_bpe import MODEL_FILE, TOKENIZER_META_FILE, Tokenizer
from tests.tokenizer.synthetic import WORDS

# rare characters the tiny English tokenizer has never seen: they can only come out as byte pieces
RARE = ["😀", "👍🏽", "日本語", "€", "ß", "Привет", "e\u0301", "👨‍👩‍👧"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    from llmpipe.tokenizer import train

    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(12)) + rng.choice([".\n", "\n\n", ": "])
                 for _ in range(2000)]
    model = train.train_sentencepiece(sentences, vocab_size=400, character_coverage=1.0, num_threads=1)
    out = tmp_path_factory.mktemp("tokenizer")
    (out / MODEL_FILE).write_bytes(model)
    (out / TOKENIZER_META_FILE).write_text('{"hash": "%s"}' % hashlib.sha256(model).hexdigest())
    return Tokenizer.load(out)


def stream(tok, ids) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    return [detok.push(i) for i in ids] + [detok.flush()]


def mixed_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(RARE) if rng.random() < 0.3 else rng.choice(WORDS) for _ in range(n))


def test_deltas_are_whole_characters_and_join_to_the_text(tok):
    rng = random.Random(1)
    for _ in range(20):
        text = mixed_text(rng, 30) + " 😀"
        ids = tok.encode(text)
        byte_pieces = [i for i in ids if tok.is_byte(i)]
        assert len(byte_pieces) >= 4  # the emoji alone is four byte pieces
        deltas = stream(tok, ids)
        assert "".join(deltas) == text
        for delta in deltas:
            assert "\ufffd" not in delta, deltas
            assert delta.encode("utf-8").decode("utf-8") == delta
        # the unfinished emoji really was held back: its first three pieces emitted nothing
        assert deltas[-5:-2] == ["", "", ""] and deltas[-2] == "😀"


def test_random_ids_including_broken_byte_sequences_join_to_decode(tok):
    rng = random.Random(2)
    byte_ids = [i for i in range(tok.vocab_size) if tok.is_byte(i)]
    # lead bytes and continuation bytes, so sequences are cut short, interrupted and left dangling
    interesting = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in (0xC3, 0xE2, 0xF0, 0x9F, 0x82, 0xAC, 0x98, 0x80)]
    for _ in range(200):
        ids = [rng.choice(interesting) if rng.random() < 0.5 else rng.choice(byte_ids if rng.random() < 0.2 else
                                                                             range(8, tok.vocab_size))
               for _ in range(rng.randint(1, 30))]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


def test_an_unfinished_character_at_the_end_is_flushed_as_decode_shows_it(tok):
    ids = tok.encode("ok €")[:-1]  # the last byte of "€" never arrives
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in ids) == "ok "
    assert detok.flush() == tok.decode(ids)[len("ok "):]


def test_each_step_decodes_a_short_window(tok):
    class Counting:
        longest = 0

        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, ids):
            Counting.longest = max(Counting.longest, len(ids))
            return tok.decode(ids)

    ids = tok.encode(mixed_text(random.Random(3), 600))
    assert len(ids) > 1000
    assert "".join(stream(Counting(), ids)) == tok.decode(ids)
    assert Counting.longest <= 10  # the previous step's tokens plus an unfinished character


@pytest.mark.parametrize("held, tail", [(0, [0x41]), (1, [0xE2]), (2, [0xE2, 0x82]), (0, [0xE2, 0x82, 0xAC]),
                                        (3, [0xF0, 0x9F, 0x98]), (0, [0xF0, 0x9F, 0x98, 0x80]), (0, [0x82]),
                                        (0, [0xFF]), (1, [0x41, 0xC3]), (1, [0xE2, 0x82, 0xE2])])
def test_incomplete_tail_counts_the_bytes_of_an_unfinished_character(held, tail):
    assert incomplete_tail(tail) == held


def test_a_stop_string_split_across_tokens_is_caught_and_never_shown():
    matcher = StopMatcher(["\n\nUSER:"])
    assert matcher.push("Sure, here") == "Sure, here"
    assert matcher.push(".") == "."
    assert matcher.push("\n") == ""
    assert matcher.push("\nUS") == ""
    assert not matcher.stopped
    assert matcher.push("ER: and more") == ""
    assert matcher.stopped and matcher.stop == "\n\nUSER:"
    assert matcher.push("later") == "" and matcher.flush() == ""


def test_a_false_start_is_released_and_the_end_is_flushed():
    matcher = StopMatcher(["\n\nUSER:"])
    assert matcher.push("a\n") == "a"
    assert matcher.push("\nUSE") == ""
    assert matcher.push("D it") == "\n\nUSED it"
    assert matcher.push("\n") == ""
    assert matcher.flush() == "\n" and not matcher.stopped


def test_the_earliest_of_several_stops_wins():
    matcher = StopMatcher(["END", "\n"])
    assert matcher.push("one\ntwo END") == "one"
    assert matcher.stop == "\n"


def reference_cut(text: str, stops: list[str]) -> str:
    hits = [text.find(s) for s in stops if s in text]
    return text[:min(hits)] if hits else text


def test_random_splits_give_the_text_before_the_first_stop():
    rng = random.Random(4)
    for _ in range(500):
        text = "".join(rng.choice("aab\n:") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("ab\n:") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        want = reference_cut(text, stops)
        matcher, shown, at = StopMatcher(stops), "", 0
        while at < len(text) and not matcher.stopped:
            step = rng.randint(1, 5)
            shown += matcher.push(text[at:at + step])
            at += step
            assert want.startswith(shown), (text, stops, shown)  # never a character past the cut
        shown += matcher.flush()
        assert shown == want, (text, stops)
        assert matcher.stopped == any(s in text for s in stops)


def test_detokenizer_and_stop_matcher_together_on_real_tokens(tok):
    text = "the world 😀 is good\n\nUSER: what now"
    ids = tok.encode(text)
    start = len("the world 😀 is good")
    cuts = [len(tok.decode(ids[:n])) for n in range(len(ids) + 1)]
    assert sum(start < c < start + len("\n\nUSER:") for c in cuts) >= 2  # the stop arrives in 3+ tokens
    detok, matcher, shown = IncrementalDetokenizer(tok), StopMatcher(["\n\nUSER:"]), []
    for i in ids:
        shown.append(matcher.push(detok.push(i)))
        if matcher.stopped:
            break
    assert matcher.stopped and "".join(shown) == "the world 😀 is good"
    assert all("\n" not in d for d in shown)


@pytest.mark.parametrize("stops", [[""], ["ok", ""], [None]])
def test_empty_stop_strings_are_user_errors(stops):
    with pytest.raises(UserError, match="stop string"):
        StopMatcher(stops)
