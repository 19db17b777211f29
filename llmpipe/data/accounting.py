"""Record accounting shared by the data stages: schemas, counts per source, quarantine.

Every record a data stage reads is either kept or rejected with a reason; `Counts.check()` enforces
`read == kept + rejected` per source, and that the shard files hold exactly the kept and rejected
rows, before a stage may report success; every rejected record is written to a quarantine Parquet
shard with its reason, so nothing is ever silently lost.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from llmpipe.io import write_parquet_atomic

RECORD_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string()), ("meta", pa.string())])
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                               ("detail", pa.string()), ("text", pa.string()), ("meta", pa.string())])

# Quarantined text is kept whole except for oversized records, whose head is enough to identify them.
QUARANTINE_TEXT_LIMIT = 1 << 20

# Fixed log-spaced bins (characters) so per-shard length histograms add up across shards and reruns.
LENGTH_BINS = np.concatenate([[0], np.logspace(0, 9, 37)]).astype(np.int64)


class AccountingError(RuntimeError):
    """Records unaccounted for: an invariant of llmpipe's own code broke, a bug to report (no setting
    fixes it). Raised explicitly, not by `assert`, so the check holds under `python -O` too."""


def content_id(text: str) -> str:
    """Stable id of a record: 128-bit xxh3 of its UTF-8 text (same text -> same id, on any machine)."""
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass"))


@dataclass
class Record:
    id: str
    source: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Counts:
    """Per-source tallies of one shard (or a whole stage, after `merge`)."""

    read: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    rejected: dict[str, Counter] = field(default_factory=dict)  # source -> reason -> n
    chars_read: int = 0
    chars_kept: int = 0
    length_hist_kept: np.ndarray = field(default_factory=lambda: np.zeros(len(LENGTH_BINS), np.int64))
    length_hist_rejected: np.ndarray = field(default_factory=lambda: np.zeros(len(LENGTH_BINS), np.int64))
    stats: Counter = field(default_factory=Counter)  # other tallies a stage sums over shards (files, bytes, ...)

    def on_read(self, source: str, text_len: int = 0, n: int = 1) -> None:
        self.read[source] += n
        self.chars_read += text_len

    def on_kept(self, source: str, text_len: int) -> None:
        self.kept[source] += 1
        self.chars_kept += text_len
        self.length_hist_kept[_bin(text_len)] += 1

    def on_rejected(self, source: str, reason: str, text_len: int = 0) -> None:
        self.rejected.setdefault(source, Counter())[reason] += 1
        self.length_hist_rejected[_bin(text_len)] += 1

    def rejected_total(self, source: str | None = None) -> int:
        sources = [source] if source is not None else list(self.rejected)
        return sum(sum(self.rejected.get(s, Counter()).values()) for s in sources)

    def reasons(self) -> Counter:
        total: Counter = Counter()
        for by_reason in self.rejected.values():
            total.update(by_reason)
        return total

    def check(self, stage: str, written: tuple[int, int] | None = None) -> None:
        """Raise AccountingError if any record is unaccounted for: read must equal kept + rejected for
        every source, and, given `written` (the rows in the output and quarantine files), the files must
        hold exactly the kept and the rejected records."""
        sources = set(self.read) | set(self.kept) | set(self.rejected)
        bad = [f"{s}: read {self.read[s]} != kept {self.kept[s]} + rejected {self.rejected_total(s)}"
               for s in sorted(sources) if self.read[s] != self.kept[s] + self.rejected_total(s)]
        counted = (sum(self.kept.values()), self.rejected_total())
        if written is not None and tuple(written) != counted:
            bad.append(f"counted kept {counted[0]} + rejected {counted[1]}, but the output holds {written[0]} "
                       f"rows and the quarantine {written[1]}")
        if bad:
            raise AccountingError(f"{stage}: records unaccounted for (a bug in llmpipe, please report it):\n  "
                                  + "\n  ".join(bad))

    def merge(self, other: Counts) -> Counts:
        self.read.update(other.read)
        self.kept.update(other.kept)
        for source, by_reason in other.rejected.items():
            self.rejected.setdefault(source, Counter()).update(by_reason)
        self.chars_read += other.chars_read
        self.chars_kept += other.chars_kept
        self.length_hist_kept += other.length_hist_kept
        self.length_hist_rejected += other.length_hist_rejected
        self.stats.update(other.stats)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"read": dict(self.read), "kept": dict(self.kept),
                "rejected": {s: dict(r) for s, r in self.rejected.items()},
                "chars_read": self.chars_read, "chars_kept": self.chars_kept,
                "length_hist_kept": self.length_hist_kept.tolist(),
                "length_hist_rejected": self.length_hist_rejected.tolist(), "stats": dict(self.stats)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counts:
        return cls(read=Counter(data["read"]), kept=Counter(data["kept"]),
                   rejected={s: Counter(r) for s, r in data["rejected"].items()},
                   chars_read=data["chars_read"], chars_kept=data["chars_kept"],
                   length_hist_kept=np.array(data["length_hist_kept"], np.int64),
                   length_hist_rejected=np.array(data["length_hist_rejected"], np.int64),
                   stats=Counter(data.get("stats", {})))

    def metrics(self) -> dict[str, float]:
        """Flat totals for metrics/<stage>.json and MLflow."""
        out = {"records_read": float(sum(self.read.values())), "records_kept": float(sum(self.kept.values())),
               "records_rejected": float(self.rejected_total()), "chars_read": float(self.chars_read),
               "chars_kept": float(self.chars_kept)}
        out.update({f"rejected.{reason}": float(n) for reason, n in sorted(self.reasons().items())})
        out.update({name: float(n) for name, n in sorted(self.stats.items())})
        return out


def _bin(length: int) -> int:
    return int(np.searchsorted(LENGTH_BINS, length, side="right") - 1)


class RecordShardWriter:
    """Streams the kept and rejected records of one shard into two Parquet files.

    Rows are flushed in row groups (bounded memory, whatever the shard size) into temp files that
    are renamed to their final paths only by `close()`; `abort()` (or an exception inside the
    `with` block) removes them, so a final path never holds a partial shard.
    """

    def __init__(self, output: Path, quarantine: Path, flush_chars: int = 32 << 20):
        self.output, self.quarantine, self.flush_chars = Path(output), Path(quarantine), flush_chars
        self._kept: list[Record] = []
        self._rejected: list[tuple[Record, str, str]] = []
        self._buffered_chars = 0
        self._writers: dict[Path, tuple[Path, pq.ParquetWriter]] = {}

    def keep(self, record: Record) -> None:
        self._kept.append(record)
        self._grow(len(record.text))

    def reject(self, record: Record, reason: str, detail: str = "") -> None:
        self._rejected.append((record, reason, detail))
        self._grow(min(len(record.text), QUARANTINE_TEXT_LIMIT))

    def _grow(self, n: int) -> None:
        self._buffered_chars += n
        if self._buffered_chars >= self.flush_chars:
            self.flush()

    def flush(self) -> None:
        self._write(self.output, _records_table(self._kept))
        self._write(self.quarantine, _quarantine_table(self._rejected))
        self._kept, self._rejected, self._buffered_chars = [], [], 0

    def write_tables(self, kept: pa.Table, rejected: pa.Table) -> None:
        """Append ready-made tables (RECORD_SCHEMA, QUARANTINE_SCHEMA): for a stage that filters
        whole Arrow batches instead of unpacking records."""
        self.flush()
        self._write(self.output, kept)
        self._write(self.quarantine, rejected)

    def _write(self, final: Path, table: pa.Table) -> None:
        if final not in self._writers:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
            self._writers[final] = (tmp, pq.ParquetWriter(tmp, table.schema, compression="zstd"))
        elif not table.num_rows:
            return
        self._writers[final][1].write_table(table)

    def close(self) -> None:
        self.flush()
        for final, (tmp, writer) in self._writers.items():
            writer.close()
            os.replace(tmp, final)
        self._writers.clear()

    def abort(self) -> None:
        for tmp, writer in self._writers.values():
            writer.close()
            tmp.unlink(missing_ok=True)
        self._writers.clear()

    def __enter__(self) -> RecordShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _records_table(records: list[Record]) -> pa.Table:
    return pa.table({"id": [r.id for r in records], "source": [r.source for r in records],
                     "text": [r.text for r in records],
                     "meta": [json.dumps(r.meta, sort_keys=True, ensure_ascii=False) for r in records]},
                    schema=RECORD_SCHEMA)


def _quarantine_table(rejected: list[tuple[Record, str, str]]) -> pa.Table:
    return pa.table({"id": [r.id for r, _, _ in rejected], "source": [r.source for r, _, _ in rejected],
                     "reason": [reason for _, reason, _ in rejected], "detail": [d for _, _, d in rejected],
                     "text": [r.text[:QUARANTINE_TEXT_LIMIT] for r, _, _ in rejected],
                     "meta": [json.dumps(r.meta, sort_keys=True, ensure_ascii=False) for r, _, _ in rejected]},
                    schema=QUARANTINE_SCHEMA)


def write_records(path: Path, records: list[Record]) -> None:
    write_parquet_atomic(path, _records_table(records))


def read_records(path: Path, batch_size: int = 256):
    """Yield `Record`s from a record Parquet shard, one batch in memory at a time."""
    from llmpipe.io import iter_parquet_batches

    for batch in iter_parquet_batches(path, batch_size=batch_size):
        cols = batch.to_pydict()
        for rid, source, text, meta in zip(cols["id"], cols["source"], cols["text"], cols["meta"]):
            yield Record(rid, source, text, json.loads(meta) if meta else {})
