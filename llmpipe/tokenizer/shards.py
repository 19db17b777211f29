"""Token shards: flat little-endian token arrays on disk, written atomically, read with numpy.memmap.

A split directory (`data/tokens/train/`) holds `shard-00000.bin`, `shard-00001.bin`, ... and a
`meta.json` that says how to read them (format, dtype, counts, hashes). Documents are concatenated
with an eos id AFTER each one, so a shard is one long stream a training loader can cut windows from.

This module imports only numpy and the standard library: the training loop on a bare GPU machine
imports `open_split` from here without sentencepiece, pyarrow or anything else installed.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmpipe.errors import UserError  # stdlib only, like llmpipe.io
from llmpipe.io import write_json_atomic  # stdlib-only at import, like this module

TOKENS_FORMAT = "llmpipe.tokens/1"
SPLIT_META_FILE = "meta.json"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (ids are 0..vocab_size-1), else uint32; always little-endian on disk."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).newbyteorder("=").name  # "uint16" / "uint32", the name meta.json records


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


class TokenShardWriter:
    """Append token arrays to a split directory, cutting a new shard every `max_tokens` tokens.

    Each shard is streamed into a temp file and renamed into place when full (or on `close`), so a
    `shard-*.bin` name only ever holds a complete shard. Memory use is one append, not one shard.
    """

    def __init__(self, directory: Path | str, vocab_size: int, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"max_tokens per shard must be >= 1, got {max_tokens}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.max_tokens = max_tokens
        self.shards: list[dict[str, Any]] = []  # [{"file": ..., "num_tokens": ...}] of finished shards
        self.num_tokens = 0
        self._fh = None
        self._tmp: Path | None = None
        self._in_shard = 0  # tokens in the open shard

    def write(self, tokens: np.ndarray | list[int]) -> None:
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        assert tokens.ndim == 1, tokens.shape
        if tokens.dtype != self.dtype:
            if tokens.min() < 0 or tokens.max() >= self.vocab_size:
                raise ValueError(f"token id out of range [0, {self.vocab_size}): min {tokens.min()}, max {tokens.max()}")
            tokens = tokens.astype(self.dtype)
        start = 0
        while start < tokens.size:
            if self._fh is None:
                self._open()
            take = min(tokens.size - start, self.max_tokens - self._in_shard)
            self._fh.write(tokens[start:start + take].tobytes())
            self._in_shard += take
            self.num_tokens += take
            start += take
            if self._in_shard == self.max_tokens:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; returns the shard list for meta.json."""
        if self._fh is not None:
            self._finish()
        return list(self.shards)

    def abort(self) -> None:
        """Drop the open shard's temp file (finished shards stay; the caller removes its temp dir)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._tmp.unlink(missing_ok=True)

    def _open(self) -> None:
        self._tmp = self.directory / f".tmp-{shard_name(len(self.shards))}-{uuid.uuid4().hex[:8]}"
        self._fh = open(self._tmp, "wb")
        self._in_shard = 0

    def _finish(self) -> None:
        name = shard_name(len(self.shards))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        os.replace(self._tmp, self.directory / name)
        self.shards.append({"file": name, "num_tokens": self._in_shard})

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_split_meta(directory: Path | str, meta: dict[str, Any]) -> None:
    """Write meta.json atomically: the split counts as readable once it exists."""
    write_json_atomic(Path(directory) / SPLIT_META_FILE, meta)


@dataclass
class TokenSplit:
    """One split opened for reading: its meta.json and one read-only memmap per shard (nothing loaded)."""

    path: Path
    meta: dict[str, Any]
    shards: list[np.memmap]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"]).newbyteorder("<")

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def open_split(path: Path | str) -> TokenSplit:
    """Open `data/tokens/<split>/`: validate meta.json against the shard files and memmap each shard."""
    path = Path(path)
    meta_path = path / SPLIT_META_FILE
    if not meta_path.exists():
        raise UserError(f"{meta_path} not found: {path} is not a finished token split (run the tokenizer stage)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != TOKENS_FORMAT:
        raise UserError(f"{meta_path}: format {meta.get('format')!r}, this code reads {TOKENS_FORMAT!r}; re-run the "
                        f"tokenizer stage")
    vocab_size = meta.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise UserError(f"{meta_path}: vocab_size {vocab_size!r} is not a positive integer; re-run the tokenizer stage")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if dtype != dtype_for_vocab(vocab_size):
        raise UserError(f"{meta_path}: dtype {meta['dtype']} does not match vocab_size {vocab_size}; re-run the "
                        f"tokenizer stage")
    shards = []
    for entry in meta["shards"]:
        file = path / entry["file"]
        expected = entry["num_tokens"] * dtype.itemsize
        size = file.stat().st_size if file.exists() else -1
        if size != expected:
            raise UserError(f"{file}: expected {expected} bytes ({entry['num_tokens']} tokens), found "
                             f"{'no file' if size < 0 else f'{size} bytes'}; re-run the tokenizer stage")
        shards.append(np.memmap(file, dtype=dtype, mode="r", shape=(entry["num_tokens"],)))
    if sum(s.shape[0] for s in shards) != meta["num_tokens"]:
        raise UserError(f"{meta_path}: num_tokens {meta['num_tokens']} != sum of shard sizes; re-run the "
                        f"tokenizer stage")
    return TokenSplit(path=path, meta=meta, shards=shards)
