"""Preference pairs: {prompt, chosen, rejected} records, Anthropic HH dialogues, the relevance set."""

from __future__ import annotations

import json

import pytest

from llmpipe.data.steps import Reject
from llmpipe.finetune.conversations import MessagesSource, read_conversations
from llmpipe.finetune.preferences import (HFPairsSource, HHSource, Pair, PairsSource, from_hh, parse_hh_dialogue,
                                          read_pairs, relevance_pairs)
from llmpipe.tokenizer.encode import is_val
from tests.finetune.chat_fixtures import conv, write_jsonl


def test_pairs_with_a_string_or_a_message_prompt(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Bananas."},
        {"prompt": conv("hi", "hello", "Capital of France?", system="sys"), "chosen": "Paris.", "rejected": "Rome."},
    ])
    rows = list(read_pairs(PairsSource(name="p", type="pairs", path="p.jsonl"), tmp_path))
    assert rows[0].value == Pair(conv("Capital of France?"), "Paris.", "Bananas.")
    assert rows[1].value == Pair(conv("hi", "hello", "Capital of France?", system="sys"), "Paris.", "Rome.")


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "q", "chosen": "a"}, "format.missing_turns"),
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "pair.identical"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "turns.empty"),
    ({"prompt": conv("q", "a"), "chosen": "b", "rejected": "c"}, "turns.role_order"),
    ("not json", "format.bad_json"),
])
def test_pair_rejections(tmp_path, record, reason):
    write_jsonl(tmp_path / "p.jsonl", [record])
    (row,) = read_pairs(PairsSource(name="p", type="pairs", path="p.jsonl"), tmp_path)
    assert isinstance(row.value, Reject) and row.value.reason == reason


HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross the road?"
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: No."


def test_hh_dialogues_share_the_prompt():
    pair = from_hh({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert pair == Pair(conv("Hi there", "Hello! How can I help?", "Tell me a joke"),
                        "Why did the chicken cross the road?", "No.")


def test_hh_multiline_turns_and_rejections():
    assert parse_hh_dialogue("\n\nHuman: line one\nline two\n\nAssistant: ok") == conv("line one\nline two", "ok")
    assert parse_hh_dialogue("preamble\n\nHuman: q\n\nAssistant: a").reason == "turns.role_order"
    assert parse_hh_dialogue("\n\nHuman: q").reason == "turns.role_order"  # no reply to prefer
    other_prompt = HH_REJECTED.replace("Tell me a joke", "Tell me a story")
    assert from_hh({"chosen": HH_CHOSEN, "rejected": other_prompt}).reason == "pair.prompt_mismatch"
    assert from_hh({"chosen": HH_CHOSEN}).reason == "format.missing_turns"


def test_hh_file(tmp_path):
    write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"chosen": 1, "rejected": 2}])
    rows = list(read_pairs(HHSource(name="hh", type="hh", path="hh.jsonl"), tmp_path))
    assert rows[0].value.chosen == "Why did the chicken cross the road?"
    assert rows[1].value.reason == "format.missing_turns"


def test_hf_pairs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "no"}])
    hh = list(read_pairs(HFPairsSource(name="h", type="hf", dataset="json", data_files=["hh.jsonl"]), tmp_path))
    pairs = list(read_pairs(HFPairsSource(name="p", type="hf", dataset="json", data_files=["pairs.jsonl"]), tmp_path))
    assert hh[0].value == from_hh({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert pairs[0].value == Pair(conv("q"), "yes", "no")


def conversations(tmp_path, n: int, reverse: bool = False) -> list:
    records = [{"messages": conv(f"question {k}", f"answer {k}", f"follow-up {k}", f"reply {k}")} for k in range(n)]
    write_jsonl(tmp_path / "c.jsonl", records[::-1] if reverse else records)
    return list(read_conversations(MessagesSource(name="c", type="messages", path="c.jsonl"), tmp_path))


def by_id(pairs) -> dict:
    return {p.id: p.value for p in pairs}


def test_relevance_rejected_comes_from_another_conversation_of_the_same_split(tmp_path):
    convs = conversations(tmp_path, 60)
    pairs = list(relevance_pairs(convs, "rel", seed=0, val_ratio=0.2))
    assert len(pairs) == 60 and {p.id for p in pairs} == {c.id for c in convs}
    last_reply = {c.value[-1]["content"]: c for c in convs}
    for conversation in convs:
        pair = by_id(pairs)[conversation.id]
        assert pair.prompt == conversation.value[:-1]
        assert pair.chosen == conversation.value[-1]["content"]
        donor = last_reply[pair.rejected]
        assert donor.id != conversation.id
        assert is_val(donor.id, 0.2) == is_val(conversation.id, 0.2)  # no val reply leaks into train pairs
    assert len({p.value.rejected for p in pairs}) > 20  # not one donor for all


def test_relevance_is_deterministic_with_the_seed_and_ignores_input_order(tmp_path):
    convs = conversations(tmp_path, 40)
    first = by_id(relevance_pairs(convs, "rel", seed=1, val_ratio=0.1))
    assert first == by_id(relevance_pairs(convs, "rel", seed=1, val_ratio=0.1))
    assert first == by_id(relevance_pairs(conversations(tmp_path, 40, reverse=True), "rel", seed=1, val_ratio=0.1))
    other_seed = by_id(relevance_pairs(convs, "rel", seed=2, val_ratio=0.1))
    assert sum(first[k].rejected != other_seed[k].rejected for k in first) > 10


def test_relevance_alone_in_its_split_is_rejected(tmp_path):
    convs = conversations(tmp_path, 1)
    (pair,) = relevance_pairs(convs, "rel", seed=0, val_ratio=0.5)
    assert pair.value.reason == "pair.no_other"
    assert json.loads(pair.raw)["messages"] == convs[0].value
