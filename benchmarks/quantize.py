"""Decoding speed of the quantized variants against fp32: the same model, prompts and settings, one run.

Each preset's model is built once (random weights at the model's own init: speed does not depend on
what was learned), then quantized to int8 and int4 as the quantize stage does it
(llmpipe/package/quant.py), and every variant decodes the same prompts greedily through the
generation engine, batch 1 (what `llmpipe generate` and `chat` do). The fastest of --repeats passes
counts. Prints tokens/s per variant and preset, then the ratios to fp32 LAST.

    python benchmarks/quantize.py --tokenizer models/tokenizer --preset tiny --preset draft --preset gpt2-124m
    python benchmarks/quantize.py --tokenizer models/tokenizer --device cuda --preset gpt2-124m

Size and quality are the quantize stage's own measurements (metrics/quantize.json on the trained model).
"""

from __future__ import annotations

import argparse
import copy

import torch

from llmpipe.model import GPT, ModelConfig
from llmpipe.package.quant import QuantSpec, quantize_model
from llmpipe.package.quantize import decode_speed
from llmpipe.serve.engine import Engine
from llmpipe.tokenizer import Tokenizer

PROMPTS = ["ROMEO:", "The king is dead, and", "Once upon a time,"]
VARIANTS = ("fp32", "int8", "int4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="models/tokenizer", help="a tokenizer directory (its vocab sizes the models)")
    parser.add_argument("--preset", action="append", help="model presets (repeatable; default tiny)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="passes per variant; the fastest counts")
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tok = Tokenizer.load(args.tokenizer)
    speeds: dict[str, dict[str, float]] = {}
    for preset in args.preset or ["tiny"]:
        torch.manual_seed(args.seed)
        base = GPT(ModelConfig.from_preset(preset, tok.vocab_size)).eval()
        speeds[preset] = {}
        for variant in VARIANTS:
            model = base if variant == "fp32" else quantize_model(copy.deepcopy(base),
                                                                  QuantSpec(variant, group_size=args.group_size))
            if args.device != "cpu":  # quantized on CPU, as the stage does
                model = model.to(args.device)
            speeds[preset][variant] = decode_speed(Engine(model, tok, args.device), PROMPTS, args.new_tokens,
                                                   args.repeats)
            print(f"{preset:<10} {variant:<5} {speeds[preset][variant]:8.1f} tokens/s", flush=True)
    print(f"\nthreads {torch.get_num_threads()}, {args.new_tokens} new tokens x {len(PROMPTS)} prompts, batch 1, "
          f"best of {args.repeats}, device {args.device}")
    for preset, row in speeds.items():
        print(f"{preset}: int8 / fp32 {row['int8'] / row['fp32']:.2f}x, int4 / fp32 {row['int4'] / row['fp32']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
