"""What every rank of a pretrain run executes: `python -m llmpipe.train.pretrain_worker --config resolved.json`.

The pretrain stage (llmpipe/train/pretrain.py) resolves params.yaml into a plain JSON file, then calls
`train` in its own process, or, with nproc_per_node > 1, starts this module under torchrun
(llmpipe/train/launch.py). It needs only torch and numpy, so it runs on a GPU node that has nothing
else; for several nodes, start it with torchrun on each (see llmpipe/train/pretrain.py).

    {"root": "/abs/project", "train_dir": "data/tokens/train", "val_dir": "data/tokens/val",
     "tokenizer_dir": "models/tokenizer", "out_dir": "models/pretrain",
     "model": {ModelConfig fields}, "train": {TrainConfig fields}, "sample_prompt": "ROMEO:"}

Rank 0 appends per-step metrics to <out_dir>/metrics.jsonl (the stage forwards them to MLflow) and,
with --result, writes the final metrics (or the user error that stopped the ranks) there. The final
metrics add the final weights' bits per byte over the WHOLE val split (`val_split_bpb`; the periodic
`val_bpb` reads a fixed sample of `eval_batches` windows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmpipe.errors import UserError
from llmpipe.io import sha256_file
from llmpipe.model import ModelConfig
from llmpipe.train import distributed as ddist
from llmpipe.train.data import TokenWindows
from llmpipe.train.launch import report_result
from llmpipe.train.loop import EvalPrompts, TrainConfig, Trainer
from llmpipe.train.score import score_split
from llmpipe.train.task import pretraining_task

if TYPE_CHECKING:
    from llmpipe.tokenizer.shards import TokenSplit

log = logging.getLogger("llmpipe.train")


def train(resolved: dict[str, Any], tracker: Any = None) -> dict[str, float]:
    """Pretrain as `resolved` says (resuming from the newest checkpoint); returns the final metrics."""
    from llmpipe.tokenizer.shards import open_split  # numpy-only reader of the token shards

    root = Path(resolved["root"])
    cfg = TrainConfig(**resolved["train"])
    model_cfg = ModelConfig.from_dict(resolved["model"])
    train_split, val_split = open_split(root / resolved["train_dir"]), open_split(root / resolved["val_dir"])
    tokenizer_ref = tokenizer_reference(train_split.meta, val_split.meta, resolved["tokenizer_dir"])
    if model_cfg.vocab_size != tokenizer_ref["vocab_size"]:
        raise UserError(f"model vocab_size {model_cfg.vocab_size} != tokenizer vocab_size "
                        f"{tokenizer_ref['vocab_size']} ({resolved['train_dir']}/meta.json)")
    bytes_per_token = val_split.meta["num_bytes"] / val_split.meta["num_tokens"]
    world = ddist.init(resolved.get("device", "auto"))
    try:
        # only rank 0 writes and resumes checkpoints, so only it reads every shard to hash them
        data_ref = {"dir": resolved["train_dir"], "sha256": tokens_hash(train_split)} if world.is_main else None
        task = pretraining_task(TokenWindows(train_split.shards, cfg.seq_len, resolved["train_dir"]),
                                TokenWindows(val_split.shards, cfg.seq_len, resolved["val_dir"]), cfg, world,
                                bytes_per_token)
        sampler = make_sampler(root / resolved["tokenizer_dir"], resolved.get("sample_prompt", "")) \
            if cfg.sample_tokens else None
        trainer = Trainer(model_cfg, cfg, task, root / resolved["out_dir"], tokenizer_ref, tracker, world, sampler,
                          data_ref)
        if world.is_main:
            log.info("model %s params, %d steps of %d tokens (accum %d x %d ranks), device %s",
                     f"{trainer.model.num_params():,}", cfg.max_steps, cfg.global_batch_tokens, trainer.accum,
                     world.world_size, world.device)
        metrics = trainer.fit()
        # every rank scores (an FSDP2 forward needs all of them); the same figure on each
        score = score_split(trainer.model, val_split.shards, val_split.meta["num_bytes"], cfg.seq_len,
                            cfg.micro_batch, world.device, trainer.autocast)
        return {**metrics, "val_split_bpb": score.bpb, "val_split_loss": score.loss}
    finally:
        ddist.shutdown()


def tokenizer_reference(train_meta: dict, val_meta: dict, tokenizer_dir: str) -> dict[str, Any]:
    """What a checkpoint records about its tokenizer (checked on resume and by later stages)."""
    if train_meta["tokenizer_hash"] != val_meta["tokenizer_hash"]:
        raise UserError("train and val token shards were made by different tokenizers "
                        f"({train_meta['tokenizer_hash']} vs {val_meta['tokenizer_hash']}): rerun the tokenizer stage")
    return {"hash": train_meta["tokenizer_hash"], "dir": tokenizer_dir, "vocab_size": train_meta["vocab_size"],
            **{k: train_meta.get(k) for k in ("eos_id", "bos_id", "pad_id")}}


def tokens_hash(split: TokenSplit) -> str:
    """sha256 over the names and contents of a split's shards, in meta.json's order: the tokens trained on.

    meta.json's own hashes describe the tokenizer and the text it encoded, not the tokens: shards
    rewritten under an unchanged tokenizer would keep them."""
    digest = hashlib.sha256()
    for entry in split.meta["shards"]:
        digest.update(entry["file"].encode() + b"\0" + bytes.fromhex(sha256_file(split.path / entry["file"])))
    return digest.hexdigest()


def make_sampler(tokenizer_dir: Path, prompt: str) -> EvalPrompts | None:
    """Samples need the real tokenizer (sentencepiece); a bare GPU node may not have it."""
    try:
        from llmpipe.tokenizer import Tokenizer
    except ImportError as exc:
        log.warning("no samples during training: cannot import the tokenizer (%s)", exc)
        return None
    tok = Tokenizer.load(tokenizer_dir)
    prompt_ids = tok.encode(prompt) if prompt else []
    return EvalPrompts([prompt_ids or [tok.eos_id]], tok.decode, tok.eos_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved JSON written by the pretrain stage")
    parser.add_argument("--result", help="where rank 0 writes the final metrics (or a user error) as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    report_result(args.result, lambda: train(json.loads(Path(args.config).read_text())))


if __name__ == "__main__":
    main()
