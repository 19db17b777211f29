"""Local lm-eval tasks built from held-out text: bits per byte, a last-word cloze, real-continuation and
next-reply multiple choice.

Two steps, so the stage can drop contaminated examples in between:
`build_examples(docs, conversations, ...) -> {task: [example]}` cuts the examples (deterministic with the
seed), `example_texts` gives the text of each that decontamination checks, `keep_examples` keeps those it
passes, and `write_tasks(out_dir, examples)` writes one lm-eval YAML task and its JSONL data per task.

The tasks (lm-eval output types in brackets):
- `llmpipe_bpb` [loglikelihood_rolling]: whole held-out documents, unchanged; word_perplexity,
  byte_perplexity and bits_per_byte as lm-eval's wikitext task (words and bytes counted on the text).
- `llmpipe_cloze` [loglikelihood]: LAMBADA-style; a passage without its last word is the context and
  " " + that word (trailing punctuation dropped) the target; acc (the word is the greedy continuation)
  and perplexity.
- `llmpipe_continuation` [multiple_choice]: a passage's first half (in words) is the context; the
  choices, each after one space, are its real second half and the second halves of passages from other
  documents; acc and acc_norm.
- `llmpipe_chat_reply` [multiple_choice, only with conversations]: a held-out conversation up to its last
  assistant reply is the context, the choices are that reply and the last replies of other
  conversations; acc and acc_norm.

A passage is a blank-line-separated paragraph of a document with at least `min_words`
whitespace-separated words, cut after its first `max_words` words; its own line breaks are kept.
Multiple-choice examples get `choices - 1` distractors, fewer only when the held-out pool has fewer
distinct ones, never one equal to the true choice; an example with no distractor at all is skipped.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpipe.errors import UserError
from llmpipe.io import atomic_path

BPB = "llmpipe_bpb"
CLOZE = "llmpipe_cloze"
CONTINUATION = "llmpipe_continuation"
CHAT_REPLY = "llmpipe_chat_reply"
LOCAL_TASKS = (BPB, CLOZE, CONTINUATION, CHAT_REPLY)
TAG = "llmpipe"  # `--tasks llmpipe` runs every local task lm-eval finds in the directory

Example = dict[str, Any]

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_WORD = re.compile(r"\S+")
_WORD_CORE = re.compile(r"^(.*?\w)\W*$", re.DOTALL)  # a word without its trailing punctuation
_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Passage:
    doc: int  # index of the document it was cut from
    text: str
    words: tuple[tuple[int, int], ...]  # (start, end) of each word in `text`


# -- passages -----------------------------------------------------------------------------------------

def passages(docs: Sequence[str], min_words: int = 20, max_words: int = 120) -> list[Passage]:
    """The passages of `docs` in document order (see the module docstring for the rule)."""
    out = []
    for k, doc in enumerate(docs):
        for paragraph in _PARAGRAPH_BREAK.split(doc):
            words = [m.span() for m in itertools.islice(_WORD.finditer(paragraph), max_words)]
            if len(words) < min_words:
                continue
            start = words[0][0]
            out.append(Passage(k, paragraph[start:words[-1][1]], tuple((a - start, b - start) for a, b in words)))
    return out


def _cloze(passage: Passage) -> Example | None:
    last_start = passage.words[-1][0]
    core = _WORD_CORE.match(passage.text[last_start:])
    if core is None:  # the last "word" is punctuation only
        return None
    return {"context": passage.text[:last_start].rstrip(), "target": " " + core.group(1), "doc": passage.doc}


def _halves(passage: Passage) -> tuple[str, str]:
    middle = len(passage.words) // 2
    return passage.text[:passage.words[middle - 1][1]], passage.text[passage.words[middle][0]:]


# -- examples -----------------------------------------------------------------------------------------

def _rng(seed: int, task: str) -> random.Random:
    # One stream per task: adding a task (or conversations) never changes another task's examples.
    return random.Random(f"{seed}:{task}")


def _sample(rng: random.Random, n: int, limit: int | None) -> list[int]:
    """`limit` of range(n) at random, in their original order."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(rng.sample(range(n), limit))


def _distractors(rng: random.Random, pool: Sequence[str], ok: Callable[[str], bool], k: int) -> list[str]:
    """Up to k texts of `pool` (distinct, sorted) that pass `ok`, drawn at random."""
    chosen: list[str] = []
    tried: set[int] = set()
    # Random probes first: a held-out pool has thousands of texts, and filtering all of them for every
    # example would cost pool x examples. A small pool (or bad luck) falls back to the full filter.
    for _ in range(4 * k + 16):
        if len(chosen) == k or not pool:
            break
        j = rng.randrange(len(pool))
        if j not in tried:
            tried.add(j)
            if ok(pool[j]):
                chosen.append(pool[j])
    if len(chosen) < k:
        rest = [text for j, text in enumerate(pool) if j not in tried and ok(text)]
        chosen += rng.sample(rest, min(k - len(chosen), len(rest)))
    return chosen


def _multiple_choice(rng: random.Random, context: str, truth: str, distractors: list[str]) -> Example | None:
    """`truth` among the distractors, at a random place; None without any distractor."""
    if not distractors:
        return None
    label = rng.randrange(len(distractors) + 1)
    return {"context": context, "choices": distractors[:label] + [truth] + distractors[label:], "label": label}


def _bpb_examples(docs: Sequence[str], seed: int, limit: int | None) -> list[Example]:
    nonempty = [k for k, doc in enumerate(docs) if doc.strip()]
    return [{"text": docs[nonempty[i]], "doc": nonempty[i]} for i in _sample(_rng(seed, BPB), len(nonempty), limit)]


def _cloze_examples(pool: Sequence[Passage], seed: int, limit: int | None) -> list[Example]:
    candidates = [ex for ex in map(_cloze, pool) if ex is not None]
    return [candidates[i] for i in _sample(_rng(seed, CLOZE), len(candidates), limit)]


def _continuation_examples(pool: Sequence[Passage], seed: int, limit: int | None, n_choices: int) -> list[Example]:
    rng = _rng(seed, CONTINUATION)
    halves = [_halves(p) for p in pool]
    docs_of: dict[str, set[int]] = {}
    for (_, second), p in zip(halves, pool):
        docs_of.setdefault(second, set()).add(p.doc)
    seconds = sorted(docs_of)
    out = []
    for i in _sample(rng, len(pool), limit):
        context, truth = halves[i]
        doc = pool[i].doc

        def elsewhere(text: str) -> bool:
            # from another document: a later paragraph of the same one could be a fair answer
            return doc not in docs_of[text] and text.strip() != truth.strip()

        distractors = _distractors(rng, seconds, elsewhere, n_choices - 1)
        example = _multiple_choice(rng, context, truth, distractors)
        if example is not None:
            out.append({**example, "doc": pool[i].doc})
    return out


def render_turns(messages: Sequence[Mapping[str, str]]) -> str:
    """Messages as plain "User: ...\\nAssistant: ..." lines.

    The template is text, not our tokenizer's special tokens, so any lm-eval model (ours, `hf`, an API
    model) reads the same prompt and the scores compare across models.
    """
    return "\n".join(f"{_ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content'].strip()}" for m in messages)


def _last_reply(conversation: Sequence[Mapping[str, str]]) -> tuple[str, str] | None:
    """(context, reply) of the conversation's last assistant reply; None without a user turn before it."""
    last = max((k for k, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
    if last is None or not any(m["role"] == "user" for m in conversation[:last]):
        return None
    reply = conversation[last]["content"].strip()
    if not reply:
        return None
    return render_turns(conversation[:last]) + "\nAssistant:", reply


def _chat_examples(conversations: Sequence[Sequence[Mapping[str, str]]], seed: int, limit: int | None,
                   n_choices: int) -> list[Example]:
    rng = _rng(seed, CHAT_REPLY)
    usable = [(k, pair) for k, c in enumerate(conversations) if (pair := _last_reply(c)) is not None]
    replies = sorted({reply for _, (_, reply) in usable})
    out = []
    for i in _sample(rng, len(usable), limit):
        k, (context, reply) = usable[i]
        distractors = _distractors(rng, replies, lambda text: text.strip() != reply.strip(), n_choices - 1)
        example = _multiple_choice(rng, context, reply, distractors)
        if example is not None:
            out.append({**example, "doc": k})
    return out


def build_examples(docs: Sequence[str], conversations: Sequence[Sequence[Mapping[str, str]]] | None = None, *,
                   seed: int = 0, limit: int | None = 500, choices: int = 4, min_words: int = 20,
                   max_words: int = 120) -> dict[str, list[Example]]:
    """The examples of every local task, at most `limit` each; `llmpipe_chat_reply` only with conversations.

    Each example carries `doc`, the index of its document (or conversation) in the input, so a report
    can trace it back. The same inputs and seed give the same examples.
    """
    if choices < 2:
        raise UserError(f"choices={choices}: a multiple-choice task needs at least 2 choices; set 2 or more")
    if min_words < 2 or max_words < min_words:
        raise UserError(f"min_words={min_words}, max_words={max_words}: a passage needs at least 2 words (a "
                        "context and a target) and max_words >= min_words; raise them")
    pool = passages(docs, min_words, max_words)
    examples = {
        BPB: _bpb_examples(docs, seed, limit),
        CLOZE: _cloze_examples(pool, seed, limit),
        CONTINUATION: _continuation_examples(pool, seed, limit, choices),
    }
    if conversations is not None:
        examples[CHAT_REPLY] = _chat_examples(conversations, seed, limit, choices)
    return examples


def example_text(task: str, example: Example) -> str:
    """What a model that saw this example in training would have memorized: the context and the true answer."""
    if task == BPB:
        return example["text"]
    if task == CLOZE:
        return example["context"] + example["target"]
    return example["context"] + " " + example["choices"][example["label"]]


def example_texts(examples: Mapping[str, Sequence[Example]]) -> dict[str, list[str]]:
    """The text decontamination checks, per task, in example order."""
    return {task: [example_text(task, ex) for ex in exs] for task, exs in examples.items()}


def keep_examples(examples: Mapping[str, Sequence[Example]],
                  keep: Mapping[str, Collection[int]]) -> dict[str, list[Example]]:
    """Per task, the examples at the indices `keep` lists (decontaminate's kept positions), in their
    order; a task `keep` does not name stays whole."""
    out = {}
    for task, exs in examples.items():
        wanted = set(keep[task]) if task in keep else set(range(len(exs)))
        out[task] = [ex for i, ex in enumerate(exs) if i in wanted]
    return out


# -- lm-eval YAML -------------------------------------------------------------------------------------

_METRICS = {
    "loglikelihood_rolling": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                              {"metric": "bits_per_byte"}],
    "loglikelihood": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                      {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "multiple_choice": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}
_OUTPUT_TYPES = {BPB: "loglikelihood_rolling", CLOZE: "loglikelihood",
                 CONTINUATION: "multiple_choice", CHAT_REPLY: "multiple_choice"}


def task_config(task: str, data_file: Path) -> dict[str, Any]:
    """The lm-eval task config of `task` reading `data_file` (absolute: lm-eval resolves a relative
    `data_files` against the working directory, not the YAML)."""
    output_type = _OUTPUT_TYPES[task]
    # Field names, not Jinja templates: lm-eval returns a field as is, so no whitespace is trimmed.
    fields = {"loglikelihood_rolling": {"doc_to_text": "", "doc_to_target": "text"},
              "loglikelihood": {"doc_to_text": "context", "doc_to_target": "target"},
              "multiple_choice": {"doc_to_text": "context", "doc_to_target": "label", "doc_to_choice": "choices",
                                  "target_delimiter": " "}}[output_type]
    return {"task": task, "tag": [TAG], "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
            "output_type": output_type, **fields, "metric_list": _METRICS[output_type],
            "metadata": {"version": 1.0}}


def _jsonl(examples: Sequence[Example]) -> str:
    return "".join(json.dumps(ex, ensure_ascii=False, sort_keys=True) + "\n" for ex in examples)


def write_tasks(out_dir: Path | str, examples: Mapping[str, Sequence[Example]]) -> list[str]:
    """Write `<task>.yaml` and `<task>.jsonl` for every task with examples into `out_dir`; returns their names.

    `out_dir` belongs to the tasks: it is replaced whole, in one rename, so lm-eval never finds a mix of
    old and new tasks. A task without examples is left out (lm-eval cannot run a task with no documents).
    Load them with `lm_eval.tasks.TaskManager(include_path=str(out_dir), include_defaults=False)`.
    """
    import yaml

    out_dir = Path(out_dir).resolve()
    written = [task for task in examples if examples[task]]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for task in written:
            (tmp / f"{task}.jsonl").write_text(_jsonl(examples[task]), encoding="utf-8")
            config = task_config(task, out_dir / f"{task}.jsonl")
            (tmp / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                                              encoding="utf-8")
    return written


def read_examples(out_dir: Path | str, task: str) -> list[Example]:
    """The examples of `task` as written in `out_dir`."""
    lines = (Path(out_dir) / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


__all__ = ["BPB", "CHAT_REPLY", "CLOZE", "CONTINUATION", "LOCAL_TASKS", "TAG", "build_examples", "keep_examples",
           "example_text", "example_texts", "passages", "read_examples", "render_turns", "task_config",
           "write_tasks"]
