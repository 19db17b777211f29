"""The chat_data stage body: tokenization, truncation, masks, accounting and quarantine, split, outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmpipe.config import ConfigError, load_section
from llmpipe.data.steps import Reject
from llmpipe.errors import UserError
from llmpipe.finetune import chat_data
from llmpipe.finetune.chat_data import ChatDataConfig, encode_conversation, encode_pair
from llmpipe.finetune.preferences import Pair
from llmpipe.io import hash_tree, read_json
from llmpipe.tokenizer.encode import is_val
from tests.finetune.chat_fixtures import (ALICE, BOB, WHEEL, chat_project, chat_tok,  # noqa: F401
                                          chat_tokenizer_dir, chitchat_conversation, conv, make_wheel, run_chat_data,
                                          write_jsonl)

LONG = " ".join(["many words make this turn long"] * 12)


def template_length(tok, messages, **kw) -> int:
    return len(tok.apply_chat_template(messages, **kw))


# -- tokenizing, truncation, masks --------------------------------------------------------------------

def test_truncation_keeps_the_system_message_and_the_latest_exchanges(chat_tok):
    messages = conv("first question " + LONG, "first answer " + LONG, "second question", "second answer",
                    "third question", "third answer", system="You are terse.")
    kept = [messages[0], *messages[3:]]
    budget = template_length(chat_tok, kept)
    assert template_length(chat_tok, messages) > budget  # the first exchange must go
    encoded = encode_conversation(chat_tok, messages, budget)
    assert encoded.ids == chat_tok.apply_chat_template(kept) and encoded.truncated
    text = chat_tok.decode(encoded.ids, skip_special=False)
    assert text.startswith("<|system|>You are terse.<|end|><|user|>second question")
    assert "first" not in text and text.endswith("third answer<|end|>")
    whole = encode_conversation(chat_tok, messages, template_length(chat_tok, messages))
    assert whole.ids == chat_tok.apply_chat_template(messages) and not whole.truncated


def test_too_long_even_for_the_last_exchange(chat_tok):
    messages = conv("hi", "hello", "question " + LONG, "answer " + LONG)
    last = template_length(chat_tok, messages[2:])
    assert isinstance(encode_conversation(chat_tok, messages, last), chat_data.Encoded)
    rejected = encode_conversation(chat_tok, messages, last - 1)
    assert rejected == Reject("length.too_long", rejected.detail) and str(last) in rejected.detail


def masked_spans(ids, mask) -> list[list[int]]:
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_mask_is_true_exactly_on_assistant_content_and_its_end_of_turn(chat_tok):
    messages = conv("hello there", "hi! how are you", "fine", "good to hear", system="be nice")
    encoded = encode_conversation(chat_tok, messages, 1000)
    assert len(encoded.mask) == len(encoded.ids)
    expected = [chat_tok.encode(m["content"]) + [chat_tok.end_of_turn_id] for m in messages if m["role"] == "assistant"]
    assert masked_spans(encoded.ids, encoded.mask) == expected
    for i, m in zip(encoded.ids, encoded.mask):
        if i in (chat_tok.assistant_id, chat_tok.user_id, chat_tok.system_id):
            assert not m
    # the end_of_turn of user and system messages is not learned
    ends = [m for i, m in zip(encoded.ids, encoded.mask) if i == chat_tok.end_of_turn_id]
    assert ends == [False, False, True, False, True]


def test_pair_prompt_ends_with_the_assistant_id_and_is_truncated_to_fit(chat_tok):
    prompt = conv("old question " + LONG, "old answer " + LONG, "new question", system="sys")
    pair = Pair(prompt, "the chosen reply", "no")
    encoded = encode_pair(chat_tok, pair, 1000)
    assert encoded.prompt_ids == chat_tok.apply_chat_template(prompt, add_generation_prompt=True)
    assert encoded.prompt_ids[-1] == chat_tok.assistant_id and not encoded.truncated
    assert encoded.chosen_ids == chat_tok.encode("the chosen reply") + [chat_tok.end_of_turn_id]
    assert encoded.rejected_ids == chat_tok.encode("no") + [chat_tok.end_of_turn_id]
    short = [prompt[0], prompt[3]]
    fits = template_length(chat_tok, short, add_generation_prompt=True) + len(encoded.chosen_ids)
    cut = encode_pair(chat_tok, pair, fits)
    assert cut.truncated and cut.prompt_ids == chat_tok.apply_chat_template(short, add_generation_prompt=True)
    assert len(cut.prompt_ids) + max(len(cut.chosen_ids), len(cut.rejected_ids)) <= fits
    assert encode_pair(chat_tok, pair, fits - 1).reason == "length.too_long"


# -- the stage ------------------------------------------------------------------------------------------

def good_and_bad_records() -> list:
    return [{"messages": conv("hi", "hello")},
            {"messages": conv("what is two plus two", "four", "and three", "five", system="math tutor")},
            '{"messages": oops',
            {"messages": []},
            {"messages": conv("q", "")},
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            {"messages": conv("hi", LONG * 4)},
            '{"messages": [{"role": "user", "content": "lone \\ud800"}, {"role": "assistant", "content": "b"}]}']


def stage_project(root: Path) -> dict:
    write_jsonl(root / "data" / "chat.jsonl", good_and_bad_records())
    make_wheel(root / WHEEL, {f"c{k}": chitchat_conversation((ALICE, [f"hello number {k}"]), (BOB, [f"reply {k}"]))
                              for k in range(6)} | {"lonely": chitchat_conversation((ALICE, ["anyone?"]))})
    write_jsonl(root / "data" / "pairs.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"},
                                                {"prompt": "q", "chosen": "same", "rejected": "same"}])
    return {"sources": [{"name": "chitchat", "type": "chitchat"},
                        {"name": "mine", "type": "messages", "path": "data/chat.jsonl"}],
            "preferences": [{"name": "rel", "type": "relevance", "from": "chitchat"},
                            {"name": "pairs", "type": "pairs", "path": "data/pairs.jsonl"}],
            "max_tokens": 64, "val_ratio": 0.3}


def table(root: Path, rel: str) -> list[dict]:
    return pq.read_table(root / "data" / "chat" / rel).to_pylist()


def test_stage_accounts_for_every_record(chat_project, chat_tok):
    settings = stage_project(chat_project)
    metrics = run_chat_data(chat_project, **settings)
    meta = read_json(chat_project / "data" / "chat" / "meta.json")
    sft = meta["counts"]["sft"]
    assert sft["read"] == {"chitchat": 7, "mine": 8}
    assert sft["kept"] == {"chitchat": 6, "mine": 2}
    assert sft["rejected"] == {"chitchat": {"format.missing_turns": 1},
                               "mine": {"format.bad_json": 1, "format.missing_turns": 1, "turns.empty": 1,
                                        "turns.role_order": 1, "length.too_long": 1, "format.bad_unicode": 1}}
    quarantine = table(chat_project, "quarantine/sft.parquet")
    assert Counter((q["source"], q["reason"]) for q in quarantine) == Counter(
        {(s, r): n for s, reasons in sft["rejected"].items() for r, n in reasons.items()})
    assert any(q["origin"] == "data/chat.jsonl:3" and q["raw"] == '{"messages": oops' for q in quarantine)
    rows = table(chat_project, "sft/train.parquet") + table(chat_project, "sft/val.parquet")
    assert len(rows) == 8 == metrics["sft_records_kept"] and metrics["sft_records_read"] == 15
    assert all(len(r["ids"]) == len(r["mask"]) <= 64 for r in rows)
    assert meta["max_tokens"] == 64 and meta["tokenizer_hash"] == chat_tok.hash

    dpo = meta["counts"]["dpo"]
    assert dpo["read"] == {"rel": 6, "pairs": 2} and dpo["rejected"]["pairs"] == {"pair.identical": 1}
    pairs = table(chat_project, "dpo/train.parquet") + table(chat_project, "dpo/val.parquet")
    assert len(pairs) == metrics["dpo_records_kept"] == 8 - sum(sum(r.values()) for r in dpo["rejected"].values())
    assert all(p["prompt_ids"][-1] == chat_tok.assistant_id for p in pairs)
    assert metrics["dpo_records_read"] == metrics["dpo_records_kept"] + metrics["dpo_records_rejected"]


def test_nothing_kept_still_gives_empty_tables(chat_project):
    write_jsonl(chat_project / "data" / "bad.jsonl", ["not json", {"messages": []}])
    metrics = run_chat_data(chat_project, sources=[{"name": "bad", "type": "messages", "path": "data/bad.jsonl"}],
                            preferences=[{"name": "rel", "type": "relevance", "from": "bad"}])
    assert (metrics["sft_records_read"], metrics["sft_records_rejected"], metrics["sft_truncated"]) == (2, 2, 0)
    assert metrics["dpo_records_read"] == 0
    for rel in ("sft/train.parquet", "sft/val.parquet", "dpo/train.parquet", "dpo/val.parquet"):
        assert table(chat_project, rel) == []
    assert len(table(chat_project, "quarantine/sft.parquet")) == 2


def test_rows_go_to_the_split_of_their_id_hash(chat_project):
    settings = stage_project(chat_project)
    run_chat_data(chat_project, **settings)
    for split in ("train", "val"):
        for row in table(chat_project, f"sft/{split}.parquet") + table(chat_project, f"dpo/{split}.parquet"):
            assert is_val(row["id"], 0.3) == (split == "val")


def split_ids(root: Path) -> dict[str, set]:
    return {split: {r["id"] for r in table(root, f"sft/{split}.parquet")} for split in ("train", "val")}


def test_split_is_stable_under_reordering(chat_project):
    records = [{"messages": conv(f"question {k}", f"answer {k}")} for k in range(80)]
    settings = {"sources": [{"name": "m", "type": "messages", "path": "data/m.jsonl"}], "preferences": []}
    write_jsonl(chat_project / "data" / "m.jsonl", records)
    run_chat_data(chat_project, **settings)
    forward = split_ids(chat_project)
    write_jsonl(chat_project / "data" / "m.jsonl", records[::-1])
    run_chat_data(chat_project, **settings)
    assert split_ids(chat_project) == forward
    assert 0 < len(forward["val"]) < 20  # val_ratio 0.05 of 80, roughly


def test_rerun_gives_byte_identical_outputs(chat_project):
    settings = stage_project(chat_project)
    first = run_chat_data(chat_project, **settings)
    before = hash_tree(chat_project / "data" / "chat")
    assert run_chat_data(chat_project, **settings) == first
    assert hash_tree(chat_project / "data" / "chat") == before


def test_a_failed_run_leaves_the_previous_output_whole(chat_project):
    settings = stage_project(chat_project)
    run_chat_data(chat_project, **settings)
    before = hash_tree(chat_project / "data" / "chat")
    broken = {**settings, "sources": [*settings["sources"], {"name": "gone", "type": "alpaca", "path": "nope.jsonl"}]}
    with pytest.raises(UserError, match="nope.jsonl: file not found"):
        run_chat_data(chat_project, **broken)
    assert hash_tree(chat_project / "data" / "chat") == before
    assert not list((chat_project / "data").glob(".tmp-*"))


def test_leftovers_of_a_killed_run_are_removed(chat_project):
    settings = stage_project(chat_project)
    leftover = chat_project / "data" / ".tmp-chat-deadbeef"
    (leftover / "sft").mkdir(parents=True)
    (leftover / "sft" / "train.parquet").write_bytes(b"half")
    run_chat_data(chat_project, **settings)
    assert not leftover.exists()
    assert sorted(p.name for p in (chat_project / "data" / "chat").iterdir()) == [
        "dpo", "lengths.png", "meta.json", "quarantine", "reject_reasons.png", "report.md", "sft"]


# -- config ---------------------------------------------------------------------------------------------

def test_defaults_read_the_chitchat_wheel_and_its_relevance_pairs():
    cfg = ChatDataConfig()
    assert [(s.name, s.type, s.path) for s in cfg.sources] == [("chitchat", "chitchat", WHEEL)]
    assert [(p.type, p.from_) for p in cfg.preferences] == [("relevance", "chitchat")]
    assert (cfg.val_ratio, cfg.max_tokens) == (0.05, 256)


@pytest.mark.parametrize("section, message", [
    ({"max_token": 10}, "max_token"),
    ({"sources": [{"name": "x", "type": "csv", "path": "a"}]}, "sources"),
    ({"sources": [{"name": "x", "type": "messages", "path": "a", "extra": 1}]}, "extra"),
    ({"preferences": [{"name": "r", "type": "relevance", "from": "nothing"}]}, "nothing"),
    ({"preferences": [{"name": "chitchat", "type": "pairs", "path": "p.jsonl"}]}, "repeated: chitchat"),
])
def test_bad_settings_are_config_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        load_section(ChatDataConfig, {"chat_data": section}, "chat_data", "params.yaml")


# -- the real wheel -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def real_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chitchat")
    subprocess.run([sys.executable, "-m", "pip", "download", "chitchat-dataset==0.9.0", "--no-deps", "-q", "-d",
                    str(out)], check=True)
    return out / Path(WHEEL).name


@pytest.mark.slow
def test_the_real_chitchat_wheel(chat_project, real_wheel):
    (chat_project / WHEEL).parent.mkdir(parents=True)
    shutil.copy(real_wheel, chat_project / WHEEL)
    metrics = run_chat_data(chat_project, max_tokens=512)
    meta = read_json(chat_project / "data" / "chat" / "meta.json")
    assert meta["counts"]["sft"]["read"] == {"chitchat": 7168}
    # 3,150 conversations in the file have one speaker only (nobody answered)
    assert meta["counts"]["sft"]["rejected"]["chitchat"]["format.missing_turns"] == 3150
    assert metrics["sft_records_kept"] > 3500 and metrics["dpo_records_kept"] > 3500
    rows = table(chat_project, "sft/val.parquet")
    assert 100 < len(rows) < 300 and all(len(r["ids"]) <= 512 for r in rows)


# A stage run in its own process whose Parquet writes pause after the first table: the test kills it
# there with SIGKILL, the moment a non-atomic writer would leave a half-new output behind.
KILLED_RUN = """
import json, pathlib, sys, time
import pyarrow.parquet as pq
from llmpipe import stages
from llmpipe.finetune import chat_data

root = pathlib.Path(sys.argv[1])
real_write = pq.write_table
def write_then_hang(*args, **kwargs):
    real_write(*args, **kwargs)
    (root / "first_table_written").touch()
    time.sleep(120)
pq.write_table = write_then_hang
stages.STAGES["chat_data"] = stages.StageSpec("chat_data", "", "", "", inputs={"tokenizer": "models/tokenizer"},
                                              outputs={"chat": "data/chat"})
cfg = chat_data.ChatDataConfig.model_validate(json.loads(sys.argv[2]))
chat_data.run(cfg, stages.StageContext(root=root, name="chat_data"))
"""


@pytest.mark.slow
def test_kill_while_writing_leaves_the_previous_output_whole(chat_project):
    import os
    import signal
    import time

    settings = stage_project(chat_project)
    run_chat_data(chat_project, **settings)
    before = hash_tree(chat_project / "data" / "chat")
    changed = {**settings, "max_tokens": 128}  # other rows: a half-written output would show
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(chat_project), json.dumps(changed)],
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (chat_project / "first_table_written").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the stage ended before writing"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert hash_tree(chat_project / "data" / "chat") == before
    assert list((chat_project / "data").glob(".tmp-chat-*"))  # the killed run's work, never at the final path
    metrics = run_chat_data(chat_project, **changed)
    assert not list((chat_project / "data").glob(".tmp-chat-*"))
    assert hash_tree(chat_project / "data" / "chat") != before and metrics["sft_records_read"] == 15
