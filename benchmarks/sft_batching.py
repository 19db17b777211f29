"""SFT batching: length-bucketed right padding against packing (attention kept inside each conversation).

Both modes train the same model (same preset, same initial weights) on the same conversations, one
after the other in the same run, for --steps full training steps (forward, backward, AdamW) after
--warmup untimed ones. Batch building is timed too: it is part of what a training step costs. The
figure that matters is supervised tokens per second, the assistant tokens the loss learns from
(padding and prompt tokens cost compute but teach nothing). Prints a table, then the ratio
pack / bucket in supervised tokens/s last.

    python benchmarks/sft_batching.py                                   # tiny preset, CPU, synthetic chats
    python benchmarks/sft_batching.py --data data/chat/sft/train.parquet --vocab-size 4096   # real chats

Synthetic conversations (default): 1 to 6 exchanges, message lengths log-normal around 20 tokens,
about 45% of the tokens supervised, clipped to seq_len + 1; roughly the shape of chitchat turns.
Each bucket micro-batch has --micro-batch rows; a pack micro-batch has as many rows of seq_len as
hold about the same number of tokens (--pack-micro-batch overrides), so both steps do similar work.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from llmpipe.finetune.batches import SftBatches, SftExample, read_sft_examples
from llmpipe.model import GPT, ModelConfig


def synthetic_conversations(n: int, seq_len: int, vocab_size: int, seed: int) -> list[SftExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids: list[int] = []
        mask: list[bool] = []
        for _ in range(int(rng.integers(1, 7))):
            for learn in (False, True):  # user, then assistant
                size = int(np.clip(rng.lognormal(np.log(20), 0.8), 1, seq_len))
                ids += [1, *rng.integers(8, vocab_size, size).tolist(), 2]  # role, content, end_of_turn
                mask += [False] + [learn] * (size + 1)
        keep = seq_len + 1
        if len(ids) > keep:  # chat_data drops the oldest exchanges; here the tail is cut, keeping an answer
            ids, mask = ids[-keep:], mask[-keep:]
        out.append(SftExample(f"syn{i}", np.array(ids, dtype=np.int64), np.array(mask, dtype=bool)))
    return [e for e in out if e.mask[1:].any()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(mode: str, micro_batch: int, examples: list[SftExample], cfg: ModelConfig, state: dict, args,
            device: torch.device) -> dict:
    model = GPT(cfg)
    model.load_state_dict(state)
    model.to(device)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-4, fused=device.type == "cuda")
    source = SftBatches(examples, micro_batch=micro_batch, seq_len=args.seq_len, seed=0, mode=mode)
    counts = dict(supervised=0, positions=0)

    def step(k: int, count: bool) -> float:
        batch = source.micro_batches(k)[0]  # accum 1: one micro-batch per step
        if count:
            counts["supervised"] += source.tokens(batch)
            counts["positions"] += batch["idx"].numel()
        batch = {name: t.to(device) for name, t in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(batch["idx"], batch["targets"], segments=batch.get("segments"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for k in range(args.warmup):
        step(k, count=False)
    sync(device)
    start = time.perf_counter()
    for k in range(args.warmup, args.warmup + args.steps):
        loss = step(k, count=True)
    sync(device)
    elapsed = time.perf_counter() - start
    return dict(mode=mode, micro_batch=micro_batch, supervised_per_s=counts["supervised"] / elapsed,
                positions_per_s=counts["positions"] / elapsed, step_ms=1000 * elapsed / args.steps, loss=loss,
                supervised_share=counts["supervised"] / counts["positions"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="llmpipe model preset (default tiny)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    ap.add_argument("--seq-len", type=int, default=256, help="longest row in tokens (default 256)")
    ap.add_argument("--micro-batch", type=int, default=8, help="conversations per bucket micro-batch (default 8)")
    ap.add_argument("--pack-micro-batch", type=int, default=None,
                    help="rows per pack micro-batch (default: the rows that hold what a bucket micro-batch holds)")
    ap.add_argument("--conversations", type=int, default=2000, help="synthetic conversations (default 2000)")
    ap.add_argument("--data", default=None, help="an SFT parquet file (data/chat/sft/train.parquet) instead")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    if args.data:
        examples = [e for e in read_sft_examples(args.data) if len(e.ids) - 1 <= args.seq_len]
        source = args.data
    else:
        examples = synthetic_conversations(args.conversations, args.seq_len, args.vocab_size, seed=0)
        source = "synthetic"
    vocab = max(args.vocab_size, 1 + max(int(e.ids.max()) for e in examples))
    cfg = ModelConfig.from_preset(args.preset, vocab, max_seq_len=args.seq_len)
    state = GPT(cfg).state_dict()
    mean_len = float(np.mean([len(e.ids) - 1 for e in examples]))
    pack_micro = args.pack_micro_batch or max(1, round(args.micro_batch * mean_len / args.seq_len))
    print(f"sft batching: preset {args.preset} ({cfg.n_layer} x {cfg.d_model}), vocab {vocab}, seq_len "
          f"{args.seq_len}, {len(examples)} {source} conversations (mean {mean_len:.0f} tokens), {args.steps} "
          f"steps after {args.warmup} warmup, {device.type}, torch {torch.__version__}")

    rows = [measure("bucket", args.micro_batch, examples, cfg, state, args, device),
            measure("pack", pack_micro, examples, cfg, state, args, device)]
    print(f"{'mode':<8}{'rows':>6}{'supervised tok/s':>18}{'positions/s':>13}{'supervised share':>18}"
          f"{'step ms':>10}{'loss':>8}")
    for r in rows:
        print(f"{r['mode']:<8}{r['micro_batch']:>6}{r['supervised_per_s']:>18,.0f}{r['positions_per_s']:>13,.0f}"
              f"{r['supervised_share']:>18.1%}{r['step_ms']:>10.1f}{r['loss']:>8.3f}")
    print(f"ratio pack/bucket (supervised tokens/s): {rows[1]['supervised_per_s'] / rows[0]['supervised_per_s']:.3f}")


if __name__ == "__main__":
    main()
