"""A second harness: lm-eval's own `hf` model on the Hugging Face export gives the same per-request
loglikelihoods and task scores as our `llmpipe` adapter on the local tasks. Both run through the real
`lm_eval.simple_evaluate`; only the export and lm-eval's Hugging Face code stand between them.

lm-eval's `hf` model has two knobs for the start of a document, and our adapter's convention (every
request follows one unscored eos, see llmpipe/evaluate/adapter.py) needs a different one per request
type:

- rolling documents (`llmpipe_bpb`): `prefix_token_id=eos, add_bos_token=False`. lm-eval puts the
  prefix before the first window and scores every token of the document, as ours does.
- context + continuation requests (`llmpipe_cloze`, `llmpipe_continuation`): lm-eval prefixes a
  non-empty context only through the tokenizer's own BOS (`add_bos_token=True`). The export's tokenizer
  adds nothing (its ids equal `Tokenizer.encode`), so this run loads it with eos as its BOS: each
  context then starts with eos, as ours does. With that setting a rolling document would get its eos
  scored as the first token too, which is why the rolling task runs with the first setting.

Both runs set `logits_cache=False`. lm-eval 0.4.13's `hf` model computes requests that share
context + continuation[:-1] once, and for the shorter continuation of such a group it gathers the
log-probabilities of the first positions of the longer one's logits instead of the last: here a cloze
request (passage minus its last word, then " word") shares that key with the continuation request
over the same passage (its last token is the passage's final punctuation), and with the cache on its
loglikelihood was off by up to 2.3 nats. Our adapter scores every request on its own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lm_eval
import transformers
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from llmpipe.evaluate.adapter import LlmpipeLM
from llmpipe.evaluate.tasks import BPB, CLOZE, CONTINUATION, build_examples, write_tasks
from llmpipe.package.export_hf import export_hf
from llmpipe.serve.load import load_model
from llmpipe.tokenizer.sentencepiece_bpe import SPECIAL_TOKENS
from tests.helpers import torch_threads

TOLERANCE = 1e-4  # per request, in nats
DOC_CHARS = 1500  # ~500 tokens: each held-out document spans several 128-token rolling windows


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the json datasets' cache stays in the test
    with torch_threads(1):
        yield


def heldout_docs(corpus_text: str, n: int = 6) -> list[str]:
    """Documents of ~DOC_CHARS from the corpus' last tenth (the trained model's held-out tokens)."""
    tail = corpus_text[len(corpus_text) * 9 // 10:]
    docs, current = [], ""
    for paragraph in re.split(r"\n\s*\n", tail):
        if paragraph.strip():
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= DOC_CHARS:
            docs.append(current)
            current = ""
    return docs[:n]


@pytest.fixture(scope="module")
def setup(trained_project: Path, corpus_text: str, tmp_path_factory):
    """(our model dir, the export, the local tasks' TaskManager, the eos id, the task names)."""
    model_dir = trained_project / "models" / "pretrain"
    _, tok, info = load_model(model_dir)
    out = tmp_path_factory.mktemp("harness")
    export = export_hf(Path(info.path), tok, out / "hf")
    examples = build_examples(heldout_docs(corpus_text), seed=0, limit=6, choices=3, min_words=20, max_words=60)
    assert {task: len(exs) for task, exs in examples.items()} == {BPB: 6, CLOZE: 6, CONTINUATION: 6}
    tasks = write_tasks(out / "tasks", examples)
    return model_dir, export, TaskManager(include_path=str(out / "tasks"), include_defaults=False), tok.eos_id, tasks


def evaluate(lm, tasks: list[str], task_manager: TaskManager) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, log_samples=True,
                                   bootstrap_iters=0)


def responses(out: dict, task: str) -> list[list[float]]:
    """Per document, its requests' numbers (loglikelihoods and is-greedy flags), in document order."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [_numbers(s["resps"]) for s in samples]


def _numbers(value) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _numbers(item)]
    return [float(value)]


def assert_same(ours: dict, theirs: dict, task: str) -> float:
    """Every request's numbers within TOLERANCE, the same metrics; returns the largest difference."""
    a, b = responses(ours, task), responses(theirs, task)
    assert [len(r) for r in a] == [len(r) for r in b] and a
    worst = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert worst <= TOLERANCE, (task, worst)
    metrics = {k: v for k, v in ours["results"][task].items() if isinstance(v, float) and "stderr" not in k}
    assert metrics
    for name, value in metrics.items():
        assert theirs["results"][task][name] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), (task, name)
    return worst


@pytest.mark.slow
def test_lm_evals_hf_model_on_the_export_scores_as_our_adapter(setup):
    model_dir, export, task_manager, eos, tasks = setup
    ours = evaluate(LlmpipeLM(pretrained=str(model_dir), device="cpu", batch_size=4), tasks, task_manager)

    rolling = HFLM(pretrained=str(export), device="cpu", dtype="float32", batch_size=4, max_length=128,
                   prefix_token_id=eos, add_bos_token=False, logits_cache=False)
    assert type(rolling.model) is transformers.LlamaForCausalLM
    theirs = evaluate(rolling, [BPB], task_manager)
    worst = {BPB: assert_same(ours, theirs, BPB)}

    # each context after an eos, as ours (module docstring): the export's tokenizer with eos as its BOS
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(export), bos_token=SPECIAL_TOKENS["eos"],
                                                           add_bos_token=True)
    assert tokenizer("x").input_ids[0] == eos
    contexts = HFLM(pretrained=str(export), tokenizer=tokenizer, device="cpu", dtype="float32", batch_size=4,
                    max_length=128, prefix_token_id=eos, add_bos_token=True, logits_cache=False)
    theirs = evaluate(contexts, [CLOZE, CONTINUATION], task_manager)
    worst |= {task: assert_same(ours, theirs, task) for task in (CLOZE, CONTINUATION)}
    print("largest per-request difference (nats):", worst)
