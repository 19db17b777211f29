"""The lm-eval model `llmpipe`: its numbers equal a direct forward pass of the checkpoint, its windows
score every token once, its generations stop where asked, and lm-eval runs it end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from llmpipe.model import ModelConfig
from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer
from llmpipe.train.data import TokenWindows
from llmpipe.train.loop import TrainConfig, Trainer
from llmpipe.train.task import pretraining_task
from tests.helpers import torch_threads
from tests.serve.test_load import write_tokenizer
from tests.tokenizer.synthetic import WORDS, make_corpus

import lm_eval
from lm_eval.api.instance import Instance

from llmpipe.evaluate.adapter import LlmpipeLM, register, rolling_windows

SEQ_LEN = 64  # short, so a few sentences already need several rolling windows


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project with a tokenizer and a pretrain final/ trained 40 steps on real text."""
    root = tmp_path_factory.mktemp("evaluated")
    (root / "dvc.yaml").write_text("stages: {}\n")
    tok = Tokenizer.load(write_tokenizer(root / "models" / "tokenizer", docs=300, vocab_size=400))
    stream = np.array(tok.encode(" ".join(make_corpus(200))), dtype=np.int64)
    cfg = TrainConfig(seq_len=SEQ_LEN, micro_batch=8, global_batch_tokens=8 * SEQ_LEN, max_steps=40, lr=1e-2,
                      warmup_steps=4, eval_every=40, eval_batches=1, checkpoint_every=40, sample_tokens=0)
    model_cfg = ModelConfig.from_preset("tiny", tok.vocab_size, n_layer=1, d_model=64, max_seq_len=SEQ_LEN)
    with torch_threads(1):
        task = pretraining_task(TokenWindows([stream], SEQ_LEN), TokenWindows([stream[:2000]], SEQ_LEN), cfg)
        ref = {"hash": tok.hash, "vocab_size": tok.vocab_size}
        Trainer(model_cfg, cfg, task, root / "models" / "pretrain", ref).fit()
    return root


@pytest.fixture(scope="module")
def lm(project) -> LlmpipeLM:
    with torch_threads(1):
        yield LlmpipeLM(pretrained=str(project / "models" / "pretrain"), device="cpu", batch_size=4)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # CPU float results depend on the thread count
        yield


def close(value: float):
    """Equal up to float32 rounding: padding and the logits kept change the matmul shapes, not the math."""
    return pytest.approx(value, rel=1e-4, abs=1e-4)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


@torch.no_grad()
def direct(lm: LlmpipeLM, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The reference: one unpadded forward pass over context + continuation, log_softmax of its logits."""
    ids = torch.tensor([context + continuation])
    logits, _ = lm.model(ids[:, :-1])
    logprobs = logits[0, -len(continuation):].float().log_softmax(dim=-1)
    target = torch.tensor(continuation)
    return float(logprobs[torch.arange(len(continuation)), target].sum()), bool((logprobs.argmax(-1) == target).all())


@torch.no_grad()
def greedy_ids(lm: LlmpipeLM, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids by plain forward passes (no cache, no engine)."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(lm.model(torch.tensor([ids + out]))[0][0, -1].argmax()))
    return out


def hf_split(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HF rule, written out: trailing spaces move over; the context is encoded alone, the
    continuation is what the whole pair's encoding has after as many tokens; both after the eos prefix."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = [tok.eos_id] + tok.encode(context + continuation)
    alone = [tok.eos_id] + tok.encode(context)
    return alone, whole[len(alone):]


def merging_split(tok: Tokenizer, swallowed: bool) -> tuple[str, str]:
    """A (context, continuation) from real words where encoding the pair whole differs from encoding
    it in two parts: the continuation's first characters merge into the context's last token. With
    `swallowed`, the merged token takes the whole continuation (HF's cut leaves nothing)."""
    for word in sorted(set(WORDS), key=lambda w: (-len(w), w)):
        for k in range(1, len(word)):
            context, continuation = f"It was a {word[:k]}", word[k:] + ("" if swallowed else " day")
            whole = tok.encode(context + continuation)
            apart = tok.encode(context) + tok.encode(continuation)
            n = len(tok.encode(context))
            if whole != apart and whole[:n] != tok.encode(context) and (len(whole) == n) == swallowed:
                return context, continuation
    raise AssertionError("the test tokenizer has no merging split: pick other words")


def test_loglikelihood_equals_a_direct_forward_pass(lm):
    tok = lm.tokenizer
    pairs = [("The first of the people", " said that it was good"), ("", "Hello there world"),
             ("Many men work ", "here"), ("one two", "\nthree four five")]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx, cont = hf_split(tok, context, continuation) if context else ([tok.eos_id], tok.encode(continuation))
        want = direct(lm, ctx, cont)
        assert logprob == close(want[0]) and greedy == want[1]
        assert logprob < 0


def test_a_request_longer_than_max_length_loses_tokens_from_the_left(lm):
    tok = lm.tokenizer
    context, continuation = " ".join(make_corpus(2, seed=3)), " and then it was over"
    ctx, cont = hf_split(tok, context, continuation)
    assert len(ctx) + len(cont) > SEQ_LEN + 1
    [(logprob, _)] = lm.loglikelihood(requests("loglikelihood", [(context, continuation)]))
    kept = (ctx + cont)[-(SEQ_LEN + 1):]
    assert logprob == close(direct(lm, kept[:-len(cont)], cont)[0])


def test_a_continuation_merging_into_the_context_is_cut_as_lm_eval_cuts_it(lm):
    tok = lm.tokenizer
    context, continuation = merging_split(tok, swallowed=False)
    [(logprob, _)] = lm.loglikelihood(requests("loglikelihood", [(context, continuation)]))
    whole_ctx, whole_cont = hf_split(tok, context, continuation)
    apart = direct(lm, [tok.eos_id] + tok.encode(context), tok.encode(continuation))[0]
    assert logprob == close(direct(lm, whole_ctx, whole_cont)[0])
    assert abs(logprob - apart) > 1e-3  # the split matters: encoding the parts apart scores other tokens


def test_a_continuation_swallowed_by_the_contexts_last_token_is_still_scored(lm):
    tok = lm.tokenizer
    context, continuation = merging_split(tok, swallowed=True)
    [(logprob, _)] = lm.loglikelihood(requests("loglikelihood", [(context, continuation)]))
    whole, ctx = [tok.eos_id] + tok.encode(context + continuation), [tok.eos_id] + tok.encode(context)
    split = next(k for k, (a, b) in enumerate(zip(whole, ctx)) if a != b)  # where the merged token starts
    assert logprob == close(direct(lm, whole[:split], whole[split:])[0])


def test_is_greedy_is_true_for_the_models_own_continuation_and_false_otherwise(lm):
    tok = lm.tokenizer
    for sentence in make_corpus(30, seed=5):
        context = sentence.split("\n")[0]
        ids = [tok.eos_id] + tok.encode(context)
        greedy = greedy_ids(lm, ids, 3)
        continuation = tok.decode(greedy)
        if hf_split(tok, context, continuation)[1] == greedy:  # the text re-encodes to those very tokens
            break
    else:
        raise AssertionError("no context whose greedy continuation re-encodes to the same tokens")
    other = continuation + " zebra"
    assert not direct(lm, *hf_split(tok, context, other))[1]
    [(_, yes), (_, no)] = lm.loglikelihood(requests("loglikelihood", [(context, continuation), (context, other)]))
    assert yes is True and no is False


def test_batched_results_equal_one_by_one_results_in_request_order(lm):
    rng = np.random.default_rng(0)
    def words(most: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(1, most))))

    pairs = [(words(30), " " + words(6)) for _ in range(11)]
    batched = lm.loglikelihood(requests("loglikelihood", pairs))
    one_by_one = [lm.loglikelihood(requests("loglikelihood", [p]))[0] for p in pairs]
    assert [g for _, g in batched] == [g for _, g in one_by_one]
    assert [s for s, _ in batched] == close([s for s, _ in one_by_one])
    assert len({round(s, 3) for s, _ in batched}) == len(pairs)  # distinct scores: a reordering would show


def test_rolling_windows_score_every_token_once_with_the_prefix_first():
    ids = list(range(100, 100 + 150))
    windows = rolling_windows(ids, prefix=7, max_length=SEQ_LEN)
    assert [t for _, cont in windows for t in cont] == ids
    assert windows[0][0] == [7] and len(windows) == 3
    for context, continuation in windows:
        assert len(context) + len(continuation) <= SEQ_LEN + 1
    last_context, last = windows[-1]
    assert len(last_context) + len(last) == SEQ_LEN + 1  # the last window still has a full context


def test_loglikelihood_rolling_equals_a_direct_computation_past_max_seq_len(lm):
    tok = lm.tokenizer
    corpus = " ".join(make_corpus(3, seed=9))
    text = next(corpus[:cut] for cut in range(len(corpus)) if len(tok.encode(corpus[:cut])) > 2.5 * SEQ_LEN)
    ids = tok.encode(text)
    n, L = len(ids), SEQ_LEN
    assert 2 * L < n <= 3 * L, n  # three windows: a full first, a full middle, a partial last one
    # lm-eval's rule spelled out: [eos] + the first L-1 tokens predict the first L; the next L come from
    # one window starting at the token before them; the rest from the L tokens before the document's end
    want = (direct(lm, [tok.eos_id], ids[:L])[0] + direct(lm, ids[L - 1:L], ids[L:2 * L])[0]
            + direct(lm, ids[n - L - 1:2 * L], ids[2 * L:])[0])
    short = "Hello there world."
    [got, got_short] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,), (short,)]))
    assert got == close(want)
    assert got_short == close(direct(lm, [tok.eos_id], tok.encode(short))[0])


def greedy_text(lm: LlmpipeLM, context: str, n: int) -> str:
    return lm.tokenizer.decode(greedy_ids(lm, [lm.tokenizer.eos_id] + lm.tokenizer.encode(context), n))


def test_generate_until_is_greedy_and_stops_at_max_gen_toks_and_stop_strings(lm):
    contexts = ["The people of the world", "It was the first day"]
    free = {"until": [], "max_gen_toks": 12, "do_sample": False}
    texts = lm.generate_until(requests("generate_until", [(c, free) for c in contexts]))
    assert texts == [greedy_text(lm, c, 12) for c in contexts]
    short = lm.generate_until(requests("generate_until", [(contexts[0], free | {"max_gen_toks": 3})]))
    assert short == [greedy_text(lm, contexts[0], 3)]
    stop = texts[0][len(texts[0]) // 2:][:3]
    assert stop.strip() and stop in texts[0]
    [stopped] = lm.generate_until(requests("generate_until", [(contexts[0], free | {"until": [stop]})]))
    assert stopped == texts[0][:texts[0].index(stop)]


def test_chat_markers_are_text_until_a_chat_template_is_asked_for(project):
    lm = LlmpipeLM(pretrained=str(project / "models" / "pretrain"), device="cpu")
    tok = lm.tokenizer
    literal = "<|user|> is a literal"
    assert lm.tok_encode(literal, add_special_tokens=False) == tok.encode(literal)
    chat = [{"role": "user", "content": "Hello there"}]
    prompt = lm.apply_chat_template(chat)
    assert lm.tok_encode(prompt, add_special_tokens=False) == tok.apply_chat_template(chat, add_generation_prompt=True)
    assert lm.tokenizer_name == f"llmpipe-{tok.hash[:8]}"


def test_importing_registers_the_model_and_keeps_the_built_in_ones():
    # a fresh process: in this one other imports may have filled lm-eval's registry already
    script = ("import llmpipe.evaluate.adapter as a; from lm_eval.api.registry import get_model; "
              "assert get_model('llmpipe') is a.LlmpipeLM, 'llmpipe'; "
              "assert get_model('dummy').__name__ == 'DummyLM', 'dummy'; "
              "assert a.register() is a.register() is a.LlmpipeLM, 'register'")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_stats_count_requests_and_seconds_per_type(project):
    lm = LlmpipeLM(pretrained=str(project / "models" / "pretrain"), device="cpu")
    lm.loglikelihood(requests("loglikelihood", [("a", " b"), ("c", " d")]))
    lm.loglikelihood_rolling(requests("loglikelihood_rolling", [("some text",)]))
    assert lm.stats["loglikelihood"]["requests"] == 2 and lm.stats["loglikelihood"]["seconds"] > 0
    assert lm.stats["loglikelihood_rolling"]["requests"] == 1
    assert lm.stats["generate_until"] == {"requests": 0, "seconds": 0.0}


# -- lm-eval end to end --------------------------------------------------------------------------
DOCS = ["The first people said that it was good.", "Many men work here and there, day after day.",
        "It was the last time we made one of those."]
WRONG = DOCS[1:] + DOCS[:1]  # another document's text: which one wins depends on the model's numbers


def write_tasks(out: Path) -> Path:
    """Two local tasks over a 3-document json file: bits per byte, and a two-way multiple choice."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d, "wrong": wrong}) + "\n" for d, wrong in zip(DOCS, WRONG)))
    (out / "rolling.yaml").write_text(textwrap.dedent(f"""\
        task: llmpipe_test_rolling
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
          - metric: bits_per_byte
        """))
    (out / "choice.yaml").write_text(textwrap.dedent(f"""\
        task: llmpipe_test_choice
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: ""
        doc_to_choice: "{{{{[text, wrong]}}}}"
        doc_to_target: 0
        target_delimiter: " "
        metric_list:
          - metric: acc
        """))
    return out


@pytest.mark.slow
def test_simple_evaluate_runs_local_tasks_with_our_numbers(project, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the json dataset's cache stays in the test
    tasks = TaskManager(include_path=str(write_tasks(tmp_path / "tasks")), include_defaults=False)
    model_dir = project / "models" / "pretrain"
    out = lm_eval.simple_evaluate(model="llmpipe", model_args=f"pretrained={model_dir},device=cpu",
                                  tasks=["llmpipe_test_rolling", "llmpipe_test_choice"], task_manager=tasks)
    lm = LlmpipeLM(pretrained=str(model_dir), device="cpu")
    eos, tok = lm.tokenizer.eos_id, lm.tokenizer
    logprobs = [direct(lm, [eos], tok.encode(d))[0] for d in DOCS]  # each document fits one window
    bits_per_byte = -sum(logprobs) / sum(len(d.encode()) for d in DOCS) / math.log(2)
    assert out["results"]["llmpipe_test_rolling"]["bits_per_byte,none"] == close(bits_per_byte)
    right, wrong = ([direct(lm, [eos], tok.encode(" " + c))[0] for c in choices] for choices in (DOCS, WRONG))
    assert out["results"]["llmpipe_test_choice"]["acc,none"] == pytest.approx(np.mean(np.greater(right, wrong)))
    assert out["config"]["llmpipe_model"]["path"].startswith(str(model_dir))


@pytest.mark.slow
def test_llmpipe_lm_eval_runs_lm_evals_own_command_line_with_our_model(project, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    argv = ["--model", "llmpipe", "--model_args", f"pretrained={project / 'models' / 'pretrain'}", "--device", "cpu",
            "--tasks", "llmpipe_test_rolling", "--include_path", str(tasks), "--output_path", str(tmp_path / "out")]
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    # `llmpipe lm-eval ...`: the click command hands every argument to lm-eval unchanged
    done = subprocess.run([sys.executable, "-m", "llmpipe.cli", "lm-eval", *argv], cwd=Path(__file__).parents[2], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = (tmp_path / "out").rglob("results_*.json")
    assert "bits_per_byte,none" in json.loads(results.read_text())["results"]["llmpipe_test_rolling"]
    assert "llmpipe_test_rolling" in done.stdout  # lm-eval's own summary table
