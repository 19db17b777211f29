"""The dedup stage: exact duplicates, then MinHash-LSH near duplicates, across the whole corpus.

    clean's chunks (data/clean/part-*.parquet) ──▶ data/dedup/part-XXXXX.parquet (one per input shard)
                          data/dedup/quarantine/part-XXXXX.parquet (exact_duplicate, near_duplicate)
                          data/dedup/clusters.parquet, data/dedup/report.md (+ plots)
                          data/dedup/sketches/part-XXXXX.npz (phase 1 work, kept for resume)

Phase 1, per shard in parallel (resumable): sketch every record (`llmpipe.data.duplicates`: its exact
  hash and MinHash signature, with its id, source, length and meta hash) into `sketches/part-XXXXX.npz`
  + a completion marker whose fingerprint is the signature params + the stage's code fingerprint + the
  input shard's sha256.
Phase 2, global, in one process: `find_duplicates` over all sketches (exact groups, LSH candidates
  verified at `threshold`, union-find; the one part whose memory grows with the corpus, see
  `llmpipe.data.duplicates`; on a Dask cluster its LSH buckets are spread over the workers by key
  hash); phases 1 and 3 hold one shard per worker.
Phase 3, per shard in parallel (resumable): copy kept records, quarantine dropped ones with
  detail {"kept": id of the kept member, "jaccard": estimated Jaccard to it, "cluster": id}.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from llmpipe.config import StageConfig, params_hash
from llmpipe.data import minhash
from llmpipe.data.accounting import (QUARANTINE_SCHEMA, QUARANTINE_TEXT_LIMIT, RECORD_SCHEMA, AccountingError, Counts,
                                     RecordShardWriter)
from llmpipe.data.duplicates import (SKETCH_FIELDS, Duplicates, clusters_table, find_duplicates, sketch_columns,
                                     utf8_bytes, utf8_text)
from llmpipe.data.report import publish_report
from llmpipe.data.shards import ShardRun, ShardTask, describe_throughput, run_shards, shard_paths, throughput_metrics
from llmpipe.errors import UserError
from llmpipe.io import atomic_path, fingerprint, iter_parquet_batches, sha256_file, write_parquet_atomic

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

EXACT, NEAR = "exact_duplicate", "near_duplicate"
SKETCHES = "sketches"  # phase 1's work, a folder of the stage's output


class DedupConfig(StageConfig):
    """The `dedup` section of params.yaml."""

    shingle_size: int = Field(3, ge=1, le=32, description="words per shingle (word n-grams of the normalized text)")
    num_perm: int = Field(126, ge=2, le=1024, description="MinHash permutations (signature length)")
    bands: int = Field(42, ge=1, description="LSH bands; bands * rows must equal num_perm")
    rows: int = Field(3, ge=1, description="signature slots per LSH band")
    threshold: float = Field(0.45, gt=0, le=1,
                             description="estimated Jaccard at or above which two texts are near duplicates")
    seed: int = Field(0, ge=0, description="seed of the MinHash permutations")
    batch_chars: int = Field(1 << 18, ge=1 << 10, description="characters hashed per numpy batch in phase 1")

    @model_validator(mode="after")
    def _bands_cover_signature(self) -> DedupConfig:
        # A ValueError in a validator: load_section makes it a ConfigError naming the key.
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"bands * rows must equal num_perm, got {self.bands} * {self.rows} = "
                             f"{self.bands * self.rows} != {self.num_perm}; e.g. num_perm {self.bands * self.rows}, "
                             f"or rows {self.num_perm // self.bands} with bands dividing num_perm")
        return self

    def hasher(self) -> minhash.MinHasher:
        return minhash.MinHasher(num_perm=self.num_perm, shingle_size=self.shingle_size, seed=self.seed)


# -- phase 1: sketch each shard ------------------------------------------------------------------

def _text_bytes(batch: pa.RecordBatch) -> int:
    """The UTF-8 bytes of a batch's texts: the stage's input bytes (see `llmpipe.data.shards`)."""
    return pc.sum(pc.binary_length(batch.column("text").cast(pa.binary()))).as_py() or 0


def _read_columns(path: Path, stats: Counter, rows: int = 512):
    for batch in iter_parquet_batches(path, batch_size=rows, columns=list(RECORD_SCHEMA.names)):
        stats["input_bytes"] += _text_bytes(batch)
        yield tuple(batch.column(name).to_pylist() for name in RECORD_SCHEMA.names)


def _sketch_shard(task: ShardTask, hasher: minhash.MinHasher, batch_chars: int) -> Counts:
    (source_path,) = task.inputs
    counts = Counts()  # phase 1 drops nothing (phase 3 does the accounting); it only measures
    arrays = sketch_columns(_read_columns(source_path, counts.stats), hasher, batch_chars, shard=task.index)
    with atomic_path(task.output) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    counts.stats["records"] = len(arrays["ids"])
    return counts


def load_sketches(paths: list[Path], sizes: list[int]) -> dict[str, np.ndarray]:
    """Shard sketches concatenated in shard order, filled into preallocated arrays (no 2x peak)."""
    total, offsets = sum(sizes), np.cumsum([0, *sizes])
    widths: dict[str, int] = {}  # ids and sources are fixed-width bytes: the widest shard decides
    for path in paths:
        with np.load(path) as npz:
            for name in ("ids", "sources"):
                widths[name] = max(widths.get(name, 1), npz[name].dtype.itemsize)
    out: dict[str, np.ndarray] = {}
    for shard, path in enumerate(paths):
        with np.load(path) as npz:
            for name in SKETCH_FIELDS:
                part = npz[name]
                if len(part) != sizes[shard]:
                    raise UserError(f"{path}: {len(part)} records, its completion marker says {sizes[shard]}: the "
                                    f"sketch changed after it was written; delete {path.parent} and rerun dedup")
                if name not in out:
                    dtype = f"S{widths[name]}" if name in widths else part.dtype
                    out[name] = np.empty((total, *part.shape[1:]), dtype=dtype)
                out[name][offsets[shard]:offsets[shard + 1]] = part
    return out


# -- phase 3: write kept records and quarantine ---------------------------------------------------

def _write_shard(task: ShardTask) -> Counts:
    """Filter the input shard batch by batch in Arrow (records are never unpacked into Python objects)."""
    source_path, expected_ids, drops = task.inputs  # drops: row -> (reason, detail)
    counts = Counts()
    row = 0
    with RecordShardWriter(task.output, task.quarantine) as writer:
        for batch in iter_parquet_batches(source_path, batch_size=4096, columns=list(RECORD_SCHEMA.names)):
            n = batch.num_rows
            counts.stats["input_bytes"] += _text_bytes(batch)
            ids = np.array([utf8_bytes(i) for i in batch.column("id").to_pylist()], dtype="S")
            if not np.array_equal(ids, expected_ids[row:row + n]):
                raise _changed_while_running(source_path, f"rows {row}-{row + n - 1} are not the records sketched")
            verdicts = [drops.get(r) for r in range(row, row + n)]
            lengths = pc.utf8_length(batch.column("text")).to_pylist()
            for source, length, verdict in zip(batch.column("source").to_pylist(), lengths, verdicts):
                counts.on_read(source, length)
                if verdict:
                    counts.on_rejected(source, verdict[0], length)
                else:
                    counts.on_kept(source, length)
            mask = pa.array([v is not None for v in verdicts])
            rejected, reasons = batch.filter(mask), [v for v in verdicts if v]
            quarantine = pa.Table.from_pydict({"id": rejected.column("id"), "source": rejected.column("source"),
                                   "reason": pa.array([r for r, _ in reasons], pa.string()),
                                   "detail": pa.array([d for _, d in reasons], pa.string()),
                                   "text": pc.utf8_slice_codeunits(rejected.column("text"), 0, QUARANTINE_TEXT_LIMIT),
                                   "meta": rejected.column("meta")}, schema=QUARANTINE_SCHEMA)
            kept = pa.Table.from_arrays(batch.filter(pc.invert(mask)).columns, schema=RECORD_SCHEMA)
            writer.write_tables(kept, quarantine)
            row += n
    if row != len(expected_ids):
        raise _changed_while_running(source_path, f"{row} rows, {len(expected_ids)} were sketched")
    return counts


def _changed_while_running(path: Path, what: str) -> UserError:
    return UserError(f"{path} changed while dedup ran ({what} at the start of this run): leave {path.parent} "
                     f"alone while dedup runs (is another run of the clean stage writing it?), then rerun dedup")


def _drops_by_shard(sk: dict[str, np.ndarray], dup: Duplicates, n_shards: int) -> list[dict[int, tuple[str, str]]]:
    """shard -> row -> (reason, detail JSON naming the kept record, the estimated Jaccard and the cluster)."""
    drops: list[dict[int, tuple[str, str]]] = [{} for _ in range(n_shards)]
    for i in np.flatnonzero(dup.dropped).tolist():
        detail = json.dumps({"kept": utf8_text(sk["ids"][dup.kept[i]]), "jaccard": round(float(dup.jaccard[i]), 4),
                             "cluster": int(dup.cluster[i])})
        drops[int(sk["shard"][i])][int(sk["row"][i])] = (EXACT if dup.exact[i] else NEAR, detail)
    return drops


# -- the stage ------------------------------------------------------------------------------------

def run(cfg: DedupConfig, ctx: StageContext) -> dict[str, float]:
    in_dir, out_dir = ctx.input("clean"), ctx.output("dedup")
    inputs = sorted(in_dir.glob("part-*.parquet"))
    if not inputs:
        raise UserError(f"no input shards {in_dir}/part-*.parquet: run the clean stage first "
                        "(llmpipe stage clean, or dvc repro clean)")
    input_hashes = [sha256_file(p) for p in inputs]
    code = ctx.code_fingerprint  # DVC reruns dedup when its code changes: then no sketch or shard counts as done

    sketched = _sketch_all(cfg, ctx, inputs, input_hashes, code)
    sizes = [int(counts.stats["records"]) for counts in sketched.shard_counts]
    sk = load_sketches([_sketch_path(out_dir, i) for i in range(len(inputs))], sizes)
    dup = find_duplicates(sk, cfg, ctx.log)
    clusters = clusters_table(sk, dup)
    write_parquet_atomic(out_dir / "clusters.parquet", clusters)
    written = _write_all(cfg, ctx, inputs, input_hashes, code, sk, dup, sizes)

    n_exact, n_near = _check_reasons(written.counts, dup)
    metrics = {**written.counts.metrics(), **throughput_metrics(written, preparatory=[sketched]),
               "clusters": float(clusters.num_rows), "exact_duplicates": float(n_exact),
               "near_duplicates": float(n_near), "candidate_pairs": float(dup.candidate_pairs),
               "verified_pairs": float(dup.verified_pairs), "sketches_resumed": float(sketched.resumed)}
    publish_report(ctx, written.counts, out_dir, extra=_report_section(cfg, sk, dup, clusters),
                   also=[out_dir / "clusters.parquet"])
    ctx.log.info("dedup: %d records -> %d kept, %d exact and %d near duplicates in %d clusters; %s", len(sk["ids"]),
                 metrics["records_kept"], n_exact, n_near, clusters.num_rows, describe_throughput(metrics))
    return metrics


def _sketch_path(out_dir: Path, index: int) -> Path:
    return out_dir / SKETCHES / f"part-{index:05d}.npz"


def _sketch_all(cfg: DedupConfig, ctx: StageContext, inputs: list[Path], input_hashes: list[str],
                code: str) -> ShardRun:
    """Phase 1. A sketch is not a record shard: one file per task, no quarantine."""
    out_dir = ctx.output("dedup")
    params = {"code": code, "num_perm": cfg.num_perm, "shingle_size": cfg.shingle_size, "seed": cfg.seed}
    tasks = [ShardTask(i, (path,), _sketch_path(out_dir, i), None, fingerprint({**params, "input": digest, "shard": i}))
             for i, (path, digest) in enumerate(zip(inputs, input_hashes))]
    sketch = functools.partial(_sketch_shard, hasher=cfg.hasher(), batch_chars=cfg.batch_chars)
    return run_shards(tasks, sketch, out_dir=out_dir / SKETCHES, suffix=".npz", workers=ctx.workers,
                      stage="dedup: sketch")


def _write_all(cfg: DedupConfig, ctx: StageContext, inputs: list[Path], input_hashes: list[str], code: str,
               sk: dict[str, np.ndarray], dup: Duplicates, sizes: list[int]) -> ShardRun:
    """Phase 3: every output shard depends on every input (a duplicate may sit in any shard)."""
    out_dir = ctx.output("dedup")
    drops = _drops_by_shard(sk, dup, len(inputs))
    shared = {"params": params_hash(cfg), "inputs": input_hashes, "code": code}
    offsets = np.cumsum([0, *sizes])
    tasks = []
    for i, path in enumerate(inputs):
        ids = sk["ids"][offsets[i]:offsets[i + 1]]  # to check that the input did not change since phase 1
        tasks.append(ShardTask(i, (path, ids, drops[i]), *shard_paths(out_dir, i),
                               fingerprint({**shared, "shard": i})))
    return run_shards(tasks, _write_shard, out_dir=out_dir, workers=ctx.workers, stage="dedup: write")


def _check_reasons(counts: Counts, dup: Duplicates) -> tuple[int, int]:
    """(exact, near) duplicates phase 2 found, which must be what the shards quarantined."""
    n_exact, n_near = int(dup.exact.sum()), int((dup.dropped & ~dup.exact).sum())
    if (counts.reasons()[EXACT], counts.reasons()[NEAR]) != (n_exact, n_near):
        raise AccountingError(f"dedup: the shards quarantined {counts.reasons()[EXACT]} exact and "
                              f"{counts.reasons()[NEAR]} near duplicates, phase 2 found {n_exact} and {n_near} "
                              f"(a bug in llmpipe, please report it)")
    return n_exact, n_near


def _report_section(cfg: DedupConfig, sk: dict[str, np.ndarray], dup: Duplicates, clusters: pa.Table) -> str:
    n = len(sk["ids"])
    sig_mb = sk["sig"].nbytes / 1e6
    near = dup.dropped & ~dup.exact
    lines = ["## Deduplication", "",
             f"Settings: word {cfg.shingle_size}-gram shingles, {cfg.num_perm} permutations, "
             f"{cfg.bands} bands × {cfg.rows} rows, Jaccard threshold {cfg.threshold}. "
             f"Kept member: longest text, then smallest id.", "",
             f"- records: {n:,}; exact duplicates dropped: {int(dup.exact.sum()):,}; "
             f"near duplicates dropped: {int(near.sum()):,}; clusters: {clusters.num_rows:,}",
             f"- LSH candidate pairs: {dup.candidate_pairs:,}; verified at the threshold: {dup.verified_pairs:,}",
             f"- global index memory (the only part that grows with the corpus): signatures "
             f"{sig_mb:,.1f} MB ({cfg.num_perm * 4} bytes per record) plus one band's keys and candidates"]
    if near.any():
        q = np.quantile(dup.jaccard[near], [0, 0.5, 1])
        lines.append(f"- estimated Jaccard of near duplicates to their kept member: min {q[0]:.2f}, "
                     f"median {q[1]:.2f}, max {q[2]:.2f}")
    if clusters.num_rows:
        cross = sum(len(s) > 1 for s in clusters.column("sources").to_pylist())
        lines += [f"- clusters spanning more than one source: {cross:,}", "",
                  "Largest clusters (all in `clusters.parquet`):", "",
                  "| cluster | size | exact | near | kept id | sources |", "|---:|---:|---:|---:|---|---|"]
        top = clusters.sort_by([("size", "descending"), ("cluster", "ascending")]).slice(0, 10).to_pylist()
        lines += [f"| {c['cluster']} | {c['size']} | {c['exact_duplicates']} | {c['near_duplicates']} | "
                  f"`{c['kept_id']}` | {', '.join(c['sources'])} |" for c in top]
    return "\n".join(lines)
