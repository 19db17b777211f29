"""Encoding the corpus into train/val token shards, with the statistics the stage reports.

Documents are read from the dedup stage's Parquet parts in a fixed order (sorted file names, row
order), assigned to train or val by a hash of their id, encoded in batches on all cores, and
appended to the split's shards with an eos after each document. Every val document is decoded
again and compared with its text: a tokenizer that loses a character stops the stage.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llmpipe.errors import UserError
from llmpipe.tokenizer.shards import TOKENS_FORMAT, TokenShardWriter, dtype_name, write_split_meta
from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer

SPLITS = ("train", "val")
BATCH_CHARS = 8_000_000  # characters encoded per call to the thread pool (bounds memory)


class RoundTripError(RuntimeError):
    """decode(encode(text)) != text: a tokenizer bug that would silently corrupt training data."""


def input_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


def source_hash(files: list[Path]) -> str:
    """sha256 over the names and contents of the input parts (what DVC would call the input)."""
    from llmpipe.io import sha256_file

    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


def unit_hash(doc_id: str, salt: str) -> float:
    """A stable number in [0, 1) per document id: the same split on every machine and Python version."""
    digest = hashlib.blake2b(f"{salt}:{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1_000_000 / 1_000_000


def is_val(doc_id: str, val_ratio: float) -> bool:
    return unit_hash(doc_id, "split") < val_ratio


def iter_documents(files: list[Path], batch_rows: int = 1024) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) batches over all parts in order; a part without `id`/`text` columns is a user error."""
    from llmpipe.io import iter_parquet_batches

    for file in files:
        check_schema(file)
        for batch in iter_parquet_batches(file, batch_size=batch_rows, columns=["id", "text"]):
            ids, texts = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            for k, text in enumerate(texts):
                if text is None:
                    raise UserError(f"{file}: document {ids[k]} has no text (null); re-run the dedup stage")
            yield ids, texts


def check_schema(file: Path) -> None:
    import pyarrow.parquet as pq

    names = set(pq.read_schema(file).names)
    if not {"id", "text"} <= names:
        raise UserError(f"{file}: expected columns id and text (the data record schema), found "
                         f"{sorted(names)}; re-run the dedup stage")


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0  # including one eos per document
    bytes: int = 0  # UTF-8 bytes of the documents' text
    byte_tokens: int = 0  # tokens that are byte-fallback pieces
    id_counts: np.ndarray | None = None  # (vocab_size,) how often each id occurs
    roundtrip_checked: int = 0
    shards: list = field(default_factory=list)


def encode_corpus(tok: Tokenizer, files: list[Path], out_dir: Path, val_ratio: float, shard_tokens: int,
                  num_threads: int, meta: dict,
                  val_hook: Callable[[list[str]], None] | None = None) -> dict[str, SplitStats]:
    """Write `out_dir/{train,val}/shard-*.bin` + meta.json; `meta` adds fields (hashes) to each meta.json,
    `val_hook` sees the val texts batch by batch (the stage counts reference tokens with it).

    The caller owns atomicity of `out_dir` (a temp dir renamed when this returns)."""
    is_byte = np.array([tok.is_byte(i) for i in range(tok.vocab_size)])
    stats = {s: SplitStats(id_counts=np.zeros(tok.vocab_size, dtype=np.int64)) for s in SPLITS}
    writers = {s: TokenShardWriter(out_dir / s, tok.vocab_size, shard_tokens) for s in SPLITS}
    eos = (tok.eos_id,)
    try:
        with tqdm(total=len(files), desc="tokenizer: encode", unit="part", disable=None) as bar:
            for ids, texts in _char_batches(files, bar):
                encoded = tok.encode_batch(texts, num_threads=num_threads)
                docs: dict[str, list[int]] = {s: [] for s in SPLITS}  # batch positions per split
                for k, doc_id in enumerate(ids):
                    docs["val" if is_val(doc_id, val_ratio) else "train"].append(k)
                for split, positions in docs.items():
                    if not positions:
                        continue
                    st, writer = stats[split], writers[split]
                    count = sum(len(encoded[k]) + 1 for k in positions)
                    # One flat array per split and batch: the documents' ids, each followed by eos.
                    tokens = np.fromiter(itertools.chain.from_iterable(
                        part for k in positions for part in (encoded[k], eos)), dtype=writer.dtype, count=count)
                    writer.write(tokens)
                    st.documents += len(positions)
                    st.tokens += count
                    st.bytes += sum(len(texts[k].encode("utf-8")) for k in positions)
                    st.id_counts += np.bincount(tokens, minlength=tok.vocab_size)
                _check_roundtrip(tok, [(ids[k], texts[k], encoded[k]) for k in docs["val"]], num_threads)
                stats["val"].roundtrip_checked += len(docs["val"])
                if val_hook is not None and docs["val"]:
                    val_hook([texts[k] for k in docs["val"]])
        for split in SPLITS:
            stats[split].shards = writers[split].close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for split in SPLITS:
        st = stats[split]
        st.byte_tokens = int(st.id_counts[is_byte].sum())
        write_split_meta(out_dir / split, {
            "format": TOKENS_FORMAT, "dtype": dtype_name(writers[split].dtype), "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id,
            "num_tokens": st.tokens, "num_documents": st.documents, "num_bytes": st.bytes,
            "tokenizer_hash": tok.hash, "shards": st.shards, **meta,
        })
    return stats


def _char_batches(files: list[Path], bar) -> Iterator[tuple[list[str], list[str]]]:
    """Regroup row batches into batches of about BATCH_CHARS characters: big enough to keep every
    core busy, small enough to bound memory."""
    ids: list[str] = []
    texts: list[str] = []
    chars = 0
    for file in files:
        for batch_ids, batch_texts in iter_documents([file]):
            ids += batch_ids
            texts += batch_texts
            chars += sum(map(len, batch_texts))
            if chars >= BATCH_CHARS:
                yield ids, texts
                ids, texts, chars = [], [], 0
        bar.update(1)
    if ids:
        yield ids, texts


def _check_roundtrip(tok: Tokenizer, docs: list[tuple[str, str, list[int]]], num_threads: int) -> None:
    if not docs:
        return
    decoded = tok.decode_batch([d for _, _, d in docs], num_threads=num_threads)
    for (doc_id, text, _), back in zip(docs, decoded):
        if back != text:
            at = next((k for k, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
            raise RoundTripError(
                f"decode(encode(text)) != text for document {doc_id!r} at character {at}: "
                f"{text[max(0, at - 20):at + 20]!r} came back as {back[max(0, at - 20):at + 20]!r}")
