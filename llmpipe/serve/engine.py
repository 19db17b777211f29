"""The generation engine: batched prefill, then one token per step for every unfinished request.

    engine = Engine(model, tokenizer, device)
    [completion] = engine.generate(["Once upon"], SamplingParams(temperature=0, max_new_tokens=40),
                                   stop=["\\n\\n"], on_delta=lambda row, text: print(text, end=""))

Prompts of different lengths are left-padded into one batch and prefilled in one forward pass; each
later step feeds one token per running row through the KV cache. A row that finishes (stop string,
end of sequence, max_new_tokens) is dropped from the batch, its cache rows with it, so a long request
never makes the finished ones pay. Sampling is Sampler's, one generator per request, so a request's
text depends on its prompt, settings and seed only, not on the batch it shares.

With a draft model (`Engine(..., draft=)`), each request goes through speculative decoding
(llmpipe.serve.speculative, batch of one), with the same stop strings, streaming and finish reasons.

Context: prompt + max_new_tokens must fit the model's max_seq_len (rotary positions beyond it were
never trained). A request that does not fit is refused with a UserError naming both numbers rather
than silently cut: a truncated prompt changes the answer, and the caller (chat keeps history) knows
better what to drop. An empty prompt starts after an end of sequence, where every training document
starts.

Torch and the standard library at module level: `load_engine` imports the loader when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from llmpipe.errors import UserError
from llmpipe.serve.sampling import Sampler, SamplingParams, context_mask, mark_seen
from llmpipe.serve.text import IncrementalDetokenizer, StopMatcher

FinishReason = Literal["stop", "length", "eos"]
OnDelta = Callable[[int, str], None]
DRAFT_TOKENS = 4  # draft tokens proposed per speculative round


@dataclass(frozen=True)
class Completion:
    """One request's result. `token_ids` are every generated token, including an end-of-sequence
    token or the tokens that carried a stop string; `text` ends before either."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    draft_acceptance: float | None = None
    """With a draft model: the share of its proposed tokens the target accepted."""


class _Row:
    """One running request: its tokens, streamed text and why it ended."""

    def __init__(self, index: int, tokenizer, params: SamplingParams, stop: Sequence[str], end_ids: set[int],
                 on_delta: OnDelta | None):
        self.index, self.params, self.end_ids, self.on_delta = index, params, end_ids, on_delta
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stopper = StopMatcher(stop)
        self.ids: list[int] = []
        self.text: list[str] = []
        self.finish: FinishReason | None = None
        self.rounds: list[int] = []  # with a draft: tokens committed per speculative round

    def push(self, token: int) -> None:
        """Take the next token; sets `finish` once the request is done."""
        self.ids.append(token)
        if token in self.end_ids:
            self.finish = "eos"
        else:
            self._show(self.stopper.push(self.detok.push(token)))
            if self.stopper.stopped:
                self.finish = "stop"
            elif len(self.ids) >= self.params.max_new_tokens:
                self.finish = "length"
        if self.finish in ("eos", "length"):  # what was held back for a possible stop is final text now
            self._show(self.stopper.push(self.detok.flush()))
            self._show(self.stopper.flush())
            if self.stopper.stopped:  # the flushed bytes completed a stop string
                self.finish = "stop"

    def _show(self, delta: str) -> None:
        if delta:
            self.text.append(delta)
            if self.on_delta is not None:
                self.on_delta(self.index, delta)

    def completion(self, prompt_tokens: int) -> Completion:
        assert self.finish is not None
        return Completion("".join(self.text), self.ids, self.finish, prompt_tokens, len(self.ids),
                          _acceptance(self.rounds, self.params.max_new_tokens) if self.rounds else None)


class Engine:
    """Generation for one model and its tokenizer; `draft` (a smaller model on the same tokens)
    turns on speculative decoding."""

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu", draft=None):
        from llmpipe.model.attention import resolve_masked_backend

        self.model, self.tokenizer, self.device, self.draft = model.eval(), tokenizer, torch.device(device), draft
        # now, so the backend's log line comes before any streamed text rather than in the middle of it
        resolve_masked_backend(model.config.attn_backend, self.device)

    @property
    def max_seq_len(self) -> int:
        return self.model.config.max_seq_len

    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Token ids per prompt (text is encoded, ids kept); an empty prompt starts after an eos."""
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        return [p or [self.tokenizer.eos_id] for p in ids]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 stop: Sequence[str] = (), on_delta: OnDelta | None = None,
                 end_ids: Sequence[int] = ()) -> list[Completion]:
        """One Completion per prompt, in order. `on_delta(row, text)` receives each row's new text as
        it is decided (whole characters, never part of a stop string); a row's deltas join to its
        text. `end_ids`: token ids that end a reply besides the tokenizer's eos (chat's end of turn)."""
        if not len(prompts):
            return []
        ids = self.encode(prompts)
        per_row = _per_row(params, len(ids))
        self._check_fits(ids, per_row)
        if self.draft is not None:
            return self._speculative(ids, per_row, stop, on_delta, end_ids)
        ends = {self.tokenizer.eos_id, *map(int, end_ids)}
        rows = [_Row(i, self.tokenizer, p, stop, ends, on_delta) for i, p in enumerate(per_row)]
        self._decode(ids, per_row, rows)
        return [row.completion(len(p)) for row, p in zip(rows, ids)]

    def _check_fits(self, ids: list[list[int]], params: list[SamplingParams]) -> None:
        for k, (prompt, p) in enumerate(zip(ids, params)):
            if len(prompt) + p.max_new_tokens > self.max_seq_len:
                room = self.max_seq_len - len(prompt)
                fix = (f"lower --max-new-tokens to {room} or shorten the prompt" if room > 0
                       else "shorten the prompt")
                raise UserError(f"prompt {k + 1} of {len(ids)}: {len(prompt)} prompt tokens + max_new_tokens "
                                f"{p.max_new_tokens} exceed the model's max_seq_len {self.max_seq_len}; {fix}")

    def _decode(self, ids: list[list[int]], params: list[SamplingParams], rows: list[_Row]) -> None:
        model, vocab = self.model, self.model.config.vocab_size
        tokens, mask = left_pad(ids, self.tokenizer.pad_id, self.device)
        # slots, not positions: padding takes slots but no position, so a batch may need more slots than
        # max_seq_len while every row's positions stay inside it (checked by _check_fits)
        cache = _new_cache(model, len(ids), tokens.shape[1] + max(p.max_new_tokens for p in params))
        sampler = Sampler(params, self.device)
        seen = context_mask(ids, vocab, self.device) if any(p.repetition_penalty != 1 for p in params) else None
        running = list(rows)
        logits, _ = model(tokens, cache=cache, attention_mask=mask, logits_to_keep=1)  # (B, 1, V)
        while True:
            nxt = sampler.sample(logits[:, -1], seen)  # (B,)
            for row, token in zip(running, nxt.tolist()):
                row.push(token)
            if seen is not None:
                mark_seen(seen, nxt)
            keep = [k for k, row in enumerate(running) if row.finish is None]
            if not keep:
                return
            if len(keep) < len(running):
                running = [running[k] for k in keep]
                sampler = sampler.subset(keep)
                _keep_cache_rows(cache, keep)
                nxt = nxt[keep]
                seen = None if seen is None else seen[keep]
            logits, _ = model(nxt[:, None], cache=cache, logits_to_keep=1)

    def _speculative(self, ids, params, stop, on_delta, end_ids) -> list[Completion]:
        """One request at a time through the draft (speculative decoding is batch-of-one): the same
        rows, stop strings and streaming as plain decoding, fed with each round's committed tokens."""
        try:
            from llmpipe.serve.speculative import speculative_generate
        except ModuleNotFoundError as exc:
            if exc.name != "llmpipe.serve.speculative":
                raise
            raise UserError("speculative decoding (--draft) is not available yet in this version of llmpipe; "
                            "generate without --draft") from None
        ends = {self.tokenizer.eos_id, *map(int, end_ids)}
        completions = []
        for index, (prompt, p) in enumerate(zip(ids, params)):
            row = _Row(index, self.tokenizer, p, stop, ends, on_delta)
            try:
                speculative_generate(self.model, self.draft, prompt, p, k=DRAFT_TOKENS, eos_id=self.tokenizer.eos_id,
                                     on_tokens=lambda tokens, row=row: _feed(row, tokens))
            except _Finished:
                pass  # a stop string or an end-of-turn id: no need for the rest of the budget
            completions.append(row.completion(len(prompt)))
        return completions


class _Finished(Exception):
    """Raised from a streaming callback to end a generation the callee cannot stop itself."""


def _feed(row: _Row, tokens: list[int]) -> None:
    row.rounds.append(len(tokens))
    for token in tokens:
        row.push(token)
        if row.finish is not None:
            raise _Finished


def _acceptance(rounds: list[int], budget: int) -> float:
    """Accepted / proposed draft tokens from the tokens each round committed: a round commits its
    accepted drafts plus one target token, and proposes DRAFT_TOKENS, fewer near the budget (the
    speculative decoder's rule). An eos cutting the last round short makes this a lower bound."""
    accepted = proposed = committed = 0
    for n in rounds:
        accepted += n - 1
        proposed += min(DRAFT_TOKENS, budget - committed - 1)
        committed += n
    return accepted / proposed if proposed else 0.0


def _per_row(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise UserError(f"{len(params)} sampling settings for {n} prompts: give one SamplingParams, or one per prompt")
    return params


def left_pad(ids: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T), mask (B, T) True at real tokens): prompts right-aligned so every row's next
    token goes to the same cache slot."""
    width = max(len(p) for p in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for row, prompt in enumerate(ids):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = True
    return tokens.to(device), mask.to(device)


def _new_cache(model, batch: int, slots: int):
    from llmpipe.model.cache import KVCache

    cfg, weight = model.config, model.tok_embeddings.weight
    return KVCache(cfg.n_layer, batch, cfg.n_kv_head, slots, cfg.head_dim, weight.dtype, weight.device)


def _keep_cache_rows(cache, rows: list[int]) -> None:
    """Drop the finished rows' slots from every layer, in place (the cache knows no row selection)."""
    index = torch.tensor(rows, dtype=torch.long, device=cache.valid.device)
    cache.k, cache.v = cache.k[:, index], cache.v[:, index]
    cache.valid, cache.lengths = cache.valid[index], cache.lengths[index]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def newest_model(root) -> str:
    """The newest trained model of the project at `root`: of the pipeline's stages with a "model"
    output, the one whose final checkpoint was written last. Optional side models (the draft) are
    never the default."""
    from llmpipe.stages import STAGES
    from llmpipe.train.checkpoint import MARKER

    finals = [(root / spec.outputs["model"] / "final" / MARKER, name) for name, spec in STAGES.items()
              if "model" in spec.outputs and not spec.optional]
    done = [(marker.stat().st_mtime, name) for marker, name in finals if marker.exists()]
    if not done:
        raise UserError(f"{root}: no trained model yet (no final checkpoint of {', '.join(n for _, n in finals)}); "
                        f"train one (llmpipe run) or pass --model DIR")
    return max(done)[1]


def load_engine(model: str | None, draft: str | None = None, device: str | None = None) -> tuple[Engine, object]:
    """(Engine, ModelInfo) for a model source (a directory or a stage name; None: the project's newest
    model), with an optional draft model that must share its tokenizer."""
    from llmpipe.io import project_root
    from llmpipe.serve.load import load_model

    device = device or default_device()
    source = model if model is not None else newest_model(project_root())
    target, tok, info = load_model(source, device)
    draft_model = None
    if draft is not None:
        draft_model, _, _ = load_model(draft, device, tokenizer=info.tokenizer_dir)  # refuses other tokens
    return Engine(target, tok, device, draft_model), info


def tokens_per_second(completions: Sequence[Completion], seconds: float) -> float:
    return sum(c.completion_tokens for c in completions) / max(seconds, 1e-9)




def read_prompts(prompts: Sequence[str], prompts_file: str | None, stdin=None) -> list[str]:
    """The prompts of `llmpipe generate`: each --prompt, then one per line of --prompts-file ("-": stdin)."""
    import sys
    from pathlib import Path

    found = list(prompts)
    if prompts_file is not None:
        try:
            source = stdin or sys.stdin
            text = source.read() if prompts_file == "-" else Path(prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--prompts-file {prompts_file}: cannot read it as UTF-8 text ({exc})") from None
        found += [line for line in text.splitlines() if line.strip()]
    if not found:
        raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE (one per line, - for stdin)")
    return found


def print_completions(engine: Engine, prompts: list[str], params: SamplingParams, stop: Sequence[str], out, err
                      ) -> list[Completion]:
    """Generate and print: one prompt streams its text as it comes; several print each completion under
    a header once the batch is done. A summary per completion goes to `err`."""
    import time

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    started = time.perf_counter()
    stream = (lambda row, text: write(text)) if len(prompts) == 1 else None
    done = engine.generate(prompts, params, stop=stop, on_delta=stream)
    seconds = time.perf_counter() - started
    for k, (prompt, completion) in enumerate(zip(prompts, done)):
        if stream is None:
            write(f"--- {k + 1}/{len(prompts)}: {prompt}\n{completion.text}\n")
        else:
            write("\n")
        drafted = "" if completion.draft_acceptance is None else f" draft_acceptance={completion.draft_acceptance:.2f}"
        err.write(f"[{k + 1}] finish={completion.finish_reason} prompt_tokens={completion.prompt_tokens} "
                  f"completion_tokens={completion.completion_tokens}{drafted}\n")
    err.write(f"{tokens_per_second(done, seconds):.1f} tokens/s\n")
    return done


__all__ = ["Completion", "Engine", "left_pad", "load_engine", "newest_model", "print_completions", "read_prompts",
           "tokens_per_second"]
