"""Evaluation speed: our lm-eval adapter vs a straightforward unbatched loop, same requests, one run.

Both score the same lm-eval requests (`Instance` objects), loglikelihood and loglikelihood_rolling
(generate_until is the engine's, measured by benchmarks/generation.py):

    adapter     `LlmpipeLM.loglikelihood` / `loglikelihood_rolling` (llmpipe/evaluate/adapter.py):
                requests sorted by length, --batch-size at a time, left-padded, one forward pass per
                batch, only the continuation's positions through the vocabulary projection;
    unbatched   each request alone, in request order: encoded by the adapter's own helpers (its
                context/continuation boundary, its rolling windows), one plain forward pass of the
                GPT per request (per window), the continuation's log-softmax summed.

Only batching, padding and sorting differ, so the log-likelihoods must agree up to float32 rounding;
the run prints their max |difference| per request type and FAIL (exit 1) past 1e-3 + 1e-4 * |value|.
Prints requests/s per method and request type, then the ratio LAST.

    python benchmarks/evaluate.py --model models/pretrain
    python benchmarks/evaluate.py --model models/pretrain --device cuda --batch-size 64 --requests 1024
    python benchmarks/evaluate.py --random --preset tiny --requests 64 --documents 8

With --model, requests come from the project's held-out documents (data/tokens/val under --project):
--requests context/continuation pairs cut at word boundaries, --documents whole documents for rolling
(longer ones take several windows). --random needs no project: a randomly initialised --preset model
and requests of random token ids written as text ("17 4 230"), which the benchmark's IdTokenizer
reads back one id per word; speed is real, the log-likelihoods mean nothing beyond their agreement.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from llmpipe.evaluate.adapter import REQUEST_TYPES, LlmpipeLM, rolling_windows
from llmpipe.model import GPT, ModelConfig

ABS_TOL, REL_TOL = 1e-3, 1e-4  # float32 sums over up to thousands of tokens, different matmul shapes
MAX_CONTEXT_WORDS, MAX_CONTINUATION_WORDS = 48, 8
RANDOM_INIT_STD = 0.3  # at training's 0.02 every logit is ~0: all methods agree trivially, to the last bit


@dataclass
class Timing:
    requests: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    logprobs: dict[str, list[float]] = field(default_factory=dict)

    def per_s(self, kind: str | None = None) -> float:
        kinds = [kind] if kind else list(self.seconds)
        seconds = sum(self.seconds[k] for k in kinds)
        return sum(self.requests[k] for k in kinds) / seconds if seconds else 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the two methods ------------------------------------------------------------------------------
def adapter_scores(lm: LlmpipeLM, kind: str, requests: list[Instance]) -> list[float]:
    if kind == "loglikelihood":
        return [logprob for logprob, _ in lm.loglikelihood(requests)]
    return lm.loglikelihood_rolling(requests)


@torch.no_grad()
def forward_logprob(model: GPT, context: list[int], continuation: list[int], max_length: int,
                    device: torch.device) -> float:
    """One unpadded forward pass over context + continuation (cut from the left to max_length + 1
    tokens, the adapter's rule): the continuation's log-probability."""
    ids = (context + continuation)[-(max_length + 1):]
    logits, _ = model(torch.tensor([ids[:-1]], device=device))  # (1, T, V)
    logprobs = logits[0, -len(continuation):].float().log_softmax(dim=-1)  # (n, V)
    target = torch.tensor(continuation, dtype=torch.long, device=device)
    return float(logprobs.gather(1, target[:, None]).sum())


def unbatched_scores(lm: LlmpipeLM, kind: str, requests: list[Instance]) -> list[float]:
    """Each request alone, encoded by the adapter's helpers, one forward pass per request (window)."""
    out = []
    for request in requests:
        if kind == "loglikelihood":
            pairs = [lm._encode_pair(*request.args)]  # our requests never have an empty context
        else:
            (text,) = request.args
            pairs = rolling_windows(lm.tok_encode(text, add_special_tokens=False), lm.prefix_token_id, lm.max_length)
        out.append(sum(forward_logprob(lm.model, c, k, lm.max_length, lm.device) for c, k in pairs))
    return out


METHODS = {"adapter": adapter_scores, "unbatched": unbatched_scores}


def measure(method, lm: LlmpipeLM, requests: dict[str, list[Instance]]) -> Timing:
    timing = Timing()
    for kind, batch in requests.items():
        sync(lm.device)
        start = time.perf_counter()
        timing.logprobs[kind] = method(lm, kind, batch)
        sync(lm.device)
        timing.seconds[kind] = time.perf_counter() - start
        timing.requests[kind] = len(batch)
    return timing


# -- models and requests --------------------------------------------------------------------------
class IdTokenizer:
    """--random's tokenizer: text is token ids written as words ("17 4 230"), so random requests need
    no trained tokenizer and still go through the adapter's text interface."""

    pad_id, eos_id = 0, 1
    first_free = 2  # request ids start here: never the pad or the document-start prefix

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def random_adapter(args, device: torch.device) -> LlmpipeLM:
    """The adapter around a random model and IdTokenizer. It loads checkpoints only, so this sets the
    attributes its loglikelihood path reads (TemplateLM's own and those of LlmpipeLM.__init__)."""
    cfg = ModelConfig.from_preset(args.preset, args.vocab_size, max_seq_len=args.seq_len, init_std=RANDOM_INIT_STD)
    torch.manual_seed(args.seed)
    lm = LlmpipeLM.__new__(LlmpipeLM)
    TemplateLM.__init__(lm)
    lm.model, lm.tokenizer, lm._device = GPT(cfg).to(device).eval(), IdTokenizer(), device
    lm._batch_size, lm._max_length, lm._chat_markers = args.batch_size, cfg.max_seq_len, False
    lm.stats = {kind: {"requests": 0, "seconds": 0.0} for kind in REQUEST_TYPES}
    return lm


def random_requests(args, lm: LlmpipeLM) -> dict[str, list[str | tuple[str, str]]]:
    gen = random.Random(args.seed)

    def text(n: int) -> str:
        return " ".join(str(gen.randrange(IdTokenizer.first_free, args.vocab_size)) for _ in range(n))

    pairs = [(text(gen.randint(1, lm.max_length // 2)), " " + text(gen.randint(1, 16))) for _ in range(args.requests)]
    documents = [text(gen.randint(lm.max_length // 2, 3 * lm.max_length)) for _ in range(args.documents)]
    return {"loglikelihood": pairs, "loglikelihood_rolling": documents}


def heldout_requests(args, lm: LlmpipeLM) -> dict[str, list[str | tuple[str, str]]]:
    """Context/continuation pairs cut at word boundaries of held-out documents, and whole documents."""
    from llmpipe.evaluate.heldout import split_documents

    val = Path(args.project) / "data" / "tokens" / "val"
    documents = [d for d in split_documents(val, lm.tokenizer, limit=max(args.requests, args.documents))
                 if len(d.split(" ")) >= 2]
    if not documents:
        raise SystemExit(f"{val}: no held-out documents of two words or more; run the tokenize stage "
                         f"(or give --project the project root, or use --random)")
    gen = random.Random(args.seed)
    pairs = []
    for k in range(args.requests):
        words = documents[k % len(documents)].split(" ")
        cut = gen.randint(1, min(len(words) - 1, MAX_CONTEXT_WORDS))
        end = cut + gen.randint(1, MAX_CONTINUATION_WORDS)
        pairs.append((" ".join(words[:cut]), " " + " ".join(words[cut:end])))
    return {"loglikelihood": pairs, "loglikelihood_rolling": documents[:args.documents]}


def instances(texts: dict[str, list]) -> dict[str, list[Instance]]:
    return {kind: [Instance(request_type=kind, doc={}, arguments=a if isinstance(a, tuple) else (a,), idx=i)
                   for i, a in enumerate(args)] for kind, args in texts.items()}


def build(args, device: torch.device) -> tuple[LlmpipeLM, dict[str, list[Instance]], list[str]]:
    if args.random:
        lm = random_adapter(args, device)
        texts = random_requests(args, lm)
        notes = [f"random {args.preset} model, random token ids as requests: only speed and agreement mean anything"]
    else:
        lm = LlmpipeLM(pretrained=args.model, device=str(device), batch_size=args.batch_size)
        texts = heldout_requests(args, lm)
        notes = [f"requests from held-out documents of {Path(args.project).resolve()}"]
    lm.model.float()  # the agreement check is a float32 one
    return lm, instances(texts), notes


# -- report ---------------------------------------------------------------------------------------
def max_difference(a: list[float], b: list[float]) -> tuple[float, bool]:
    """(max |a - b|, whether every pair is within ABS_TOL + REL_TOL * |b|)."""
    diffs = [(abs(x - y), abs(x - y) <= ABS_TOL + REL_TOL * abs(y)) for x, y in zip(a, b, strict=True)]
    return max((d for d, _ in diffs), default=0.0), all(ok for _, ok in diffs)


def describe(lm: LlmpipeLM, requests: dict[str, list[Instance]]) -> str:
    """The work in the requests: tokens scored per pair, forward windows per rolling document."""
    pairs = [lm._encode_pair(*r.args) for r in requests["loglikelihood"]]
    windows = sum(len(rolling_windows(lm.tok_encode(text, add_special_tokens=False), lm.prefix_token_id,
                                      lm.max_length)) for (text,) in (r.args for r in requests["loglikelihood_rolling"]))
    mean = sum(len(c) + len(k) for c, k in pairs) / max(len(pairs), 1)
    return (f"requests: {len(pairs)} loglikelihood (mean {mean:.1f} tokens with context), "
            f"{len(requests['loglikelihood_rolling'])} documents for loglikelihood_rolling ({windows} windows)")


def report(results: dict[str, Timing], lm: LlmpipeLM, requests: dict[str, list[Instance]], args,
           notes: list[str]) -> bool:
    print(f"device {args.device} float32 | {lm.model.num_params() / 1e6:.1f}M params, max_length {lm.max_length} | "
          f"adapter batch {lm.batch_size}, unbatched one request (window) per forward pass")
    print(describe(lm, requests))
    for note in notes:
        print(f"note: {note}")
    print(f"{'method':<10} {'request type':<22} {'requests':>8} {'requests/s':>11} {'total s':>8}")
    for name, t in results.items():
        for kind in requests:
            print(f"{name:<10} {kind:<22} {t.requests[kind]:>8} {t.per_s(kind):>11.1f} {t.seconds[kind]:>8.2f}")
        print(f"{name:<10} {'all':<22} {sum(t.requests.values()):>8} {t.per_s():>11.1f} {sum(t.seconds.values()):>8.2f}")
    agree = True
    for kind in requests:
        diff, ok = max_difference(results["adapter"].logprobs[kind], results["unbatched"].logprobs[kind])
        agree &= ok
        print(f"max |difference| {kind}: {diff:.2e} nats" + ("" if ok else f" FAIL: over {ABS_TOL} + {REL_TOL} * |value|"))
    for kind in requests:
        print(f"ratio adapter/unbatched {kind} (requests/s): "
              f"{results['adapter'].per_s(kind) / results['unbatched'].per_s(kind):.2f}")
    print(f"ratio adapter/unbatched (requests/s): {results['adapter'].per_s() / results['unbatched'].per_s():.2f}")
    return agree


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint (directory, stage output or stage name)")
    source.add_argument("--random", action="store_true", help="random model and requests, no project needed")
    p.add_argument("--project", default=".", help="project root whose data/tokens/val gives the requests")
    p.add_argument("--requests", type=int, default=256, help="loglikelihood requests")
    p.add_argument("--documents", type=int, default=32, help="loglikelihood_rolling requests (whole documents)")
    p.add_argument("--batch-size", type=int, default=16, help="the adapter's batch size")
    p.add_argument("--preset", default="tiny", help="--random model preset")
    p.add_argument("--vocab-size", type=int, default=4096, help="--random model vocabulary")
    p.add_argument("--seq-len", type=int, default=256, help="--random model max_length")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    lm, requests, notes = build(args, device)
    warmup = {kind: batch[:2] for kind, batch in requests.items()}
    for method in METHODS.values():  # kernels and the allocator, untimed
        measure(method, lm, warmup)
    results = {name: measure(method, lm, requests) for name, method in METHODS.items()}
    return 0 if report(results, lm, requests, args, notes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
