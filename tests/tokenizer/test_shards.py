"""Token shards: the writer/reader pair the training loop depends on (dtype switch, shard cuts,
memmap reading, validation) and the numpy-only import rule."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llmpipe.errors import UserError
from llmpipe.tokenizer.shards import (TOKENS_FORMAT, TokenShardWriter, dtype_for_vocab, dtype_name, open_split,
                                      write_split_meta)


def _write_split(directory, vocab_size, chunks, max_tokens):
    with TokenShardWriter(directory, vocab_size, max_tokens) as writer:
        for chunk in chunks:
            writer.write(chunk)
    total = sum(len(c) for c in chunks)
    write_split_meta(directory, {
        "format": TOKENS_FORMAT, "dtype": dtype_name(writer.dtype), "vocab_size": vocab_size,
        "eos_id": 2, "bos_id": 1, "pad_id": 3, "num_tokens": total, "num_documents": len(chunks),
        "num_bytes": 0, "tokenizer_hash": "t", "source_hash": "s", "shards": writer.shards})
    return writer


def test_dtype_switches_at_65536():
    assert dtype_name(dtype_for_vocab(4096)) == "uint16"
    assert dtype_name(dtype_for_vocab(65536)) == "uint16"  # ids 0..65535 fit
    assert dtype_name(dtype_for_vocab(65537)) == "uint32"


@pytest.mark.parametrize("vocab_size", [600, 65536, 100_000])
def test_written_tokens_read_back_through_memmap(tmp_path, vocab_size):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, vocab_size, size=n) for n in (5, 0, 17, 1, 40)]
    chunks[2][0] = vocab_size - 1  # the largest id survives the dtype
    _write_split(tmp_path, vocab_size, chunks, max_tokens=10)
    split = open_split(tmp_path)
    assert split.dtype == dtype_for_vocab(vocab_size)
    assert all(isinstance(s, np.memmap) for s in split.shards)
    assert [len(s) for s in split.shards] == [10] * 6 + [3]  # cut every max_tokens tokens
    assert split.num_tokens == 63
    np.testing.assert_array_equal(np.concatenate(split.shards), np.concatenate(chunks))
    itemsize = 2 if vocab_size <= 65536 else 4
    assert (tmp_path / "shard-00000.bin").stat().st_size == 10 * itemsize
    raw = np.frombuffer((tmp_path / "shard-00001.bin").read_bytes(), dtype=f"<u{itemsize}")  # little-endian on disk
    np.testing.assert_array_equal(raw, np.concatenate(chunks)[10:20])
    assert not list(tmp_path.glob(".tmp-*"))


def test_writer_rejects_ids_outside_the_vocabulary(tmp_path):
    writer = TokenShardWriter(tmp_path, 1000, max_tokens=100)
    with pytest.raises(ValueError, match="out of range"):
        writer.write(np.array([1, 1000]))
    with pytest.raises(ValueError, match="out of range"):
        writer.write([-1])


def test_abort_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with TokenShardWriter(tmp_path, 1000, max_tokens=4) as writer:
            writer.write(np.arange(6))  # one full shard, one open
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.bin"]


def test_open_split_refuses_incomplete_or_inconsistent_splits(tmp_path):
    with pytest.raises(UserError, match="not a finished token split"):
        open_split(tmp_path)
    _write_split(tmp_path, 1000, [np.arange(30)], max_tokens=20)
    (tmp_path / "shard-00001.bin").write_bytes(b"\0" * 4)  # truncated
    with pytest.raises(UserError, match="shard-00001.bin: expected 20 bytes"):
        open_split(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    with pytest.raises(UserError, match="does not match vocab_size"):
        open_split(tmp_path)


def test_reader_imports_only_numpy_and_the_standard_library():
    code = ("import sys; from llmpipe.tokenizer.shards import open_split; from llmpipe.tokenizer import open_split; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('sentencepiece', 'tokenizers', 'pyarrow', 'pydantic', 'tqdm', 'yaml', 'torch')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
