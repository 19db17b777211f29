"""Synthetic token shards in the tokenizer stage's format (`llmpipe.tokens/1`), for training tests.

The stream is a Markov chain driven by a 32-bit LCG (no library RNG, so it is the same bytes on any
machine and numpy version): each token has 4 possible successors, so a model can learn it and the
loss falls from ln(vocab) towards ln(4).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def markov_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    state, prev, out = seed, 1, np.empty(n, dtype=np.int64)
    for i in range(n):
        state = (1664525 * state + 1013904223) % 2**32
        prev = (prev * 31 + 7 * ((state >> 16) % 4) + 1) % vocab
        out[i] = prev
    return out


def write_split(path: Path, tokens: np.ndarray, vocab_size: int, shard_tokens: int = 1 << 20,
                dtype: str = "uint16", tokenizer_hash: str = "synthetic-tok", bytes_per_token: float = 3.5) -> Path:
    """Write `tokens` as shard-XXXXX.bin files plus meta.json, like the tokenizer stage does."""
    path.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, len(tokens), shard_tokens)):
        chunk = tokens[start:start + shard_tokens].astype(np.dtype(dtype).newbyteorder("<"))
        name = f"shard-{i:05d}.bin"
        chunk.tofile(path / name)
        shards.append({"file": name, "num_tokens": int(len(chunk))})
    meta = {"format": "llmpipe.tokens/1", "dtype": dtype, "eos_id": 0, "bos_id": None, "pad_id": None,
            "vocab_size": vocab_size, "num_tokens": int(len(tokens)), "num_documents": 1,
            "num_bytes": int(len(tokens) * bytes_per_token), "tokenizer_hash": tokenizer_hash,
            "source_hash": "synthetic-src", "shards": shards}
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


def write_tokens(root: Path, vocab: int = 256, n_train: int = 60_000, n_val: int = 8_000, **kwargs) -> Path:
    """data/tokens/{train,val} under `root`; returns the tokens dir."""
    tokens = root / "data" / "tokens"
    write_split(tokens / "train", markov_tokens(n_train, vocab, seed=1), vocab, **kwargs)
    write_split(tokens / "val", markov_tokens(n_val, vocab, seed=2), vocab, **kwargs)
    return tokens


# A reduced `tiny`: 2 layers of 128 wide, short context; trains a step in tens of milliseconds.
SMALL_MODEL = {"n_layer": 2, "d_model": 128, "max_seq_len": 64}
SMALL_TRAIN = {"seq_len": 64, "micro_batch": 4, "global_batch_tokens": 512, "max_steps": 20, "lr": 3e-3,
               "warmup_steps": 3, "eval_every": 5, "eval_batches": 2, "checkpoint_every": 4, "keep_last": 2,
               "sample_tokens": 0}


def resolved_config(root: Path, vocab: int = 256, model: dict | None = None, train: dict | None = None,
                    out_dir: str = "models/pretrain") -> dict:
    """The JSON the pretrain stage hands to `python -m llmpipe.train.pretrain_worker`."""
    from llmpipe.model import ModelConfig

    model_cfg = ModelConfig.from_preset("tiny", vocab, **{**SMALL_MODEL, **(model or {})})
    return {"root": str(root), "train_dir": "data/tokens/train", "val_dir": "data/tokens/val",
            "tokenizer_dir": "models/tokenizer", "out_dir": out_dir, "model": model_cfg.to_dict(),
            "train": {**SMALL_TRAIN, **(train or {})}, "sample_prompt": ""}
