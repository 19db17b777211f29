"""The local lm-eval tasks: they load as lm-eval tasks from their directory, build the requests a model
would get, hold exactly the held-out text they were given, and are the same for the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpipe.errors import UserError
from llmpipe.evaluate.tasks import (BPB, CHAT_REPLY, CLOZE, CONTINUATION, build_examples, keep_examples,
                                    example_texts, passages, read_examples, write_tasks)
from tests.helpers import ROOT

ALL_TASKS = [BPB, CLOZE, CONTINUATION, CHAT_REPLY]


def _paragraph(doc: int, par: int, words: int = 24, end: str = ".") -> str:
    # Words unique to (doc, paragraph), two per line, so passages keep their own line breaks.
    tokens = [f"w{doc}x{par}x{k}" for k in range(words)]
    lines = [" ".join(tokens[k:k + 2]) for k in range(0, words, 2)]
    return "\n".join(lines) + end


def make_docs(n: int = 6) -> list[str]:
    docs = []
    for d in range(n):
        # a speaker line too short to be a passage, then three passages
        docs.append(f"SPEAKER{d}.\n\n" + "\n\n".join(_paragraph(d, p) for p in range(3)) + "\n")
    return docs


def make_conversations() -> list[list[dict[str, str]]]:
    convs = []
    for c in range(6):
        convs.append([{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"hello {c}"},
                      {"role": "assistant", "content": f"hi there {c}"},
                      {"role": "user", "content": f"how are you {c}?"},
                      {"role": "assistant", "content": f"  fine, thanks {c}  "}])
    return convs


def normalized(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def task_manager_cls():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    return TaskManager


def load_tasks(out_dir: Path, names: list[str], task_manager_cls) -> dict:
    manager = task_manager_cls(include_path=str(out_dir), include_defaults=False)
    tasks = manager.load(names)["tasks"]
    for task in tasks.values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
    return tasks


# -- lm-eval loads them and builds the requests --------------------------------------------------------

def test_every_task_loads_and_builds_its_requests(tmp_path, task_manager_cls):
    examples = build_examples(make_docs(), make_conversations(), seed=3, limit=None, choices=4)
    names = write_tasks(tmp_path / "tasks", examples)
    assert names == ALL_TASKS
    tasks = load_tasks(tmp_path / "tasks", names, task_manager_cls)
    assert sorted(tasks) == sorted(ALL_TASKS)
    assert sorted(load_tasks(tmp_path / "tasks", ["llmpipe"], task_manager_cls)) == sorted(ALL_TASKS)  # the tag

    bpb = tasks[BPB].instances
    assert [i.request_type for i in bpb] == ["loglikelihood_rolling"] * 6
    assert sorted(i.arguments for i in bpb) == sorted((doc,) for doc in make_docs())

    cloze = tasks[CLOZE].instances
    assert [i.request_type for i in cloze] == ["loglikelihood"] * 18
    assert sorted(i.arguments for i in cloze) == sorted((ex["context"], ex["target"]) for ex in examples[CLOZE])

    for name in (CONTINUATION, CHAT_REPLY):
        instances = tasks[name].instances
        expected = [(ex["context"], " " + choice) for ex in examples[name] for choice in ex["choices"]]
        assert all(i.request_type == "loglikelihood" for i in instances)
        assert len(instances) == len(expected) == 4 * len(examples[name])
        assert sorted(i.arguments for i in instances) == sorted(expected)
    assert len(examples[CONTINUATION]) == 18 and len(examples[CHAT_REPLY]) == 6


@pytest.mark.slow
def test_tasks_run_offline_from_another_working_directory(tmp_path):
    """A whole lm-eval run (its dummy model) with the hub unreachable, from a directory that is neither
    the project nor the tasks': the data paths are absolute and nothing is downloaded."""
    names = write_tasks(tmp_path / "tasks", build_examples(make_docs(), make_conversations(), seed=0))
    for name in names:
        config = yaml.safe_load((tmp_path / "tasks" / f"{name}.yaml").read_text())
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert Path(data_file).is_absolute() and Path(data_file).exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import json, sys\n"
        "import lm_eval\n"
        "from lm_eval.tasks import TaskManager\n"
        f"manager = TaskManager(include_path={str(tmp_path / 'tasks')!r}, include_defaults=False)\n"
        f"out = lm_eval.simple_evaluate(model='dummy', tasks={names!r}, task_manager=manager)\n"
        "print(json.dumps({t: {k.split(',')[0]: v for k, v in r.items() if ',' in k and 'stderr' not in k}\n"
        "                  for t, r in out['results'].items()}))\n"
        "print(json.dumps({t: n['effective'] for t, n in out['n-samples'].items()}))\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics, samples = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert samples == {name: len(read_examples(tmp_path / "tasks", name)) for name in names}
    assert sorted(metrics[BPB]) == ["bits_per_byte", "byte_perplexity", "word_perplexity"]
    assert metrics[BPB]["bits_per_byte"] > 0  # the dummy model's log-likelihoods are negative
    assert sorted(metrics[CLOZE]) == ["acc", "perplexity"]
    for name in (CONTINUATION, CHAT_REPLY):
        assert sorted(metrics[name]) == ["acc", "acc_norm"] and 0 <= metrics[name]["acc"] <= 1


# -- the data is the held-out text ---------------------------------------------------------------------

def test_data_files_hold_exactly_the_examples(tmp_path):
    examples = build_examples(make_docs(), make_conversations(), seed=1, limit=None)
    write_tasks(tmp_path, examples)
    for name in ALL_TASKS:
        assert read_examples(tmp_path, name) == examples[name]
    assert sorted(ex["text"] for ex in examples[BPB]) == sorted(make_docs())


def test_cloze_is_the_passage_without_its_last_word():
    doc = "Title\n\n" + "one two three four\nfive six seven eight!\n\nshort one\n\n" + "alpha beta gamma, delta --\n"
    [a] = build_examples([doc], seed=0, min_words=4)[CLOZE]
    # "alpha ... --": the last word is punctuation only, so that passage makes no cloze
    assert (a["context"], a["target"]) == ("one two three four\nfive six seven", " eight")


def test_passages_are_long_paragraphs_cut_at_max_words():
    doc = "a b\n\n" + " ".join(f"x{k}" for k in range(30)) + "\n \n" + "p q r s t"
    cut = passages([doc], min_words=5, max_words=10)
    assert [p.text for p in cut] == [" ".join(f"x{k}" for k in range(10)), "p q r s t"]


def test_continuation_choices_are_the_true_half_and_halves_from_other_documents():
    docs = make_docs()
    docs.append(docs[0])  # a repeated document: its halves equal doc 0's and must never be a distractor
    examples = build_examples(docs, seed=5, limit=None, choices=4)[CONTINUATION]
    by_passage = {normalized(p.text): p.doc for p in passages(docs)}
    for ex in examples:
        truth = ex["choices"][ex["label"]]
        assert normalized(ex["context"] + " " + truth) in by_passage
        assert len(ex["choices"]) == 4 and len(set(ex["choices"])) == 4
        assert [c for c in ex["choices"] if c.strip() == truth.strip()] == [truth]
        for choice in ex["choices"]:
            if choice != truth:
                # a distractor is the second half of a passage of another document
                source = [p for p in passages(docs) if p.text.endswith(choice)]
                assert source and all(docs[p.doc] != docs[ex["doc"]] for p in source)
    assert len({ex["label"] for ex in examples}) > 1  # the answer is not always in the same place


def test_chat_reply_context_is_the_plain_text_conversation():
    convs = make_conversations()
    [ex] = [e for e in build_examples(make_docs(), convs, seed=0, limit=None)[CHAT_REPLY] if e["doc"] == 2]
    assert ex["context"] == ("System: Be brief.\nUser: hello 2\nAssistant: hi there 2\n"
                             "User: how are you 2?\nAssistant:")
    assert ex["choices"][ex["label"]] == "fine, thanks 2"
    assert all(c.startswith("fine, thanks ") for c in ex["choices"])  # other conversations' last replies


def test_chat_reply_skips_conversations_without_a_user_turn_before_a_reply():
    convs = make_conversations()
    convs.insert(1, [{"role": "user", "content": "anyone?"}])
    convs.insert(3, [{"role": "system", "content": "s"}, {"role": "assistant", "content": "unprompted"}])
    convs.append([{"role": "user", "content": "again"}, {"role": "assistant", "content": "fine, thanks 0"}])
    examples = build_examples([], convs, seed=0, limit=None, choices=3)[CHAT_REPLY]
    assert sorted(ex["doc"] for ex in examples) == [0, 2, 4, 5, 6, 7, 8]
    for ex in examples:
        truth = ex["choices"][ex["label"]]
        assert "unprompted" not in ex["choices"]
        # conversation 8 repeats conversation 0's reply: never a distractor for either
        assert [c for c in ex["choices"] if c == truth] == [truth] and len(set(ex["choices"])) == 3


def test_no_conversations_no_chat_task(tmp_path):
    examples = build_examples(make_docs(), None, seed=0)
    assert sorted(examples) == sorted([BPB, CLOZE, CONTINUATION])
    assert write_tasks(tmp_path, examples) == [BPB, CLOZE, CONTINUATION]


def test_a_pool_without_any_distractor_makes_no_example(tmp_path):
    examples = build_examples([_paragraph(0, 0)], [make_conversations()[0]], seed=0)
    assert examples[CONTINUATION] == [] and examples[CHAT_REPLY] == []
    assert write_tasks(tmp_path / "t", examples) == [BPB, CLOZE]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [f"{BPB}.jsonl", f"{BPB}.yaml",
                                                                 f"{CLOZE}.jsonl", f"{CLOZE}.yaml"]


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="choices=1"):
        build_examples(make_docs(), choices=1)
    with pytest.raises(UserError, match="min_words=1"):
        build_examples(make_docs(), min_words=1)


# -- determinism, limits, dropping ---------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_other_examples(tmp_path):
    def written(seed: int, out: Path) -> dict[str, bytes]:
        write_tasks(out, build_examples(make_docs(), make_conversations(), seed=seed, limit=5))
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first = written(7, tmp_path / "out")
    again = written(7, tmp_path / "out")
    assert first == again
    other = written(8, tmp_path / "out")
    assert other.keys() == first.keys() and other != first
    assert other[f"{CONTINUATION}.jsonl"] != first[f"{CONTINUATION}.jsonl"]


def test_other_processes_write_the_same_bytes(tmp_path):
    """String hashing is salted per process: an order taken from a set would differ between runs."""
    script = ("import sys\n"
              "from tests.evaluate.test_tasks import make_conversations, make_docs\n"
              "from llmpipe.evaluate.tasks import build_examples, write_tasks\n"
              "write_tasks(sys.argv[1], build_examples(make_docs(), make_conversations(), seed=2, limit=5))\n")
    written = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)})
        written.append({p.name: p.read_text().replace(str(out), "<dir>") for p in sorted(out.iterdir())})
    assert written[0] == written[1]


def test_limit_caps_every_task():
    examples = build_examples(make_docs(), make_conversations(), seed=0, limit=4)
    assert {name: len(exs) for name, exs in examples.items()} == {name: 4 for name in ALL_TASKS}
    everything = build_examples(make_docs(), make_conversations(), seed=0, limit=None)
    assert all(ex in everything[BPB] for ex in examples[BPB])


def test_only_kept_examples_are_written(tmp_path):
    examples = build_examples(make_docs(), make_conversations(), seed=0, limit=None)
    texts = example_texts(examples)
    keep = {CLOZE: [k for k in range(len(examples[CLOZE])) if k not in (0, 2)], CHAT_REPLY: [0, 1, 2, 3, 4]}
    write_tasks(tmp_path, keep_examples(examples, keep))
    assert read_examples(tmp_path, CLOZE) == [ex for i, ex in enumerate(examples[CLOZE]) if i not in (0, 2)]
    assert len(read_examples(tmp_path, CHAT_REPLY)) == 5
    assert read_examples(tmp_path, BPB) == examples[BPB]
    assert texts[CLOZE][0] == examples[CLOZE][0]["context"] + examples[CLOZE][0]["target"]
    ex = examples[CHAT_REPLY][0]
    assert texts[CHAT_REPLY][0] == ex["context"] + " " + ex["choices"][ex["label"]]


def test_rewriting_replaces_the_directory_whole(tmp_path):
    write_tasks(tmp_path / "tasks", build_examples(make_docs(), make_conversations(), seed=0))
    write_tasks(tmp_path / "tasks", build_examples(make_docs(), None, seed=0))
    assert not list((tmp_path / "tasks").glob(f"{CHAT_REPLY}.*"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
