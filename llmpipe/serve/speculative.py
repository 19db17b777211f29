"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

One round, for one request (batch of 1):

    1. the draft samples x_1..x_k autoregressively from its processed distributions q_0..q_{k-1},
       with its own KV cache;
    2. the target runs ONE forward over [last committed token, x_1..x_k] against its cache (k + 1
       queries against the cached keys plus themselves) and gives p_0..p_k;
    3. x_i is accepted with probability min(1, p_{i-1}(x_i) / q_{i-1}(x_i)); at the first rejection
       the round's last token comes from the residual normalize(max(0, p - q)), and when all k are
       accepted one bonus token comes from p_k;
    4. both caches are truncated back to the accepted prefix.

That is the rule of Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
Decoding") and Chen et al. 2023 ("Accelerating LLM Decoding with Speculative Sampling"): every token
is distributed exactly as if the target had sampled it alone. p and q come from the same
`Sampler.probs` processing (repetition penalty over the same context, temperature, top-k, top-p),
so the guarantee holds for the processed distribution a plain sampler would draw from. A greedy
request has one-hot p and q: acceptance is exact matching and the residual is the target's argmax,
so the output is token for token the target's own greedy output.

Torch and the standard library only, like the rest of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from llmpipe.errors import UserError
from llmpipe.model.cache import KVCache
from llmpipe.serve.sampling import Sampler, SamplingParams, context_mask, mark_seen


@dataclass
class SpeculativeResult:
    tokens: list[int]
    """The new tokens (not the prompt), ending with eos_id when it was produced."""
    accepted: int
    """Draft tokens the target accepted."""
    proposed: int
    """Draft tokens proposed in all (k per round, fewer in a round near max_new_tokens)."""
    rounds: int = 0
    """Target forward passes after the prompt."""
    per_round: list[int] = field(default_factory=list, repr=False)
    """Tokens accepted in each round (0..k), for a histogram."""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def check_compatible(target: torch.nn.Module, draft: torch.nn.Module, context: int) -> None:
    """UserError unless the draft can propose tokens the target reads: same vocabulary, enough context."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise UserError(f"draft model vocab_size {dv} != target vocab_size {tv}: a draft must share the target's "
                        f"tokenizer; train it on the same tokens (the pretrain_draft stage) or pass another --draft")
    for name, model in (("target", target), ("draft", draft)):
        limit = model.config.max_seq_len
        if context > limit:
            raise UserError(f"prompt plus max_new_tokens needs {context} positions but the {name} model's "
                            f"max_seq_len is {limit}: shorten the prompt or lower --max-new-tokens")


@torch.no_grad()
def speculative_generate(target: torch.nn.Module, draft: torch.nn.Module, prompt_ids: list[int],
                         params: SamplingParams, k: int = 4, max_new_tokens: int | None = None,
                         eos_id: int | None = None, on_tokens: Callable[[list[int]], None] | None = None,
                         ) -> SpeculativeResult:
    """Generate up to `max_new_tokens` (default params.max_new_tokens) after `prompt_ids` with the target's
    output distribution, `k` draft tokens per round. One request at a time (batch of 1). `on_tokens`
    is called with each round's new tokens as soon as they are committed (streaming)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UserError(f"speculative k={k!r} is invalid: it must be an integer >= 1 (draft tokens per round)")
    if not prompt_ids:
        raise UserError("speculative decoding needs a prompt of at least one token (e.g. the tokenizer's BOS)")
    budget = params.max_new_tokens if max_new_tokens is None else max_new_tokens
    # the last committed token is never fed, so the caches hold at most prompt + budget - 1 tokens
    length = len(prompt_ids) + budget - 1
    check_compatible(target, draft, length)
    device = target.tok_embeddings.weight.device
    sampler = Sampler([params], device)
    run = _Run(target, draft, sampler, prompt_ids, length, device)
    result = SpeculativeResult(tokens=[], accepted=0, proposed=0)
    while len(result.tokens) < budget:
        # a round commits at most k + 1 tokens: never propose past the budget
        new, accepted, proposed = run.round(min(k, budget - len(result.tokens) - 1))
        result.accepted += accepted
        result.proposed += proposed
        result.rounds += 1
        result.per_round.append(accepted)
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]
        result.tokens += new
        if on_tokens is not None:
            on_tokens(new)
        if eos_id is not None and new[-1] == eos_id:
            break
    return result


class _Run:
    """The state of one speculative generation: committed tokens, both caches, the context mask."""

    def __init__(self, target, draft, sampler: Sampler, prompt_ids: list[int], length: int, device):
        self.target, self.draft, self.sampler, self.device = target, draft, sampler, device
        self.committed = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, L)
        self.target_cache = target.new_cache(1, max(length, 1))
        self.draft_cache = draft.new_cache(1, max(length, 1))
        vocab = target.config.vocab_size
        # the penalty's context: prompt and committed tokens; None when no penalty is asked for
        self.seen = (context_mask([prompt_ids], vocab, device) if params_penalize(sampler) else None)

    def round(self, k: int) -> tuple[list[int], int, int]:
        """Propose k tokens (k may be 0: a plain target step), verify, commit; returns (new tokens, accepted, k)."""
        proposal, q = self._propose(k)  # (1, k), (1, k, V)
        p = self._verify(proposal)  # (1, k + 1, V)
        accepted = self._accepted(proposal, p[:, :k], q)
        if accepted < k:
            residual = (p[:, accepted] - q[:, accepted]).clamp(min=0)
            # p == q up to rounding leaves no residual mass: then p itself is the exact answer
            last_probs = residual if bool(residual.sum() > 0) else p[:, accepted]
        else:
            last_probs = p[:, k]
        last = self.sampler.draw(last_probs / last_probs.sum(dim=-1, keepdim=True))  # (1,)
        new = torch.cat((proposal[:, :accepted], last[:, None]), dim=1)  # (1, accepted + 1)
        self._commit(new)
        return new[0].tolist(), accepted, k

    def _pending(self, cache: KVCache) -> torch.Tensor:
        """The committed tokens a model has not read yet except the very last (fed with the next proposal)."""
        return self.committed[:, int(cache.lengths[0]):]

    def _propose(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = self.target.config.vocab_size
        tokens = torch.empty(1, k, dtype=torch.long, device=self.device)
        q = torch.empty(1, k, vocab, dtype=torch.float32, device=self.device)
        if k == 0:
            return tokens, q
        seen = None if self.seen is None else self.seen.clone()
        feed = self._pending(self.draft_cache)  # the last committed token, two after a fully accepted round
        draft_device = self.draft.tok_embeddings.weight.device
        for i in range(k):
            logits = self.draft(feed.to(draft_device), cache=self.draft_cache, logits_to_keep=1)[0][:, -1]
            q[:, i] = self.sampler.probs(logits.to(self.device), seen)
            tokens[:, i] = self.sampler.draw(q[:, i])
            if seen is not None:
                mark_seen(seen, tokens[:, i])
            feed = tokens[:, i:i + 1]
        return tokens, q

    def _verify(self, proposal: torch.Tensor) -> torch.Tensor:
        """The target's processed distributions after the committed tokens and after each proposed one."""
        feed = torch.cat((self._pending(self.target_cache), proposal), dim=1)
        keep = proposal.shape[1] + 1
        logits = self.target(feed, cache=self.target_cache, logits_to_keep=keep)[0]  # (1, k + 1, V)
        return self.sampler.probs_along(logits, self.seen, proposal)

    def _accepted(self, proposal: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> int:
        """How many proposed tokens pass, in order, the test u < p(x) / q(x) with u ~ U[0, 1)."""
        k = proposal.shape[1]
        if k == 0:
            return 0
        index = proposal[..., None]  # (1, k, 1)
        p_x, q_x = p.gather(-1, index)[..., 0], q.gather(-1, index)[..., 0]  # (1, k)
        # all k draws up front (one sync, not k): a draw after the first rejection is simply unused
        u = torch.stack([self.sampler.uniform() for _ in range(k)], dim=1)  # (1, k)
        passed = (u * q_x < p_x)[0]  # q(x) > 0 since x was drawn from q; this avoids dividing by it
        rejected = (~passed).nonzero()
        return int(rejected[0]) if len(rejected) else k

    def _commit(self, new: torch.Tensor) -> None:
        kept = self.committed.shape[1] + new.shape[1] - 1  # everything but the newest token is read
        self.committed = torch.cat((self.committed, new), dim=1)
        for cache in (self.target_cache, self.draft_cache):
            if int(cache.lengths[0]) > kept:  # rejected drafts (and the target's look at them) go
                cache.truncate(kept)
        if self.seen is not None:
            for t in new[0]:
                mark_seen(self.seen, t.view(1))


def params_penalize(sampler: Sampler) -> bool:
    return any(p.repetition_penalty != 1 for p in sampler.params)


__all__ = ["SpeculativeResult", "check_compatible", "speculative_generate"]
