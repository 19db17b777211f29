"""Reading conversations: every format into one shape, every rejection with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmpipe.data.steps import Reject
from llmpipe.errors import UserError
from llmpipe.finetune.conversations import (AlpacaSource, ChitchatSource, HFSource, MessagesSource, ShareGPTSource,
                                            check_turns, read_conversations)
from tests.finetune.chat_fixtures import ALICE, BOB, chitchat_conversation, conv, make_wheel, write_jsonl


def read(src, root: Path) -> list:
    return list(read_conversations(src, root))


def test_openai_messages_jsonl(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv("hi", "hello", system="be brief")},
                                          {"messages": conv("q", "a", "q2", "a2")}])
    rows = read(MessagesSource(name="m", type="messages", path="chat.jsonl"), tmp_path)
    assert [r.value for r in rows] == [conv("hi", "hello", system="be brief"), conv("q", "a", "q2", "a2")]
    assert [r.origin for r in rows] == ["chat.jsonl:1", "chat.jsonl:2"]
    assert all(r.source == "m" for r in rows)


def test_sharegpt_json_list(tmp_path):
    record = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "hi"},
                                {"from": "gpt", "value": "hello"}]}
    (tmp_path / "share.json").write_text(json.dumps([record]))
    rows = read(ShareGPTSource(name="s", type="sharegpt", path="share.json"), tmp_path)
    assert [r.value for r in rows] == [conv("hi", "hello", system="sys")]


def test_same_conversation_same_id_in_any_format(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"messages": conv("hi", "hello")}])
    write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                          {"from": "gpt", "value": "hello"}]}])
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "input": "", "output": "hello"}])
    ids = {read(cls(name="x", type=t, path=f"{t[0]}.jsonl"), tmp_path)[0].id
           for cls, t in ((MessagesSource, "messages"), (ShareGPTSource, "sharegpt"), (AlpacaSource, "alpaca"))}
    assert len(ids) == 1


def test_alpaca_input_joined_to_the_instruction(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": "bonjour", "output": "hello"},
                                       {"instruction": "Say hi", "input": "  ", "output": "hi"},
                                       {"instruction": "Say hi", "output": "hi"}])
    rows = read(AlpacaSource(name="a", type="alpaca", path="a.jsonl"), tmp_path)
    assert [r.value for r in rows] == [conv("Translate\n\nbonjour", "hello"), conv("Say hi", "hi"), conv("Say hi", "hi")]


def test_chitchat_wheel_turns(tmp_path):
    make_wheel(tmp_path / "w.whl", {
        "c1": chitchat_conversation((ALICE, ["Hello", "How are you?"]), (BOB, ["fine", "", "you?"]),
                                    (ALICE, ["good"]), (BOB, ["nice"]), (ALICE, ["bye (no answer)"])),
        "c2": chitchat_conversation((ALICE, ["anyone there?", "hello?"])),
        "c3": chitchat_conversation((BOB, ["first"]), (BOB, ["same sender again"]), (ALICE, ["reply"])),
    })
    rows = read(ChitchatSource(name="cc", type="chitchat", path="w.whl"), tmp_path)
    assert [r.origin for r in rows] == ["w.whl:c1", "w.whl:c2", "w.whl:c3"]
    # same sender merged with "\n" (blank messages skipped), first sender = user, trailing user turn dropped
    assert rows[0].value == conv("Hello\nHow are you?", "fine\nyou?", "good", "nice")
    assert rows[1].value == Reject("format.missing_turns", "one speaker only: nobody answered")
    assert rows[2].value == conv("first\nsame sender again", "reply")
    assert json.loads(rows[1].raw)["key"] == "c2"  # the quarantine can name the conversation


def test_chitchat_missing_wheel_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="run the chitchat stage"):
        read(ChitchatSource(name="cc", type="chitchat", path="missing.whl"), tmp_path)


@pytest.mark.parametrize("record, reason", [
    ('{"messages": [', "format.bad_json"),
    ('[1, 2]', "format.bad_json"),
    ({"text": "no messages"}, "format.missing_turns"),
    ({"messages": []}, "format.missing_turns"),
    ({"messages": [{"role": "system", "content": "only"}]}, "format.missing_turns"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "format.missing_turns"),
    ({"messages": conv("hi", "   ")}, "turns.empty"),
    ({"messages": conv("", "a")}, "turns.empty"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "turns.role_order"),
    ({"messages": conv("q", "a", "unanswered")}, "turns.role_order"),
    ({"messages": conv("q", "a") + [{"role": "system", "content": "late"}]}, "turns.role_order"),
    ({"messages": conv("q") + conv("q again", "a")}, "turns.role_order"),
    ({"messages": conv("q") + [{"role": "system", "content": "mid"}, {"role": "assistant", "content": "a"}]},
     "turns.role_order"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}]}, "turns.role_order"),
    ('{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}',
     "format.bad_unicode"),
])
def test_rejections_have_their_reason(tmp_path, record, reason):
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": conv("good", "row")}, record])
    rows = read(MessagesSource(name="m", type="messages", path="bad.jsonl"), tmp_path)
    assert rows[0].value == conv("good", "row")  # a bad line does not stop the file
    assert isinstance(rows[1].value, Reject) and rows[1].value.reason == reason
    assert rows[1].raw.strip()  # the raw record goes to the quarantine


def test_non_utf8_line_is_rejected_and_the_rest_read(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "\xff"}]}\n'
                     + json.dumps({"messages": conv("q", "a")}).encode() + b"\n")
    rows = read(MessagesSource(name="m", type="messages", path="x.jsonl"), tmp_path)
    assert rows[0].value.reason == "format.bad_json" and "UTF-8" in rows[0].value.detail
    assert rows[1].value == conv("q", "a")


def test_sharegpt_unknown_speaker(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "robot", "value": "hi"}]}])
    rows = read(ShareGPTSource(name="s", type="sharegpt", path="s.jsonl"), tmp_path)
    assert rows[0].value.reason == "turns.role_order" and "robot" in rows[0].value.detail


def test_check_turns_accepts_a_system_message_first_only():
    assert check_turns(conv("q", "a", system="s")) == conv("q", "a", system="s")
    assert check_turns(conv("q"), last="user") == conv("q")


def test_hf_dataset_by_name_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_jsonl(tmp_path / "hf" / "rows.jsonl", [{"messages": conv("q1", "a1")},
                                                 {"conversations": [{"from": "human", "value": "q2"},
                                                                    {"from": "gpt", "value": "a2"}]},
                                                 {"instruction": "q3", "output": "a3"},
                                                 {"other": "x"}])
    src = HFSource(name="h", type="hf", dataset="json", data_files=["hf/rows.jsonl"])
    rows = read(src, tmp_path)
    assert [r.value for r in rows[:3]] == [conv("q1", "a1"), conv("q2", "a2"), conv("q3", "a3")]
    assert rows[3].value.reason == "format.missing_turns"
    assert rows[0].origin == "hf:json:train#0"
    limited = read(HFSource(name="h", type="hf", dataset="json", data_files=["hf/rows.jsonl"], limit=2), tmp_path)
    assert len(limited) == 2
