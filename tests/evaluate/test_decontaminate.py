"""Decontamination finds planted overlaps: a 13-word run copied from training is found (whatever its
case and punctuation), a 12-word run is not, disjoint text finds nothing; the index holds the train
split of the token shards (data/dedup encoded by the tokenizer's split rule) and the fine-tuning
data, never a val document; the report counts per task."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpipe.data.accounting import Record, content_id, write_records
from llmpipe.errors import UserError
from llmpipe.evaluate import decontaminate as dc
from llmpipe.evaluate.decontaminate import NgramIndex, decontaminate, training_texts
from llmpipe.finetune.chat_data import DPO_SCHEMA, SFT_SCHEMA
from llmpipe.tokenizer import encode
from llmpipe.tokenizer.encode import is_val
from llmpipe.tokenizer.shards import open_split
from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer
from tests.finetune.chat_fixtures import chat_tokenizer_dir  # noqa: F401 (a fixture)
from tests.tokenizer.synthetic import WORDS

VAL_RATIO = 0.5


def training_words(seed: int = 0, count: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(WORDS) for _ in range(count)]


def filler(prefix: str, count: int) -> list[str]:
    """Words that occur in no training text."""
    return [f"{prefix}{k}" for k in range(count)]


@pytest.fixture(scope="module")
def train_words() -> list[str]:
    return training_words()


@pytest.fixture(scope="module")
def index(train_words) -> NgramIndex:
    return NgramIndex.build([" ".join(train_words), "An unrelated second training text, of a few more words."])


def planted(run: list[str]) -> str:
    return " ".join(filler("before", 20) + run + filler("after", 20))


def test_a_copied_13_word_run_is_found_and_a_12_word_run_is_not(index, train_words):
    run13, run12 = train_words[100:113], train_words[200:212]
    assert index.contaminated(planted(run13))
    assert index.overlap(planted(run13)) == pytest.approx(1 / (53 - 13 + 1))  # one n-gram of 41
    assert index.overlap(planted(train_words[100:114])) == pytest.approx(2 / (54 - 13 + 1))
    assert not index.contaminated(planted(run12))
    assert index.overlap(planted(run12)) == 0.0


def test_case_punctuation_and_whitespace_are_normalized_away(index, train_words):
    run = train_words[300:313]
    mangled = [w.upper() if k % 2 else w.capitalize() for k, w in enumerate(run)]
    mangled[3] = f'"{mangled[3]},'
    mangled[7] = f"({mangled[7]})!"
    text = "  \n\t ".join(filler("x", 5)) + " " + "  \n".join(mangled) + "... " + " ".join(filler("y", 5))
    assert index.contaminated(text)
    # punctuation is a word break, as a space is: "a-b" in an eval item matches "a b" in training
    hyphenated = "-".join(run[:2]) + " " + " ".join(run[2:])
    assert index.contaminated(hyphenated)
    # a changed word in the middle breaks every 13-gram
    assert not index.contaminated(" ".join(run[:6] + ["changed"] + run[7:]))
    # the same words in another order are another n-gram
    assert not index.contaminated(" ".join(reversed(run)))


def test_disjoint_text_finds_nothing(index):
    disjoint = [" ".join(filler(f"doc{k}w", 200)) for k in range(5)] + ["", "   ", "!!! ..."]
    assert not any(index.contaminated(doc) for doc in disjoint)
    assert [index.overlap(doc) for doc in disjoint] == [0.0] * len(disjoint)


def test_a_text_shorter_than_n_matches_only_the_same_short_text():
    index = NgramIndex.build(["Hello there, friend.", " ".join(training_words(1, 40))])
    assert index.contaminated("hello THERE friend!")
    assert index.overlap("hello there friend") == 1.0
    assert not index.contaminated("hello there")
    assert not index.contaminated("hello there friend " + " ".join(filler("z", 20)))


def test_texts_added_after_a_lookup_are_found(monkeypatch, train_words):
    monkeypatch.setattr(dc, "_COMPACT_MIN", 1)  # merge into the sorted array after every text
    index = NgramIndex(13)
    index.add(" ".join(train_words[:50]))
    assert index.contaminated(" ".join(train_words[:13]))
    assert not index.contaminated(" ".join(train_words[200:213]))
    index.add(" ".join(train_words[150:250]))
    index.add(" ".join(train_words[250:300]))
    assert index.contaminated(" ".join(train_words[200:213]))
    assert index.contaminated(" ".join(train_words[:13]))  # still held after merging
    assert index.texts == 3
    assert len(index) == (50 - 12) + (100 - 12) + (50 - 12)


def test_the_report_counts_per_task_and_the_mode_decides_what_is_kept(index, train_words):
    clean = [" ".join(filler(f"clean{k}w", 30)) for k in range(3)]
    tasks = {"cloze": [clean[0], planted(train_words[10:30]), clean[1], clean[2]],
             "bpb": clean[:2], "empty": []}

    kept, report = decontaminate(tasks, index, mode="exclude")
    assert kept == {"cloze": [0, 2, 3], "bpb": [0, 1], "empty": []}
    assert report["cloze"] == {"docs": 4, "contaminated": 1, "fraction": 0.25, "excluded": 1, "n": 13}
    assert report["bpb"] == {"docs": 2, "contaminated": 0, "fraction": 0.0, "excluded": 0, "n": 13}
    assert report["empty"] == {"docs": 0, "contaminated": 0, "fraction": 0.0, "excluded": 0, "n": 13}

    kept, report = decontaminate(tasks, index, mode="flag")
    assert kept["cloze"] == [0, 1, 2, 3]
    assert report["cloze"] == {"docs": 4, "contaminated": 1, "fraction": 0.25, "excluded": 0, "n": 13}
    assert dc.find_contaminated(tasks["cloze"], index) == [1]

    with pytest.raises(UserError, match="exclude, flag"):
        decontaminate(tasks, index, mode="drop")


# -- the training data of a project ---------------------------------------------------------------

def document(k: int) -> str:
    """Document k: words of its own, so no two documents share an n-gram."""
    return " ".join(f"doc{k}word{j}" for j in range(30)) + "."


@pytest.fixture
def project(tmp_path, chat_tokenizer_dir) -> Path:  # noqa: F811
    """data/dedup in two parts (the data stages' writer), encoded into data/tokens/{train,val} as the
    tokenizer stage does (its split rule), and the chat data tables."""
    root = tmp_path / "project"
    shutil.copytree(chat_tokenizer_dir, root / "models" / "tokenizer")
    tok = Tokenizer.load(root / "models" / "tokenizer")
    records = [Record(content_id(document(k)), "synthetic", document(k)) for k in range(16)]
    write_records(root / "data" / "dedup" / "part-00000.parquet", records[:8])
    write_records(root / "data" / "dedup" / "part-00001.parquet", records[8:])
    encode.encode_corpus(tok, encode.input_files(root / "data" / "dedup"), root / "data" / "tokens", VAL_RATIO,
                         shard_tokens=500, num_threads=1, meta={})
    write_chat(root / "data" / "chat", tok)
    return root


USER = "could you please tell me which of the two roads leads down to the old mill by the river"
REPLY = "take the left road past the church and keep walking until you hear the water wheel turning"
PROMPT = "what should i bring along for a long walk in the hills on a cold and windy day"
CHOSEN = "bring a warm coat a hat some water and a map because the weather can change very fast up there"
REJECTED = "nothing at all because walking in the hills is always easy and the sun always shines there"
HELD_OUT_REPLY = "this reply is only in the val table and the models never trained on it at any point"


def write_chat(chat_dir: Path, tok: Tokenizer) -> None:
    """data/chat/{sft,dpo}/{train,val}.parquet as the chat_data stage writes them (ids, not text)."""
    conversation = tok.apply_chat_template([{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}])
    held_out = tok.apply_chat_template([{"role": "user", "content": USER},
                                        {"role": "assistant", "content": HELD_OUT_REPLY}])
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    chosen, rejected = tok.encode(CHOSEN) + [tok.end_of_turn_id], tok.encode(REJECTED) + [tok.end_of_turn_id]
    for split, ids in (("train", conversation), ("val", held_out)):
        (chat_dir / "sft").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": ["c"], "ids": [ids], "mask": [[True] * len(ids)]}, schema=SFT_SCHEMA),
                       chat_dir / "sft" / f"{split}.parquet")
    (chat_dir / "dpo").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["p"], "prompt_ids": [prompt], "chosen_ids": [chosen], "rejected_ids": [rejected]},
                            schema=DPO_SCHEMA), chat_dir / "dpo" / "train.parquet")


def split_documents() -> tuple[list[str], list[str]]:
    docs = [document(k) for k in range(16)]
    train = [d for d in docs if not is_val(content_id(d), VAL_RATIO)]
    val = [d for d in docs if is_val(content_id(d), VAL_RATIO)]
    assert train and val, "the fixture needs documents on both sides of the split"
    return train, val


def test_the_index_holds_the_train_split_and_never_a_val_document(project):
    train, val = split_documents()
    assert len(open_split(project / "data" / "tokens" / "train").shards) > 1  # documents cross shard ends
    texts = list(training_texts(project, chat=None))
    assert texts == train  # the tokenizer's order (sorted parts, row order), over two shards
    index = NgramIndex.build(texts)
    assert all(index.contaminated(doc) for doc in train)
    assert not any(index.contaminated(doc) for doc in val)

    _, report = decontaminate({"heldout": val, "seen": train[:2] + val[:2]}, index)
    assert report["heldout"]["contaminated"] == 0
    assert report["seen"] == {"docs": 4, "contaminated": 2, "fraction": 0.5, "excluded": 2, "n": 13}


def test_the_fine_tuning_conversations_are_in_the_index_as_decoded_text(project):
    train, _ = split_documents()
    texts = list(training_texts(project))
    assert texts[:len(train)] == train
    assert texts[len(train):] == [f"{USER}\n{REPLY}", f"{PROMPT}\n{CHOSEN}", f"{PROMPT}\n{REJECTED}"]
    index = NgramIndex.build(texts)
    for seen in (REPLY, CHOSEN.upper(), REJECTED):
        assert index.contaminated(f"Assistant: {seen}?"), seen
    # the held-out conversation shares only its user turn with training: its reply is clean
    assert not index.contaminated(HELD_OUT_REPLY)
    # a 13-gram across the end of one turn and the start of the next: found, since the turns are
    # decoded apart (decoding the ids whole drops the role tokens and glues "river" to "take")
    assert index.contaminated(" ".join(USER.split()[-6:] + REPLY.split()[:7]))


def test_missing_inputs_name_the_stage_to_run(project):
    (project / "data" / "chat" / "dpo" / "train.parquet").unlink()
    with pytest.raises(UserError, match="chat_data"):
        list(training_texts(project))
    shutil.rmtree(project / "data" / "tokens")
    with pytest.raises(UserError, match="tokenizer stage"):
        list(training_texts(project, chat=None))
