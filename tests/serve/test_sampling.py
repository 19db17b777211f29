"""Sampling: top-k and top-p keep exactly the intended tokens and mass, the repetition penalty follows
the CTRL rule, temperature 0 is greedy, and a seed fixes a request's tokens whatever shares its batch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.serve.sampling import Sampler, SamplingParams, context_mask, mark_seen
from tests.train.test_imports import BLOCKED, PROBE, ROOT

# known probabilities, deliberately not in vocabulary order
PROBS = torch.tensor([0.15, 0.05, 0.5, 0.1, 0.2])
ORDER = [2, 4, 0, 3, 1]  # token ids from most to least likely


def probs_for(params: list[SamplingParams], logits: torch.Tensor | None = None, seen=None) -> torch.Tensor:
    logits = PROBS.log().expand(len(params), -1) if logits is None else logits
    return Sampler(params, "cpu").probs(logits, seen)


def expected(keep: list[int]) -> torch.Tensor:
    out = torch.zeros_like(PROBS)
    out[keep] = PROBS[keep] / PROBS[keep].sum()
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_keeps_the_k_most_likely_tokens_renormalized(k):
    probs = probs_for([SamplingParams(top_k=k)])[0]
    torch.testing.assert_close(probs, expected(ORDER[:k]))


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    probs = probs_for([SamplingParams(top_k=2)], torch.tensor([[1.0, 1.0, 1.0, 0.0]]))[0]
    assert int((probs > 0).sum()) == 2
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("p, kept", [(0.3, 1), (0.49, 1), (0.51, 2), (0.65, 2), (0.8, 3), (0.9, 4), (0.97, 5), (1.0, 5)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    # cumulative mass in order: 0.5, 0.7, 0.85, 0.95, 1.0
    probs = probs_for([SamplingParams(top_p=p)])[0]
    torch.testing.assert_close(probs, expected(ORDER[:kept]))
    assert float(PROBS[ORDER[:kept]].sum()) >= p - 1e-6 > float(PROBS[ORDER[:kept - 1]].sum())


def test_top_p_stops_as_soon_as_the_mass_reaches_p_exactly():
    # four equal logits: probabilities 0.25 each, exact in binary, so the boundary is exact too
    probs = probs_for([SamplingParams(top_p=0.5), SamplingParams(top_p=0.75), SamplingParams(top_p=0.7)],
                      torch.zeros(3, 4))
    assert (probs > 0).sum(dim=-1).tolist() == [2, 3, 3]
    torch.testing.assert_close(probs[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_each_row_gets_its_own_truncation_in_one_batch():
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.8), SamplingParams(),
              SamplingParams(top_k=3, top_p=0.6)]
    probs = probs_for(params)
    torch.testing.assert_close(probs[0], expected(ORDER[:2]))
    torch.testing.assert_close(probs[1], expected(ORDER[:3]))
    torch.testing.assert_close(probs[2], PROBS)
    # top-p applies to the top-k survivors renormalized: 0.5/0.85 = 0.59 < 0.6, so two tokens
    torch.testing.assert_close(probs[3], expected(ORDER[:2]))


def test_top_p_applies_after_temperature():
    logits = PROBS.log().view(1, -1)
    hot = torch.softmax(logits / 2.0, dim=-1)[0]  # flatter: the top token alone is 0.35
    probs = probs_for([SamplingParams(temperature=2.0, top_p=0.6)], logits)[0]
    top = sorted(range(5), key=lambda i: -hot[i])
    kept = next(n for n in range(1, 6) if hot[top[:n]].sum() >= 0.6)
    assert kept == 3
    want = torch.zeros(5)
    want[top[:kept]] = hot[top[:kept]] / hot[top[:kept]].sum()
    torch.testing.assert_close(probs, want)


def test_temperature_scales_the_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 1.0, 3.0):
        torch.testing.assert_close(probs_for([SamplingParams(temperature=t)], logits), torch.softmax(logits / t, -1))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]])
    seen = context_mask([[0, 1, 0]], vocab_size=5, device="cpu")
    sampler = Sampler([SamplingParams(repetition_penalty=2.0)], "cpu")
    torch.testing.assert_close(sampler.processed_logits(logits, seen), torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.5]]))
    mark_seen(seen, torch.tensor([4]))
    torch.testing.assert_close(sampler.processed_logits(logits, seen), torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0]]))
    # penalty 1 and rows without it leave the logits alone
    both = Sampler([SamplingParams(), SamplingParams(repetition_penalty=2.0)], "cpu")
    out = both.processed_logits(logits.expand(2, -1), seen.expand(2, -1))
    torch.testing.assert_close(out[0], logits[0])
    torch.testing.assert_close(out[1], torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0]))


def test_greedy_takes_the_argmax_after_the_penalty_and_leaves_the_generator_alone():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0]])
    sampler = Sampler([SamplingParams(temperature=0, seed=1), SamplingParams(temperature=0, seed=2)], "cpu")
    states = [g.get_state() for g in sampler.generators]
    for _ in range(5):
        assert sampler.sample(logits).tolist() == [0, 2]
    assert all(torch.equal(s, g.get_state()) for s, g in zip(states, sampler.generators))
    torch.testing.assert_close(sampler.probs(logits), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    # the penalty moves the argmax: 3/2 = 1.5 < 2
    penalized = Sampler([SamplingParams(temperature=0, repetition_penalty=2.0)], "cpu")
    assert penalized.sample(logits[:1], context_mask([[0]], 3, "cpu")).tolist() == [1]


def sample_run(params: list[SamplingParams], logits: torch.Tensor, steps: int = 40) -> list[list[int]]:
    sampler = Sampler(params, "cpu")
    return torch.stack([sampler.sample(logits) for _ in range(steps)], dim=1).tolist()


FLAT = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * 0.3  # many plausible tokens


def test_the_same_seed_gives_the_same_tokens_and_other_seeds_differ():
    first = sample_run([SamplingParams(seed=7)], FLAT)[0]
    assert sample_run([SamplingParams(seed=7)], FLAT)[0] == first
    assert sample_run([SamplingParams(seed=8)], FLAT)[0] != first
    assert len(set(first)) > 10  # really sampling, not stuck on one token
    # without a seed every request gets a fresh one
    assert sample_run([SamplingParams()], FLAT)[0] != sample_run([SamplingParams()], FLAT)[0]


def test_a_rows_tokens_do_not_depend_on_the_rest_of_the_batch():
    alone = sample_run([SamplingParams(seed=7, top_p=0.9)], FLAT)[0]
    others = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    batch = sample_run([SamplingParams(seed=3), SamplingParams(temperature=0), SamplingParams(seed=7, top_p=0.9),
                        SamplingParams(seed=7, top_k=5)], torch.cat([others[:2], FLAT, others[2:]]))
    assert batch[2] == alone
    # a finished neighbour leaving the batch does not disturb the row either
    sampler = Sampler([SamplingParams(seed=3), SamplingParams(seed=7, top_p=0.9)], "cpu")
    logits = torch.cat([others[:1], FLAT])
    tokens = [int(sampler.sample(logits)[1]) for _ in range(10)]
    sampler = sampler.subset([1])
    tokens += [int(sampler.sample(FLAT)[0]) for _ in range(30)]
    assert tokens == alone


def test_sampling_follows_the_processed_distribution():
    counts = torch.bincount(torch.tensor(sample_run([SamplingParams(seed=0, top_k=3)], PROBS.log().view(1, -1),
                                                    steps=4000)[0]), minlength=5).float()
    torch.testing.assert_close(counts / counts.sum(), expected(ORDER[:3]), atol=0.03, rtol=0)


def test_probs_along_a_continuation_equal_the_probs_step_by_step():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 30, generator=gen)  # (B, T, V)
    proposed = torch.randint(0, 30, (2, 3), generator=gen)
    sampler = Sampler([SamplingParams(repetition_penalty=1.5, top_p=0.9), SamplingParams(temperature=0,
                                                                                          repetition_penalty=3.0)],
                      "cpu")
    seen = context_mask([[1, 2], [3]], 30, "cpu")
    along = sampler.probs_along(logits, seen, proposed)
    assert seen.sum().item() == 3  # the caller's mask is left as it was
    for t in range(4):
        torch.testing.assert_close(along[:, t], sampler.probs(logits[:, t], seen))
        if t < 3:
            mark_seen(seen, proposed[:, t])


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"), ("top_k", -1), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0), ("seed", -1), ("seed", 2**64),
    ("max_new_tokens", 0), ("max_new_tokens", True)])
def test_bad_settings_are_user_errors_naming_the_setting_and_value(field, value):
    with pytest.raises(UserError, match=f"{field}={value!r}".replace("(", r"\(").replace("*", r"\*")):
        SamplingParams(**{field: value})


def test_sampling_and_text_import_on_a_bare_gpu_node():
    # the engine runs where only torch, numpy and the standard library are installed
    modules = ["llmpipe.serve.sampling", "llmpipe.serve.text"]
    proc = subprocess.run([sys.executable, "-c", PROBE.format(blocked=BLOCKED, modules=modules)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [
    (1.0, 0, 1.0, 1.3), (0.7, 10, 1.0, 1.0), (1.3, 0, 0.8, 1.0), (0.9, 20, 0.6, 1.2), (0.5, 3, 0.95, 0.8)])
def test_processing_matches_hugging_face_logits_processors(temperature, top_k, top_p, penalty):
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    gen = torch.Generator().manual_seed(top_k)
    logits = torch.randn(4, 50, generator=gen) * 3
    context = torch.randint(0, 50, (4, 12), generator=gen)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
                             + ([TopKLogitsWarper(top_k)] if top_k else []) + [TopPLogitsWarper(top_p)])
    want = hf(context, logits.clone())
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    got = Sampler([params] * 4, "cpu").processed_logits(logits, context_mask(context.tolist(), 50, "cpu"))
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)])
