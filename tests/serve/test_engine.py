"""The engine: greedy equals recomputing the whole sequence, a batch gives what each prompt gives alone,
a seed fixes the text, stop strings split across tokens end the text before them, streamed deltas join
to the final text, and every finish reason is the one a user would expect."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig
from llmpipe.serve.engine import Engine
from llmpipe.serve.sampling import SamplingParams
from tests.train.test_imports import BLOCKED, PROBE, ROOT

PROMPTS = ["To be, or not", "a", "What light through yonder window breaks? It is the east"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    # a larger init than training's: peaked logits, so batch and cache round-off never flips a token
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                      max_seq_len=64, init_std=0.1)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def engine(model, tokenizer) -> Engine:
    return Engine(model, tokenizer, "cpu")


def greedy_recompute(model: GPT, ids: list[int], steps: int) -> list[int]:
    """The reference: the cacheless forward over the whole sequence at every step."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), dim=1)
    return seq[0, len(ids):].tolist()


def no_eos(tokenizer):
    """The tokenizer with an eos id no model emits, so a run goes to max_new_tokens."""
    return _WithEos(tokenizer, -1)


class _WithEos:
    def __init__(self, tokenizer, eos_id: int):
        self._tok, self.eos_id = tokenizer, eos_id

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_greedy_equals_recomputing_the_whole_sequence_and_gpt_generate(model, tokenizer):
    engine = Engine(model, no_eos(tokenizer))
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        [done] = engine.generate([ids], GREEDY)
        assert done.token_ids == greedy_recompute(model, ids, 12)
        assert done.token_ids == model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
        assert done.text == tokenizer.decode(done.token_ids)
        assert (done.finish_reason, done.prompt_tokens, done.completion_tokens) == ("length", len(ids), 12)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7,
                                                          repetition_penalty=1.3, max_new_tokens=12)],
                         ids=["greedy", "seeded"])
def test_a_batch_of_different_lengths_gives_what_each_prompt_gives_alone(model, tokenizer, params):
    engine = Engine(model, no_eos(tokenizer))
    alone = [engine.generate([p], params)[0] for p in PROMPTS]
    batched = engine.generate(PROMPTS, params)
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]


def test_rows_finishing_early_leave_the_others_unchanged(model, tokenizer):
    engine = Engine(model, no_eos(tokenizer))
    short = SamplingParams(temperature=0, max_new_tokens=2)
    mixed = engine.generate(PROMPTS, [GREEDY, short, GREEDY])
    assert [c.completion_tokens for c in mixed] == [12, 2, 12]
    for row in (0, 2):  # both rows still running after row 1 left the batch
        assert mixed[row].token_ids == engine.generate([PROMPTS[row]], GREEDY)[0].token_ids


def test_the_same_seed_gives_the_same_text_and_another_seed_other_text(engine):
    def text(seed):
        return engine.generate(["Once"], SamplingParams(temperature=1.5, seed=seed, max_new_tokens=20))[0].token_ids

    assert text(1) == text(1)
    assert text(1) != text(2)


def test_a_stop_string_split_across_tokens_ends_the_text_before_it(model, tokenizer):
    engine = Engine(model, no_eos(tokenizer))
    params = SamplingParams(temperature=1.0, seed=11, max_new_tokens=40)
    free_deltas: list[str] = []
    [free] = engine.generate([PROMPTS[0]], params, on_delta=lambda row, text: free_deltas.append(text))
    # a stop that starts inside one token's text and ends inside a later token's
    k = next(k for k in range(len(free_deltas) - 1) if len(free_deltas[k]) >= 2 and free_deltas[k + 1])
    stop = free_deltas[k][1:] + free_deltas[k + 1][:1]
    deltas: list[str] = []
    [done] = engine.generate([PROMPTS[0]], params, stop=[stop], on_delta=lambda row, text: deltas.append(text))
    assert done.finish_reason == "stop"
    assert done.text == free.text[:free.text.index(stop)] and stop not in done.text
    assert "".join(deltas) == done.text
    n = len(done.token_ids)
    assert n < free.completion_tokens and done.token_ids == free.token_ids[:n]  # it stopped generating there


def test_text_held_back_for_a_possible_stop_is_shown_when_generation_ends(model, tokenizer):
    engine = Engine(model, no_eos(tokenizer))
    params = SamplingParams(temperature=1.0, seed=11, max_new_tokens=20)
    [free] = engine.generate([PROMPTS[0]], params)
    never = free.text[-1] + "\x00never"  # its start is the text's last character: held back until the end
    deltas: list[str] = []
    [done] = engine.generate([PROMPTS[0]], params, stop=[never], on_delta=lambda row, text: deltas.append(text))
    assert (done.text, done.finish_reason) == (free.text, "length")
    assert "".join(deltas) == free.text


def test_streamed_deltas_join_to_each_rows_text(model, tokenizer):
    engine = Engine(model, no_eos(tokenizer))
    deltas: dict[int, list[str]] = {}
    done = engine.generate(PROMPTS, SamplingParams(temperature=1.0, seed=3, max_new_tokens=24),
                           on_delta=lambda row, text: deltas.setdefault(row, []).append(text))
    for row, completion in enumerate(done):
        assert "".join(deltas[row]) == completion.text == tokenizer.decode(completion.token_ids)


def test_the_tokenizers_eos_ends_a_reply_with_finish_reason_eos(model, tokenizer):
    ids = tokenizer.encode(PROMPTS[2])
    third = greedy_recompute(model, ids, 3)[2]
    [done] = Engine(model, _WithEos(tokenizer, third)).generate([ids], GREEDY)
    assert done.finish_reason == "eos" and done.completion_tokens == done.token_ids.index(third) + 1 <= 3
    assert done.text == tokenizer.decode(done.token_ids[:-1])


def test_a_prompt_that_does_not_fit_the_context_is_refused_naming_both_numbers(engine, tokenizer):
    ids = list(range(10, 60))  # 50 tokens in a 64-token context
    with pytest.raises(UserError, match="50 prompt tokens \\+ max_new_tokens 20 exceed .* max_seq_len 64; "
                                        "lower --max-new-tokens to 14"):
        engine.generate([ids], SamplingParams(max_new_tokens=20))
    assert engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=14))[0].completion_tokens <= 14


def test_a_draft_model_gives_the_greedy_text_and_reports_its_acceptance(model, tokenizer):
    [done] = Engine(model, no_eos(tokenizer), draft=model).generate([PROMPTS[0]], GREEDY)
    assert done.token_ids == greedy_recompute(model, tokenizer.encode(PROMPTS[0]), 12)
    assert done.finish_reason == "length"
    assert done.draft_acceptance == 1.0  # the draft is the target itself: every proposal is accepted
    assert Engine(model, no_eos(tokenizer)).generate([PROMPTS[0]], GREEDY)[0].draft_acceptance is None


def test_the_engine_imports_on_a_bare_gpu_node():
    # where only torch, numpy and the standard library are installed (no sentencepiece, no click)
    proc = subprocess.run([sys.executable, "-c", PROBE.format(blocked=BLOCKED, modules=["llmpipe.serve.engine"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
