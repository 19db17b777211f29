"""Sampling for the generation engine: per-request settings and batched logits processing.

One step turns the model's last-position logits (B, V) into a token per row. Each row is one request
with its own `SamplingParams`, processed in the order Hugging Face uses: repetition penalty, then
temperature, then top-k, then top-p. `Sampler.probs` returns the distribution after all of that, so
the speculative decoder can compare target and draft probabilities under the same processing.

Reproducibility: every row draws from its own `torch.Generator` seeded from its request's seed, and
every operation is row-wise, so a request's tokens depend on its seed and its logits only, never on
which other requests share the batch.

Torch and the standard library only: the engine runs on a bare GPU node.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from llmpipe.errors import UserError

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes any int below 2**64; keep it printable as int64


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens. The defaults sample from the model's own distribution."""

    temperature: float = 1.0
    """Divides the logits; 0 means greedy (always the most likely token)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p; 1 keeps all."""
    repetition_penalty: float = 1.0
    """CTRL rule for tokens already in the context: positive logits divided, negative multiplied; 1 is off."""
    seed: int | None = None
    """The same seed, prompt and settings give the same tokens; None draws a fresh seed."""
    max_new_tokens: int = 256
    """Generation stops after this many new tokens."""

    def __post_init__(self):
        _check_number("temperature", self.temperature, "a number >= 0 (0 means greedy)", lambda v: v >= 0)
        _check_int("top_k", self.top_k, "an integer >= 0 (0 keeps every token)", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "a number in (0, 1] (1 keeps every token)", lambda v: 0 < v <= 1)
        _check_number("repetition_penalty", self.repetition_penalty, "a number > 0 (1 is off)", lambda v: v > 0)
        if self.seed is not None:
            _check_int("seed", self.seed, "an integer in [0, 2**63) or None", lambda v: 0 <= v < SEED_LIMIT)
        _check_int("max_new_tokens", self.max_new_tokens, "an integer >= 1", lambda v: v >= 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_number(name: str, value, expected: str, ok) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and ok(value)):
        raise UserError(f"sampling setting {name}={value!r} is invalid: it must be {expected} "
                        f"(--{name.replace('_', '-')} on the command line)")


def _check_int(name: str, value, expected: str, ok) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and ok(value)):
        raise UserError(f"sampling setting {name}={value!r} is invalid: it must be {expected} "
                        f"(--{name.replace('_', '-')} on the command line)")


def request_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator for one request; without a seed, a fresh one from the OS so runs differ."""
    generator = torch.Generator(device=device)
    generator.manual_seed(random.SystemRandom().randrange(SEED_LIMIT) if seed is None else seed)
    return generator


def context_mask(contexts: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """(B, V) bool, True for the tokens already in each row's context (prompt and generated so far):
    the set the repetition penalty applies to. Keep it current with `mark_seen` after each step."""
    seen = torch.zeros(len(contexts), vocab_size, dtype=torch.bool, device=device)
    for row, ids in enumerate(contexts):
        if len(ids):
            seen[row, torch.as_tensor(list(ids), dtype=torch.long, device=device)] = True
    return seen


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add one new token per row (B,) to the context mask, in place."""
    seen.scatter_(1, tokens.view(-1, 1).to(seen.device), True)


class Sampler:
    """Batched sampling for a fixed list of requests, one row each, one generator each."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device | str,
                 generators: Sequence[torch.Generator] | None = None):
        self.params = list(params)
        self.device = torch.device(device)
        self.generators = list(generators) if generators is not None else [
            request_generator(p.seed, self.device) for p in self.params]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device).view(-1, 1)  # (B, 1)

        self._greedy = column([p.greedy for p in self.params], torch.bool)
        # greedy rows divide by 1: their probabilities are replaced by a one-hot on the argmax anyway
        self._temperature = column([p.temperature or 1.0 for p in self.params], torch.float32)
        self._top_k = column([p.top_k for p in self.params], torch.long)
        self._top_p = column([p.top_p for p in self.params], torch.float32)
        self._penalty = column([p.repetition_penalty for p in self.params], torch.float32)
        self._any_penalty = any(p.repetition_penalty != 1 for p in self.params)
        self._any_greedy = any(p.greedy for p in self.params)
        self._any_truncation = any(p.top_k > 0 or p.top_p < 1 for p in self.params)

    def __len__(self) -> int:
        return len(self.params)

    def subset(self, rows: Sequence[int]) -> "Sampler":
        """The sampler for some of the rows (requests still running), keeping their generators' state."""
        return Sampler([self.params[r] for r in rows], self.device, [self.generators[r] for r in rows])

    # -- processing ---------------------------------------------------------------------------
    def penalized(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """Repetition penalty on (B, V) logits (float32 copy); `seen` is the context mask."""
        logits = logits.float()
        if seen is None or not self._any_penalty:
            return logits
        penalized = torch.where(logits > 0, logits / self._penalty, logits * self._penalty)
        return torch.where(seen, penalized, logits)

    def processed_logits(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) logits after penalty, temperature, top-k and top-p; removed tokens are -inf."""
        return self._warp(self.penalized(logits, seen))

    def _warp(self, penalized: torch.Tensor) -> torch.Tensor:
        logits = penalized / self._temperature
        return self._truncate(logits) if self._any_truncation else logits

    def _truncate(self, logits: torch.Tensor) -> torch.Tensor:
        # one stable sort serves both rules; exactly k tokens survive top-k even when logits tie
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (B, V)
        vocab = logits.shape[-1]
        rank = torch.arange(vocab, device=logits.device).view(1, -1)  # (1, V)
        k = torch.where(self._top_k > 0, self._top_k, vocab)  # (B, 1)
        sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        # a token is needed while the mass before it is still short of p: the first always is (p > 0)
        drop = mass_before >= self._top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)

    def probs(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) float32 distribution each row samples from; a greedy row is one-hot on its argmax
        (so speculative accept/reject reduces to exact matching for it)."""
        penalized = self.penalized(logits, seen)
        probs = torch.softmax(self._warp(penalized), dim=-1)
        if self._any_greedy:
            # the argmax of the penalized logits: temperature and truncation never move it
            best = penalized.argmax(dim=-1, keepdim=True)  # (B, 1)
            one_hot = torch.zeros_like(probs).scatter_(1, best, 1.0)
            probs = torch.where(self._greedy, one_hot, probs)
        return probs

    def probs_along(self, logits: torch.Tensor, seen: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, V) distributions for T positions of a proposed continuation `tokens` (B, T - 1):
        position t sees the context plus tokens[:, :t], exactly as if the tokens had been sampled
        one step at a time (what the speculative decoder verifies in one forward pass)."""
        seen = None if seen is None else seen.clone()
        out = []
        for t in range(logits.shape[1]):
            out.append(self.probs(logits[:, t], seen))
            if seen is not None and t < tokens.shape[1]:
                mark_seen(seen, tokens[:, t])
        return torch.stack(out, dim=1)

    # -- drawing ------------------------------------------------------------------------------
    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row (B,) from (B, V) probabilities, each row with its own generator;
        greedy rows take the argmax and leave their generator untouched."""
        tokens = probs.argmax(dim=-1)
        for row, (params, generator) in enumerate(zip(self.params, self.generators)):
            if not params.greedy:
                tokens[row] = torch.multinomial(probs[row], 1, generator=generator)[0]
        return tokens

    def sample(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Next token per row (B,) from the model's last-position logits (B, V)."""
        return self.draw(self.probs(logits, seen))

    def uniform(self) -> torch.Tensor:
        """One U[0, 1) draw per row (B,) from the row's generator: the speculative accept test."""
        return torch.cat([torch.rand(1, generator=g, device=self.device) for g in self.generators])


__all__ = ["SamplingParams", "Sampler", "context_mask", "mark_seen", "request_generator"]
