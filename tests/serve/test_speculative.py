"""Speculative decoding: greedy output is the target's own, sampled output follows the target's
distribution (chi-square), and both caches roll back to exactly the accepted prefix."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys

import pytest
import torch
from scipy.stats import chi2  # scipy comes with the test extras (datasketch, mlflow)

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig
from llmpipe.serve import speculative
from llmpipe.serve.sampling import Sampler, SamplingParams, context_mask, mark_seen
from llmpipe.serve.speculative import speculative_generate
from tests.train.test_imports import BLOCKED, PROBE, ROOT

GREEDY = SamplingParams(temperature=0)
ALPHA = 1e-3  # the distribution tests fail by chance once in a thousand runs at most


def tiny(vocab: int, n_layer: int, d_model: int, seed: int, init_std: float = 0.1, max_seq_len: int = 64) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, n_layer=n_layer, d_model=d_model, n_head=4, n_kv_head=2,
                      max_seq_len=max_seq_len, init_std=init_std)
    return GPT(cfg).eval()


def noisy_copy(model: GPT, scale: float, seed: int) -> GPT:
    """The model with every weight perturbed by `scale` of its init std: a draft that, like a trained
    one, mostly agrees with the target but not always."""
    draft = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * model.config.init_std * scale)
    return draft


@pytest.fixture(scope="module")
def pair() -> tuple[GPT, GPT]:
    """A target and a draft that agree sometimes, not always (some rounds accept all k drafts, many
    reject one). A target that varies its tokens: a tiny random model at a small init repeats one
    token, which would hide a wrong bonus token (it equals the last draft)."""
    target = tiny(97, 2, 64, seed=0, init_std=0.3)
    return target, noisy_copy(target, 0.1, seed=5)


@pytest.fixture(scope="module")
def small_draft() -> GPT:
    """A smaller, unrelated random draft: almost every proposal is rejected."""
    return tiny(97, 1, 32, seed=1)


def plain_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """The reference: the target decoding alone, recomputing the whole sequence at every step."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat((ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids[0, len(prompt):].tolist()


# -- greedy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
def test_speculative_greedy_is_the_targets_own_greedy_output(pair, small_draft, k):
    target, draft = pair
    rejected, all_accepted = 0, 0
    for prompt, model in itertools.product(([1], [5, 17, 3], [40, 2, 2, 9, 60, 13, 71]), (draft, small_draft)):
        result = speculative_generate(target, model, prompt, GREEDY, k=k, max_new_tokens=30)
        assert result.tokens == plain_greedy(target, prompt, 30), prompt
        assert 0 < result.proposed and 0 <= result.accepted <= result.proposed
        rejected += result.proposed - result.accepted
        all_accepted += result.per_round.count(k)
    # else the draft agrees with the target (or never does) and one of the two paths went unchecked
    assert rejected > 0 and all_accepted > 0


def test_greedy_identity_holds_with_a_repetition_penalty(pair):
    target, draft = pair
    params = SamplingParams(temperature=0, repetition_penalty=1.8)
    prompt = [5, 17, 3]
    result = speculative_generate(target, draft, prompt, params, k=4, max_new_tokens=25)
    sampler, seen = Sampler([params], "cpu"), context_mask([prompt], 97, "cpu")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(25):
            token = sampler.sample(target(ids)[0][:, -1], seen)
            mark_seen(seen, token)
            ids = torch.cat((ids, token[:, None]), dim=1)
    assert result.tokens == ids[0, 3:].tolist()
    assert result.accepted < result.proposed


def test_the_draft_as_its_own_target_accepts_everything(pair):
    target, _ = pair
    result = speculative_generate(target, target, [5, 17, 3], GREEDY, k=4, max_new_tokens=21)
    assert result.acceptance_rate == 1.0 and len(result.tokens) == 21
    assert result.rounds == 5  # 4 accepted + 1 bonus per round, a last round of 1


def test_eos_stops_generation_and_is_the_last_token(pair):
    target, draft = pair
    full = plain_greedy(target, [5, 17, 3], 30)
    eos = full[12]
    result = speculative_generate(target, draft, [5, 17, 3], GREEDY, k=4, max_new_tokens=30, eos_id=eos)
    assert result.tokens == full[:full.index(eos) + 1]


def test_streamed_rounds_join_to_the_tokens(pair):
    target, draft = pair
    rounds: list[list[int]] = []
    result = speculative_generate(target, draft, [5, 17, 3], SamplingParams(seed=3), k=3, max_new_tokens=20,
                                  on_tokens=rounds.append)
    assert list(itertools.chain(*rounds)) == result.tokens and len(result.tokens) == 20
    assert len(rounds) == result.rounds


def test_the_same_seed_gives_the_same_tokens(pair):
    target, draft = pair
    run = [speculative_generate(target, draft, [5, 17, 3], SamplingParams(seed=s, top_p=0.9), k=3,
                                max_new_tokens=20).tokens for s in (7, 7, 8)]
    assert run[0] == run[1] != run[2]


def test_incompatible_models_and_bad_settings_are_user_errors(pair):
    target, draft = pair
    with pytest.raises(UserError, match="vocab_size 50 != target vocab_size 97"):
        speculative_generate(target, tiny(50, 1, 32, seed=1), [1, 2], GREEDY)
    with pytest.raises(UserError, match="max_seq_len is 64"):
        speculative_generate(target, draft, [1] * 10, GREEDY, max_new_tokens=60)
    with pytest.raises(UserError, match="k=0"):
        speculative_generate(target, draft, [1], GREEDY, k=0)
    with pytest.raises(UserError, match="at least one token"):
        speculative_generate(target, draft, [], GREEDY)


# -- cache rollback -------------------------------------------------------------------------------
@torch.no_grad()
def test_after_a_rejection_both_models_next_logits_equal_a_fresh_recompute(pair):
    target, draft = pair
    sampler = Sampler([GREEDY], "cpu")
    run = speculative._Run(target, draft, sampler, [5, 17, 3], 64, torch.device("cpu"))
    rejections = 0
    for _ in range(8):
        _, accepted, proposed = run.round(4)
        rejections += accepted < proposed
        sequence = run.committed
        for model, cache in ((target, run.target_cache), (draft, run.draft_cache)):
            pending = run._pending(cache)
            assert int(cache.lengths[0]) + pending.shape[1] == sequence.shape[1] and pending.shape[1] >= 1
            assert cache.end == int(cache.lengths[0])  # rolled back: no rejected slot left behind
            fresh = model(sequence)[0][:, -1]
            # what the next round computes from the cache (on a copy, so `run` is untouched)
            copy = speculative.KVCache.__new__(speculative.KVCache)
            copy.__dict__ = {name: (v.clone() if torch.is_tensor(v) else v) for name, v in cache.__dict__.items()}
            cached = model(pending, cache=copy, logits_to_keep=1)[0][:, -1]
            torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=1e-5)
    assert rejections > 0


# -- the distribution -----------------------------------------------------------------------------
V = 8
PROMPT = [1, 4, 2]


@pytest.fixture(scope="module")
def small_pair() -> tuple[GPT, GPT]:
    # a large init makes both distributions far from uniform and far from each other, so the
    # accept/reject rule does real work (many rejections) and a wrong rule shows
    return tiny(V, 1, 16, seed=10, init_std=0.6), tiny(V, 1, 8, seed=11, init_std=0.6)


@torch.no_grad()
def exact_joint(model: GPT, params: SamplingParams) -> torch.Tensor:
    """(V, V): the probability the target alone, sampling under `params`, gives tokens (a, b) first."""
    sampler = Sampler([params], "cpu")
    seen = context_mask([PROMPT], V, "cpu")
    first = sampler.probs(model(torch.tensor([PROMPT]))[0][:, -1], seen)[0]  # (V,)
    joint = torch.zeros(V, V, dtype=torch.float64)
    for a in range(V):
        seen_a = seen.clone()
        mark_seen(seen_a, torch.tensor([a]))
        second = sampler.probs(model(torch.tensor([PROMPT + [a]]))[0][:, -1], seen_a)[0]
        joint[a] = first[a].double() * second.double()
    return joint


def sample_pairs(target: GPT, draft: GPT, params: SamplingParams, n: int) -> torch.Tensor:
    """(V, V) counts of the first two tokens over n seeds. Half the runs take k=2 (one round proposes
    both: the accept test and the residual at two positions), half k=1 (the second token is the bonus
    drawn from the target after an accepted draft, or a plain target step after a rejection); each
    half alone follows the target, so the mixture must too."""
    counts = torch.zeros(V, V, dtype=torch.float64)
    for seed in range(n):
        run = speculative_generate(target, draft, PROMPT, SamplingParams(**{**vars_of(params), "seed": seed}),
                                   k=1 + seed % 2, max_new_tokens=3)
        counts[run.tokens[0], run.tokens[1]] += 1
    return counts


def vars_of(params: SamplingParams) -> dict:
    return {f: getattr(params, f) for f in params.__dataclass_fields__}


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probs; cells expecting < 5 are pooled into one (the usual rule
    for the chi-square approximation to hold). A draw the target can never produce gives 0."""
    counts, probs = counts.flatten(), probs.flatten()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    small = (expected < 5) & (probs > 0)
    obs = torch.cat((counts[expected >= 5], counts[small].sum().view(1)))
    exp = torch.cat((expected[expected >= 5], expected[small].sum().view(1)))
    obs, exp = obs[exp > 0], exp[exp > 0]
    statistic = float(((obs - exp) ** 2 / exp).sum())
    return float(chi2.sf(statistic, df=len(obs) - 1))


DISTRIBUTIONS = {
    "plain": SamplingParams(temperature=1.0),
    # top-k gives the draft tokens the target can never produce: their proposals must all be rejected
    "processed": SamplingParams(temperature=0.8, top_k=5, repetition_penalty=1.5),
}
N = 1000  # about 3 s per test on an idle core; the draft is far enough off that this has ample power


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_speculative_sampling_follows_the_targets_distribution(small_pair, name):
    target, draft = small_pair
    params = DISTRIBUTIONS[name]
    p = exact_joint(target, params)
    q = exact_joint(draft, params)
    assert 0.5 * float((p - q).abs().sum()) > 0.2  # the draft alone would be far off: the rule matters
    counts = sample_pairs(target, draft, params, N)
    assert chi_square_p_value(counts.sum(dim=1), p.sum(dim=1)) > ALPHA  # the first token
    assert chi_square_p_value(counts, p) > ALPHA  # the first two together


def test_the_chi_square_test_catches_a_rule_that_accepts_every_draft(small_pair, monkeypatch):
    """The power of the test above: always accepting yields the draft's distribution, which it rejects."""
    target, draft = small_pair
    params = DISTRIBUTIONS["plain"]
    p = exact_joint(target, params)
    monkeypatch.setattr(speculative._Run, "_accepted", lambda self, proposal, p, q: proposal.shape[1])
    counts = sample_pairs(target, draft, params, 300)  # the draft is so far off that 300 draws show it
    assert chi_square_p_value(counts, p) < ALPHA


def test_speculative_imports_on_a_bare_gpu_node():
    # the engine imports it lazily where only torch, numpy and the standard library are installed
    proc = subprocess.run([sys.executable, "-c", PROBE.format(blocked=BLOCKED, modules=["llmpipe.serve.speculative"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
