"""The lm-eval model `llmpipe`: our checkpoints in lm-evaluation-harness, from Python and the CLI.

    lm_eval.simple_evaluate(model="llmpipe", model_args="pretrained=models/sft", tasks=[...])
    llmpipe lm-eval --model llmpipe --model_args pretrained=models/sft --tasks hellaswag

`pretrained` is anything `llmpipe.serve.load.load_model` takes (a checkpoint or stage output
directory, a stage name). Importing this module registers the model (see `register`).

Conventions, stated because they change the numbers:

- Document start. Every request is scored as the start of a document: its tokens follow one prefix
  token, which is never scored. The prefix is the eos id, not bos: the tokenizer stage writes an
  eos after every document, so every training document starts right after an eos, while bos never
  occurs in pretraining (on the demo model, bos as the prefix costs 0.02 nats/token more on held-out
  documents). lm-eval's own default (`TemplateLM.prefix_token_id`) is the same token. The `hf` backend with add_bos_token=True also scores the BOS of a rolling
  document; we do not, so our perplexities are over the document's own tokens only.
- Context/continuation boundary: lm-eval's `_encode_pair` as its HF model does it (trailing spaces of
  the context move to the continuation; the pair is encoded whole and the context alone, and the
  continuation is whole[len(context):]). When the context's last piece swallows the whole
  continuation (context "hello wor", continuation "ld" can encode whole as ... "▁world"), HF's rule
  leaves nothing to score and lm-eval asserts; we then split the whole encoding where it first
  differs from the context's, so the merged token is scored as part of the continuation.
- Chat markers: once lm-eval has asked for a chat template (`apply_chat_template`), the strings of our
  special tokens ("<|user|>", "<|end|>", ...) in request text encode to their ids, as a Hugging Face
  tokenizer does with its special tokens, so a templated prompt reaches the model as the fine-tunes
  saw it. Without a chat template they are ordinary text, as in the pretraining documents.
- Rolling windows: lm-eval's `get_rolling_token_windows` with context_len 1, made disjoint, as its
  HF model: every token is scored exactly once, the last window has a full max_length of context.
- Truncation: a loglikelihood request longer than max_length + 1 tokens loses tokens from the left
  (lm-eval's HF rule); a generation prompt is cut from the left to max_length - max_gen_toks.

Batching: requests are sorted by length (longest first, lm-eval's Collator) and run batch_size at a
time, one forward pass per batch, results back in request order. Rows of a batch are left-padded
with an attention mask, so every continuation ends at the last position and only the last
max(continuation) positions go through the vocabulary projection. Generation goes through the
engine (llmpipe.serve.engine: KV cache, stop strings, max tokens), a batch of prompts at a time.

`stats` counts requests and seconds per request type, for the evaluate stage's requests/s.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

# before anything registers: if the registry is not empty when lm-eval first looks a model up, it
# never imports lm_eval.models, and the built-in models ("hf", "dummy", ...) stay unknown
import lm_eval.models  # noqa: F401
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs

from llmpipe.errors import UserError

MODEL_NAME = "llmpipe"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF default
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")
CHAT_FORMAT = "llmpipe: <|role|> content <|end|> per message, <|assistant|> to reply"
PARSED_SPECIALS = ("bos", "eos", "system", "user", "assistant", "end_of_turn")  # not unk/pad: never meant as text

Request = tuple[Any, list[int], list[int]]  # (cache key or None, context ids, continuation ids)


@register_model(MODEL_NAME)
class LlmpipeLM(TemplateLM):
    """An llmpipe checkpoint as an lm-eval model (see the module docstring for the conventions)."""

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, max_batch_size: int | None = None, seed: int = 1234):
        super().__init__()
        from llmpipe.serve.engine import Engine, default_device
        from llmpipe.serve.load import load_model

        device = device or default_device()
        self.model, self.tokenizer, self.info = load_model(pretrained, device)
        self._device = torch.device(device)
        self.engine = Engine(self.model, self.tokenizer, self._device)
        self._batch_size = _batch_size(batch_size, max_batch_size)
        self._max_length = _max_length(max_length, self.model.config.max_seq_len, pretrained)
        self.seed = int(seed)
        self._specials = {self.tokenizer.id_to_piece(self.tokenizer.special_ids[name]): self.tokenizer.special_ids[name]
                          for name in PARSED_SPECIALS}
        self._special_split = re.compile("(" + "|".join(map(re.escape, self._specials)) + ")")
        self._chat_markers = False
        self.stats = {kind: {"requests": 0, "seconds": 0.0} for kind in REQUEST_TYPES}

    # -- what lm-eval asks of a model ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eos_id  # the token every training document follows (module docstring)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"llmpipe-{self.tokenizer.hash[:8]}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return CHAT_FORMAT if chat_template else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as text with our markers, which tok_encode turns back into their ids."""
        ids = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        self._chat_markers = True  # lm-eval templates every request before running any
        return self.tokenizer.decode(ids, skip_special=False)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results JSON under "config"."""
        parameters = sum(p.numel() for p in self.model.parameters())
        return {"llmpipe_model": self.info.to_dict(), "model_num_parameters": parameters,
                "max_length": self.max_length, "prefix_token": "eos (not scored)"}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text -> ids, after the document-start prefix unless add_special_tokens is False."""
        ids = self._encode(string)
        return ids if add_special_tokens is False else [self.prefix_token_id, *ids]

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _encode(self, text: str) -> list[int]:
        if not self._chat_markers or not any(marker in text for marker in self._specials):
            return self.tokenizer.encode(text)
        ids: list[int] = []
        for part in self._special_split.split(text):
            ids += [self._specials[part]] if part in self._specials else self.tokenizer.encode(part)
        return ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_ids, continuation_ids = super()._encode_pair(context, continuation)
        if continuation_ids or not continuation:
            return context_ids, continuation_ids
        # the context's last piece swallowed the continuation: split where the whole encoding departs
        whole = self.tok_encode(context + continuation)
        split = _common_prefix(whole, context_ids)
        return whole[:split], whole[split:]

    # -- the three request types --------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request."""
        with self._timed("loglikelihood", len(requests)):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True) -> list[float]:
        """The log-probability of each whole document, every token scored once (rolling_windows)."""
        with self._timed("loglikelihood_rolling", len(requests)):
            windows, owners = [], []
            for k, request in enumerate(requests):
                (text,) = request.args
                for context, continuation in rolling_windows(self.tok_encode(text, add_special_tokens=False),
                                                             self.prefix_token_id, self.max_length):
                    windows.append((None, context, continuation))
                    owners.append(k)
            totals = [0.0] * len(requests)
            for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
                totals[owner] += logprob
            for request, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

    def generate_until(self, requests, disable_tqdm: bool = True) -> list[str]:
        """Text generated after each context, up to its first stop string (not included) or max_gen_toks."""
        with self._timed("generate_until", len(requests)):
            prompts = [(self.tok_encode(context), gen_kwargs) for context, gen_kwargs in (r.args for r in requests)]
            order = Collator(prompts, sort_fn=lambda p: (-len(p[0]), tuple(p[0])), group_by="gen_kwargs",
                             group_fn=lambda p: p[1])
            texts = []
            for chunk in order.get_batched(n=self.batch_size):
                texts += self._generate_batch([ids for ids, _ in chunk], chunk[0][1])
            texts = order.get_original(texts)
            for request, text in zip(requests, texts):
                self.cache_hook.add_partial("generate_until", request.args, text)
            return texts

    # -- scoring --------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = True, override_bs=None
                              ) -> list[tuple[float, bool]]:
        """(logprob, is_greedy) per (key, context ids, continuation ids), longest first in batches."""
        for key, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise UserError(f"request {key!r}: {len(context)} context and {len(continuation)} continuation "
                                f"tokens; a request needs at least one of each and at most max_length "
                                f"{self.max_length} continuation tokens (shorten the task's target)")
        order = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results = []
        for chunk in order.get_batched(n=self.batch_size):
            scored = self._score_batch([r[1] for r in chunk], [r[2] for r in chunk])
            for (key, _, _), answer in zip(chunk, scored):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            results += scored
        return order.get_original(results)

    @torch.no_grad()
    def _score_batch(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """One forward pass: each row is (context + continuation)[-(max_length + 1):-1], left-padded, so
        its continuation's predictions are its last len(continuation) positions."""
        from llmpipe.serve.engine import left_pad

        inputs = [(c + k)[-(self.max_length + 1):-1] for c, k in zip(contexts, continuations)]
        keep = max(len(k) for k in continuations)
        tokens, mask = left_pad(inputs, self.tokenizer.pad_id, self.device)  # (B, T) each
        if bool(mask.all()):  # nothing padded: the plain causal pass, no mask to build
            logits, _ = self.model(tokens, logits_to_keep=keep)  # (B, keep, V)
        else:
            logits, _ = self.model(tokens, attention_mask=mask, logits_to_keep=keep)  # (B, keep, V)
        answers = []
        for row, continuation in zip(logits, continuations):
            row = row[keep - len(continuation):].float().log_softmax(dim=-1)  # (n, V)
            target = torch.tensor(continuation, dtype=torch.long, device=row.device)
            logprob = row.gather(1, target[:, None]).sum()
            answers.append((float(logprob), bool((row.argmax(dim=-1) == target).all())))
        return answers

    # -- generation ---------------------------------------------------------------------------------
    def _generate_batch(self, prompts: list[list[int]], gen_kwargs: dict) -> list[str]:
        from llmpipe.serve.sampling import SamplingParams

        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        stops = [s for s in kwargs.pop("until") if s]  # lm-eval skips '' too
        max_new = kwargs.pop("max_gen_toks")
        room = self.max_length - max_new
        if room < 1:
            raise UserError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}: "
                            f"lower the task's generation_kwargs max_gen_toks below {self.max_length}")
        greedy = not kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0)) == 0.0
        params = [SamplingParams(temperature=0.0 if greedy else float(kwargs["temperature"]),
                                 top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                                 max_new_tokens=max_new, seed=self._request_seed(p, gen_kwargs))
                  for p in prompts]
        done = self.engine.generate([p[-room:] for p in prompts], params, stop=stops,
                                    end_ids=[self.tokenizer.end_of_turn_id])
        return [c.text for c in done]

    def _request_seed(self, prompt: list[int], gen_kwargs: dict) -> int:
        """A sampled request's seed from the model's seed and the request alone, not its batch or order."""
        if "seed" in gen_kwargs:
            return int(gen_kwargs["seed"])
        key = json.dumps([self.seed, prompt, gen_kwargs], sort_keys=True, default=str).encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    @contextmanager
    def _timed(self, kind: str, n: int) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.stats[kind]["requests"] += n
        self.stats[kind]["seconds"] += time.perf_counter() - started


def rolling_windows(ids: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows of a document's ids: the continuations join to `ids`, each
    window fits max_length + 1 tokens, the first one's context is [prefix]."""
    return [lm_utils.make_disjoint_window(w) for w in
            lm_utils.get_rolling_token_windows(token_list=ids, prefix_token=prefix, max_seq_len=max_length,
                                                context_len=1)]


def register() -> type[LlmpipeLM]:
    """Make "llmpipe" name this module's model. Importing the module did it; calling again is a no-op
    (lm-eval's registry refuses a second, different class under one name)."""
    if model_registry.get(MODEL_NAME, None) is not LlmpipeLM:
        register_model(MODEL_NAME)(LlmpipeLM)
    return LlmpipeLM


def lm_eval_cli(argv: Sequence[str]) -> None:
    """`lm-eval ARGS...` with our model registered: lm-eval's own CLI, flags and output, argv unchanged."""
    from lm_eval.__main__ import cli_evaluate

    register()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval parses sys.argv itself (and inserts "run" when omitted)
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval passes "auto" (no probing here: our default) or a number, maybe as text."""
    if batch_size is None or str(batch_size).startswith("auto"):
        size = DEFAULT_BATCH_SIZE
    elif str(batch_size).isdigit() and int(batch_size) >= 1:
        size = int(batch_size)
    else:
        raise UserError(f"batch_size {batch_size!r}: give a positive integer (or auto, meaning {DEFAULT_BATCH_SIZE})")
    return min(size, max_batch_size) if max_batch_size else size


def _max_length(max_length: int | None, max_seq_len: int, source: str) -> int:
    if max_length is None:
        return max_seq_len
    if not 1 <= int(max_length) <= max_seq_len:
        raise UserError(f"max_length {max_length}: {source} was trained on at most {max_seq_len} positions; "
                        f"give 1..{max_seq_len} or leave it out")
    return int(max_length)


__all__ = ["LlmpipeLM", "MODEL_NAME", "lm_eval_cli", "register", "rolling_windows"]
