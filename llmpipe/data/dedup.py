"""The dedup stage: exact duplicates, then MinHash-LSH near duplicates, across the whole corpus.

    data/clean/part-*.parquet ──▶ data/dedup/part-XXXXX.parquet (one per input shard)
                                  data/dedup/quarantine/part-XXXXX.parquet (exact_duplicate, near_duplicate)
                                  data/dedup/clusters.parquet, data/dedup/report.md (+ plots)
                                  data/dedup/sketches/part-XXXXX.npz (phase 1 work, kept for resume)

Phase 1, per shard in parallel (resumable): normalize every record (see `llmpipe.data.minhash`),
  hash it (128-bit xxh3 of the normalized text) and compute its MinHash signature; save them with
  the record's id, source, length and meta hash as `sketches/part-XXXXX.npz` + a completion marker
  whose fingerprint is the signature params + the stage's code fingerprint + the input shard's sha256.
Phase 2, global, in one process: group equal exact hashes; band the signatures of one record per
  exact group (LSH: `bands` × `rows` slots per band, bucket by sorting the band hashes), verify each
  candidate pair's estimated Jaccard against `threshold`, and join verified pairs with union-find.
  Memory: O(records × num_perm) — each record holds 4 × num_perm bytes of signature (126 perms:
  504 bytes) plus ~100 bytes of id, hashes and position, ~0.6 GB per million 4000-character chunks
  (4 GB of text) — plus one band's keys and candidate pairs at a time. This index is the only part
  of the stage whose memory grows with the corpus; phases 1 and 3 hold one shard per worker.
Phase 3, per shard in parallel (resumable): copy kept records, quarantine dropped ones with
  detail {"kept": id of the kept member, "jaccard": estimated Jaccard to it, "cluster": id}.

The kept member of each cluster is the longest text (characters), ties broken by the smallest id,
then source, then a hash of meta, then input position (only for fully identical records): it
depends on the records alone, never on shard order or the number of workers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import Field, model_validator

from llmpipe.config import StageConfig, params_hash
from llmpipe.data import minhash
from llmpipe.data.accounting import (QUARANTINE_SCHEMA, QUARANTINE_TEXT_LIMIT, RECORD_SCHEMA, AccountingError, Counts,
                                     Record, RecordShardWriter)
from llmpipe.data.report import write_report
from llmpipe.data.shards import ShardTask, prune_stale, run_shards, shard_paths
from llmpipe.errors import UserError
from llmpipe.io import (atomic_path, clean_stale_temps, done_info, iter_parquet_batches, marker_path, sha256_file,
                        write_parquet_atomic)

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

INPUT_DIR, OUTPUT_DIR = "data/clean", "data/dedup"
EXACT, NEAR = "exact_duplicate", "near_duplicate"


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


# -- phase 1: sketches ----------------------------------------------------------------------------

SKETCH_FIELDS = ("ids", "sources", "lengths", "meta_hash", "exact", "sig", "nonempty", "shard", "row")


def sketch_columns(batches, hasher: minhash.MinHasher, batch_chars: int = 1 << 18,
                   shard: int = 0) -> dict[str, np.ndarray]:
    """Everything phase 2 needs about some records, from (ids, sources, texts, metas) column batches
    (metas: the JSON strings of the record schema): exact hashes, signatures, ranking keys and
    (shard, row) positions. Ids and sources are kept as UTF-8 bytes (numpy "S": 1 byte a character)."""
    ids, sources, lengths, meta_hash, parts = [], [], [], [], []
    pending: list[str] = []
    size = 0
    for batch_ids, batch_sources, texts, metas in batches:
        ids += [_utf8(i) for i in batch_ids]
        sources += [_utf8(s) for s in batch_sources]
        lengths += map(len, texts)
        meta_hash += [xxhash.xxh3_64_intdigest(_utf8(m or "")) for m in metas]
        for text in texts:  # hash in batches of ~batch_chars: big enough for numpy, small enough for the cache
            pending.append(text)
            size += len(text)
            if size >= batch_chars:
                parts.append(hasher.sketch(pending))
                pending, size = [], 0
    if pending or not parts:
        parts.append(hasher.sketch(pending))
    exact, nonempty, sig = (np.concatenate(column) for column in zip(*parts))
    return {"ids": np.array(ids, dtype="S"), "sources": np.array(sources, dtype="S"),
            "lengths": np.array(lengths, dtype=np.int64), "meta_hash": np.array(meta_hash, dtype=np.uint64),
            "exact": exact.reshape(-1, 2), "sig": sig.reshape(-1, hasher.num_perm), "nonempty": nonempty,
            "shard": np.full(len(ids), shard, dtype=np.int64), "row": np.arange(len(ids), dtype=np.int64)}


def sketch_records(records: list[Record], hasher: minhash.MinHasher,
                   batch_chars: int = 1 << 18) -> dict[str, np.ndarray]:
    """`sketch_columns` of in-memory records (as if they were one shard)."""
    metas = [json.dumps(r.meta, sort_keys=True, ensure_ascii=False) for r in records]  # as RecordShardWriter stores them
    columns = ([r.id for r in records], [r.source for r in records], [r.text for r in records], metas)
    return sketch_columns([columns], hasher, batch_chars)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def _read_columns(path: Path, stats: Counter, rows: int = 512):
    for batch in iter_parquet_batches(path, batch_size=rows, columns=list(RECORD_SCHEMA.names)):
        stats["input_bytes"] += pc.sum(pc.binary_length(batch.column("text").cast(pa.binary()))).as_py() or 0
        yield tuple(batch.column(name).to_pylist() for name in RECORD_SCHEMA.names)


def _sketch_shard(task: ShardTask, hasher: minhash.MinHasher, batch_chars: int) -> Counts:
    (source_path,) = task.inputs
    start = time.perf_counter()
    counts = Counts()  # phase 1 drops nothing (phase 3 does the accounting); it only measures
    arrays = sketch_columns(_read_columns(source_path, counts.stats), hasher, batch_chars, shard=task.index)
    with atomic_path(task.output) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    counts.stats.update(records=len(arrays["ids"]), sketch_seconds=time.perf_counter() - start)
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


# -- phase 2: global duplicate finding ------------------------------------------------------------

@dataclass
class Duplicates:
    """Per record (aligned with the sketches): which record it yields to, why, and its cluster."""

    kept: np.ndarray  # (N,) int64: index of the record kept in its place (itself when kept)
    exact: np.ndarray  # (N,) bool: dropped as an exact duplicate of `kept`
    jaccard: np.ndarray  # (N,) float: estimated Jaccard to `kept` (1.0 for exact duplicates and kept records)
    cluster: np.ndarray  # (N,) int64: cluster id, -1 for records without duplicates
    candidate_pairs: int = 0  # LSH candidates summed over bands
    verified_pairs: int = 0  # distinct pairs at or above the threshold

    @property
    def dropped(self) -> np.ndarray:
        return self.kept != np.arange(len(self.kept))


def rank_records(sk: dict[str, np.ndarray]) -> np.ndarray:
    """rank[i] = position of record i in keep-preference order (0 = kept first): longest text, then
    smallest id, source and meta hash; then (shard, row) only for records identical in all of those."""
    order = np.lexsort((sk["row"], sk["shard"], sk["meta_hash"], sk["sources"], sk["ids"], -sk["lengths"]))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _best_of_groups(group: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each element, the element of its group (equal `group` labels, 1-D or rows) with the lowest rank."""
    keys = (rank, *(group.T[::-1] if group.ndim > 1 else [group]))
    order = np.lexsort(keys)
    first = minhash.first_of_runs(group[order])
    best = np.empty(len(order), dtype=np.int64)
    best[order] = order[np.flatnonzero(first)[np.cumsum(first) - 1]]
    return best


def find_duplicates(sk: dict[str, np.ndarray], cfg: DedupConfig, log=None) -> Duplicates:
    """Phase 2: exact groups, then LSH candidates verified at `cfg.threshold`, joined by union-find."""
    n = len(sk["ids"])
    everyone = np.arange(n)
    rank = rank_records(sk)
    exact_rep = _best_of_groups(sk["exact"], rank)  # the best record with the same normalized text

    # Near duplicates among exact-group representatives that have shingles, one LSH band at a time.
    reps = np.flatnonzero((exact_rep == everyone) & sk["nonempty"])
    edges, n_candidates = [np.zeros((0, 2), dtype=np.int64)], 0
    for band in range(cfg.bands):
        keys = minhash.band_key(sk["sig"], band, cfg.rows, subset=reps)
        pairs = reps[minhash.bucket_pairs(keys, tiebreak=rank[reps])]  # rank: big buckets pair up by content
        n_candidates += len(pairs)
        edges.append(minhash.verified_pairs(sk["sig"], pairs, cfg.threshold)[0])
    edges = np.unique(np.concatenate(edges), axis=0)  # (E, 2) global indices
    position = np.full(n, -1)
    position[reps] = np.arange(len(reps))
    component = minhash.connected_components(len(reps), position[edges])  # (R,)
    near_rep = everyone.copy()
    near_rep[reps] = reps[_best_of_groups(component, rank[reps])]

    kept = near_rep[exact_rep]
    dropped = kept != everyone
    exact = dropped & (sk["exact"] == sk["exact"][kept]).all(axis=1)
    near = np.flatnonzero(dropped & ~exact)
    jaccard = np.ones(n)
    jaccard[near] = minhash.estimated_jaccard(sk["sig"][near], sk["sig"][kept[near]])
    # Cluster ids: kept records with at least one duplicate, numbered in the order of their ids.
    heads = np.unique(kept[dropped])
    heads = heads[np.argsort(sk["ids"][heads], kind="stable")]
    cluster_of = np.full(n, -1, dtype=np.int64)
    cluster_of[heads] = np.arange(len(heads))
    if log:
        log.info("dedup: %d records, %d distinct normalized texts, %d LSH candidate pairs, %d verified, %d clusters",
                 n, int((exact_rep == everyone).sum()), n_candidates, len(edges), len(heads))
    return Duplicates(kept=kept, exact=exact, jaccard=jaccard, cluster=cluster_of[kept],
                      candidate_pairs=n_candidates, verified_pairs=len(edges))


def clusters_table(sk: dict[str, np.ndarray], dup: Duplicates) -> pa.Table:
    """One row per cluster: kept id, members (kept first, then by keep preference), their sources and
    estimated Jaccard to the kept member, and how many were exact / near duplicates."""
    rank = rank_records(sk)
    members = np.flatnonzero(dup.cluster >= 0)
    members = members[np.lexsort((rank[members], dup.cluster[members]))]
    rows: dict[str, list] = {name: [] for name in CLUSTER_SCHEMA.names}
    for group in np.split(members, np.flatnonzero(np.diff(dup.cluster[members])) + 1) if len(members) else []:
        ids, sources = [_text(i) for i in sk["ids"][group].tolist()], [_text(s) for s in sk["sources"][group].tolist()]
        rows["cluster"].append(int(dup.cluster[group[0]]))
        rows["kept_id"].append(ids[0])
        rows["size"].append(len(group))
        rows["exact_duplicates"].append(int(dup.exact[group[1:]].sum()))
        rows["near_duplicates"].append(len(group) - 1 - rows["exact_duplicates"][-1])
        rows["sources"].append(sorted(set(sources)))
        rows["member_ids"].append(ids)
        rows["member_sources"].append(sources)
        rows["member_jaccard"].append([round(j, 4) for j in dup.jaccard[group].tolist()])
    return pa.Table.from_pydict(rows, schema=CLUSTER_SCHEMA)  # (pa.table would import pandas)


CLUSTER_SCHEMA = pa.schema([("cluster", pa.int64()), ("kept_id", pa.string()), ("size", pa.int64()),
                            ("exact_duplicates", pa.int64()), ("near_duplicates", pa.int64()),
                            ("sources", pa.list_(pa.string())), ("member_ids", pa.list_(pa.string())),
                            ("member_sources", pa.list_(pa.string())), ("member_jaccard", pa.list_(pa.float64()))])


# -- phase 3: write kept records and quarantine ---------------------------------------------------

def _write_shard(task: ShardTask) -> Counts:
    """Filter the input shard batch by batch in Arrow (records are never unpacked into Python objects)."""
    source_path, expected_ids, drops = task.inputs  # drops: row -> (reason, detail)
    counts = Counts()
    row = 0
    with RecordShardWriter(task.output, task.quarantine) as writer:
        for batch in iter_parquet_batches(source_path, batch_size=4096, columns=list(RECORD_SCHEMA.names)):
            n = batch.num_rows
            ids = np.array([_utf8(i) for i in batch.column("id").to_pylist()], dtype="S")
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
    return UserError(f"{path} changed while dedup ran ({what} at the start of this run): leave {INPUT_DIR} "
                     f"alone while dedup runs (is another run of the clean stage writing it?), then rerun dedup")


def _drops_by_shard(sk: dict[str, np.ndarray], dup: Duplicates, n_shards: int) -> list[dict[int, tuple[str, str]]]:
    """shard -> row -> (reason, detail JSON naming the kept record, the estimated Jaccard and the cluster)."""
    drops: list[dict[int, tuple[str, str]]] = [{} for _ in range(n_shards)]
    for i in np.flatnonzero(dup.dropped).tolist():
        detail = json.dumps({"kept": _text(sk["ids"][dup.kept[i]]), "jaccard": round(float(dup.jaccard[i]), 4),
                             "cluster": int(dup.cluster[i])})
        drops[int(sk["shard"][i])][int(sk["row"][i])] = (EXACT if dup.exact[i] else NEAR, detail)
    return drops


# -- the stage ------------------------------------------------------------------------------------

def _fingerprint(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _prune_sketches(sketch_dir: Path, wanted: set[str]) -> None:
    clean_stale_temps(sketch_dir)
    for part in sketch_dir.glob("part-*.npz"):
        if part.name not in wanted:
            part.unlink()
            marker_path(part).unlink(missing_ok=True)


def run(cfg: DedupConfig, ctx: StageContext) -> dict[str, float]:
    start = time.perf_counter()
    inputs = sorted(ctx.path(INPUT_DIR).glob("part-*.parquet"))
    if not inputs:
        raise UserError(f"no input shards {INPUT_DIR}/part-*.parquet under {ctx.root}: run the clean stage first "
                         "(llmpipe stage clean, or dvc repro clean)")
    out_dir, sketch_dir = ctx.path(OUTPUT_DIR), ctx.path(OUTPUT_DIR) / "sketches"
    input_hashes = [sha256_file(p) for p in inputs]
    hasher = cfg.hasher()
    code = ctx.code_fingerprint  # DVC reruns dedup when its code changes: then no sketch or shard counts as done
    sketch_params = {"code": code, "num_perm": cfg.num_perm, "shingle_size": cfg.shingle_size, "seed": cfg.seed}

    # Phase 1. A sketch task writes one file, so it is both the task's output and its "quarantine".
    sketch_tasks = []
    for i, (path, digest) in enumerate(zip(inputs, input_hashes)):
        sketch = sketch_dir / f"part-{i:05d}.npz"
        fingerprint = _fingerprint({**sketch_params, "input": digest, "shard": i})
        sketch_tasks.append(ShardTask(i, (path,), sketch, sketch, fingerprint, records=False))
    _prune_sketches(sketch_dir, {t.output.name for t in sketch_tasks})
    sketched = run_shards(sketch_tasks, functools.partial(_sketch_shard, hasher=hasher, batch_chars=cfg.batch_chars),
                          workers=ctx.workers, stage="dedup: sketch")

    # Phase 2.
    sizes = [int(done_info(t.output)["counts"]["stats"]["records"]) for t in sketch_tasks]
    sk = load_sketches([t.output for t in sketch_tasks], sizes)
    dup = find_duplicates(sk, cfg, ctx.log)
    drops = _drops_by_shard(sk, dup, len(inputs))
    clusters = clusters_table(sk, dup)
    write_parquet_atomic(out_dir / "clusters.parquet", clusters)

    # Phase 3: every output shard depends on every input (a duplicate may sit in any shard).
    global_fp = {"params": params_hash(cfg), "inputs": input_hashes, "code": code}
    write_tasks = []
    for i, path in enumerate(inputs):
        output, quarantine = shard_paths(out_dir, i)
        ids = sk["ids"][sum(sizes[:i]):sum(sizes[:i + 1])]  # to check that the input did not change since phase 1
        fingerprint = _fingerprint({**global_fp, "shard": i})
        write_tasks.append(ShardTask(i, (path, ids, drops[i]), output, quarantine, fingerprint))
    prune_stale(out_dir, write_tasks)
    counts = run_shards(write_tasks, _write_shard, workers=ctx.workers, stage="dedup: write")
    counts.check("dedup")
    elapsed = time.perf_counter() - start

    n_exact, n_near = int(dup.exact.sum()), int((dup.dropped & ~dup.exact).sum())
    if (counts.reasons()[EXACT], counts.reasons()[NEAR]) != (n_exact, n_near):
        raise AccountingError(f"dedup: the shards quarantined {counts.reasons()[EXACT]} exact and "
                              f"{counts.reasons()[NEAR]} near duplicates, phase 2 found {n_exact} and {n_near} "
                              f"(a bug in llmpipe, please report it)")
    input_mb = sketched.stats["input_bytes"] / 1e6
    metrics = counts.metrics()
    metrics.update({"clusters": float(clusters.num_rows), "exact_duplicates": float(n_exact),
                    "near_duplicates": float(n_near), "candidate_pairs": float(dup.candidate_pairs),
                    "verified_pairs": float(dup.verified_pairs), "input_mb": input_mb, "mb_per_s": input_mb / elapsed,
                    "sketches_resumed": float(sketched.stats["shards_resumed"]),
                    "sketch_mb_per_s_per_worker": input_mb / max(sketched.stats["sketch_seconds"], 1e-9)})
    report = write_report("dedup", counts, out_dir, extra=_report_section(cfg, sk, dup, clusters, metrics, elapsed))
    for artifact in (report, out_dir / "lengths.png", out_dir / "reject_reasons.png", out_dir / "clusters.parquet"):
        ctx.tracker.log_artifact(artifact, "dedup_report")
    ctx.log.info("dedup: %d records -> %d kept, %d exact and %d near duplicates in %d clusters (%.1f MB at %.1f MB/s)",
                 len(sk["ids"]), metrics["records_kept"], n_exact, n_near, clusters.num_rows, input_mb,
                 metrics["mb_per_s"])
    return metrics


def _report_section(cfg: DedupConfig, sk: dict[str, np.ndarray], dup: Duplicates, clusters: pa.Table,
                    metrics: dict[str, float], elapsed: float) -> str:
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
             f"{sig_mb:,.1f} MB ({cfg.num_perm * 4} bytes per record) plus one band's keys and candidates",
             f"- throughput: {metrics['input_mb']:.1f} MB in {elapsed:.1f} s = {metrics['mb_per_s']:.1f} MB/s "
             f"wall clock "
             f"(this run; sketches reused from an earlier run count as free); sketching "
             f"{metrics['sketch_mb_per_s_per_worker']:.1f} MB/s per worker"]
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
