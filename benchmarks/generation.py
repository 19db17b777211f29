"""Generation speed: no cache vs KV cache vs speculative decoding, same prompts and settings, one run.

All three decode greedily, one prompt at a time (batch 1, what an interactive `llmpipe generate` or
`chat` does), --new-tokens each:

    no cache      every step recomputes the whole sequence (the pre-KV-cache `GPT.generate`);
    KV cache      one forward over the prompt, then one token per step against the cache;
    speculative   the draft proposes --k tokens, the target verifies them in one forward
                  (llmpipe/serve/speculative.py).

Greedy output must be the same token for token; the run checks it and prints FAIL if not (fp32 is
exact up to argmax ties; bf16 rounds a (k + 1)-token verify differently from one-token steps, so
a rare flip there is rounding, not a bug). Prints tokens/s and time to first token per method,
the acceptance rate, then the ratios LAST.

    python benchmarks/generation.py --model models/pretrain --draft models/pretrain_draft --device cuda
    python benchmarks/generation.py --preset tiny --draft-preset tiny --draft-layers 1 --new-tokens 64

Without --model/--draft the models are randomly initialised from --preset/--draft-preset: speed is
real, the acceptance rate (and so the speculative ratio) is meaningless, and the output says so.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from llmpipe.model import GPT, ModelConfig
from llmpipe.serve.sampling import SamplingParams
from llmpipe.serve.speculative import speculative_generate

RANDOM_INIT_STD = 0.3
TEXT_PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The most important idea in computer science is",
    "Here is a short recipe for bread:",
    "The history of the printing press begins",
]


@dataclass
class Timing:
    tokens: list[list[int]] = field(default_factory=list)  # per prompt
    seconds: float = 0.0
    first_token_s: list[float] = field(default_factory=list)
    accepted: int = 0
    proposed: int = 0

    @property
    def tokens_per_s(self) -> float:
        return sum(map(len, self.tokens)) / self.seconds if self.seconds else 0.0

    @property
    def ttft_ms(self) -> float:
        return 1000 * sum(self.first_token_s) / len(self.first_token_s) if self.first_token_s else 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def no_cache(model: GPT, prompt: list[int], n: int, device: torch.device) -> tuple[list[int], float]:
    """Greedy, recomputing the whole sequence every step; returns (tokens, time to first token)."""
    start = time.perf_counter()
    ids = torch.tensor([prompt], device=device)
    first = 0.0
    for step in range(n):
        token = model(ids, logits_to_keep=1)[0][:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat((ids, token), dim=1)
        if step == 0:
            sync(device)
            first = time.perf_counter() - start
    return ids[0, len(prompt):].tolist(), first


@torch.no_grad()
def kv_cache(model: GPT, prompt: list[int], n: int, device: torch.device) -> tuple[list[int], float]:
    """Greedy with the KV cache: prefill the prompt, then one token per step."""
    start = time.perf_counter()
    cache = model.new_cache(1, len(prompt) + n)
    token = model(torch.tensor([prompt], device=device), cache=cache, logits_to_keep=1)[0][:, -1].argmax(-1, keepdim=True)
    sync(device)
    first = time.perf_counter() - start
    out = [token]
    for _ in range(n - 1):
        token = model(token, cache=cache, logits_to_keep=1)[0][:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)[0].tolist(), first


def speculative(target: GPT, draft: GPT, prompt: list[int], n: int, k: int) -> tuple[list[int], float, int, int]:
    start = time.perf_counter()
    first: list[float] = []

    def on_tokens(_new: list[int]) -> None:  # called after .tolist(): the device has caught up
        if not first:
            first.append(time.perf_counter() - start)

    result = speculative_generate(target, draft, prompt, SamplingParams(temperature=0), k=k, max_new_tokens=n,
                                  on_tokens=on_tokens)
    return result.tokens, first[0], result.accepted, result.proposed


def measure(method, prompts: list[list[int]], device: torch.device) -> Timing:
    timing = Timing()
    for prompt in prompts:
        sync(device)
        start = time.perf_counter()
        tokens, first, *counts = method(prompt)
        sync(device)
        timing.seconds += time.perf_counter() - start
        timing.tokens.append(tokens)
        timing.first_token_s.append(first)
        if counts:
            timing.accepted += counts[0]
            timing.proposed += counts[1]
    return timing


# -- models and prompts ---------------------------------------------------------------------------
def random_model(preset: str, vocab_size: int, context: int, device: torch.device, seed: int,
                 n_layer: int | None = None) -> GPT:
    # at training's init (0.02) a random tied-embedding model echoes its last token forever: every
    # method and any draft agree trivially. A wide init gives varied tokens, so the identity check
    # can fail and the draft is rejected as often as two unrelated models should be.
    overrides = {"init_std": RANDOM_INIT_STD} | ({} if n_layer is None else {"n_layer": n_layer})
    cfg = ModelConfig.from_preset(preset, vocab_size, **overrides)
    # a random model has no trained context length: make room for prompt + new tokens
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "max_seq_len": max(cfg.max_seq_len, context)})
    torch.manual_seed(seed)
    return GPT(cfg).to(device).eval()


def build(args, device: torch.device) -> tuple[GPT, GPT, list[list[int]], list[str]]:
    notes = []
    context = args.prompt_len + args.new_tokens
    if args.model:
        from llmpipe.serve.load import load_model

        target, tok, _ = load_model(args.model, device=str(device))
        prompts = [([tok.bos_id] + tok.encode(text))[:args.prompt_len] for text in TEXT_PROMPTS[:args.prompts]]
        vocab = target.config.vocab_size
    else:
        target = random_model(args.preset, args.vocab_size, context, device, args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        vocab = args.vocab_size
        prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
        notes.append(f"target: random {args.preset} (no --model)")
    if args.draft:
        from llmpipe.serve.load import load_model

        draft = load_model(args.draft, device=str(device))[0]
    else:
        draft = random_model(args.draft_preset, vocab, context, device, args.seed + 1, args.draft_layers)
        notes.append(f"draft: random {args.draft_preset}" + (f" with {args.draft_layers} layers" if args.draft_layers else "")
                     + " (no --draft)")
    if not (args.model and args.draft):
        notes.append("random weights: the acceptance rate and the speculative ratio are MEANINGLESS; "
                     "pass trained --model and --draft checkpoints for those")
    dtype = getattr(torch, args.dtype)
    return target.to(dtype), draft.to(dtype), prompts, notes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="target checkpoint (directory, stage output or stage name)")
    p.add_argument("--draft", help="draft checkpoint, same tokenizer as --model")
    p.add_argument("--preset", default="tiny", help="random target preset when no --model")
    p.add_argument("--draft-preset", default="tiny", help="random draft preset when no --draft")
    p.add_argument("--draft-layers", type=int, help="override the random draft's depth (find the best draft size)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of random models")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length (a cap for text prompts)")
    p.add_argument("--k", type=int, default=4, help="draft tokens per speculative round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    target, draft, prompts, notes = build(args, device)
    n = args.new_tokens
    methods = {
        "no cache": lambda prompt, n: no_cache(target, prompt, n, device),
        "KV cache": lambda prompt, n: kv_cache(target, prompt, n, device),
        "speculative": lambda prompt, n: speculative(target, draft, prompt, n, args.k),
    }
    for method in methods.values():  # warm up kernels and the allocator, untimed
        method(prompts[0], min(n, 2 * args.k + 2))
    results = {name: measure(lambda prompt: method(prompt, n), prompts, device) for name, method in methods.items()}

    print(f"device {args.device} {args.dtype} | target {target.num_params() / 1e6:.1f}M params, "
          f"draft {draft.num_params() / 1e6:.1f}M | {len(prompts)} prompts x {n} new tokens, greedy, batch 1, k={args.k}")
    for note in notes:
        print(f"note: {note}")
    print(f"{'method':<12} {'tokens/s':>10} {'TTFT ms':>9} {'total s':>8}")
    for name, t in results.items():
        print(f"{name:<12} {t.tokens_per_s:>10.1f} {t.ttft_ms:>9.1f} {t.seconds:>8.2f}")
    reference = results["no cache"].tokens
    same = all(results[name].tokens == reference for name in results)
    print("outputs identical: yes" if same else
          "FAIL: greedy outputs differ between methods: " +
          ", ".join(f"{name} {'==' if t.tokens == reference else '!='} no cache" for name, t in results.items()))
    spec = results["speculative"]
    print(f"acceptance rate: {spec.accepted / max(spec.proposed, 1):.3f} ({spec.accepted}/{spec.proposed} drafts)"
          + (" [random weights: meaningless]" if not (args.model and args.draft) else ""))
    kv, plain = results["KV cache"].tokens_per_s, results["no cache"].tokens_per_s
    print(f"ratio KV cache/no cache (tokens/s): {kv / plain:.2f}")
    print(f"ratio speculative/KV cache (tokens/s): {spec.tokens_per_s / kv:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
