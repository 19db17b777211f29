"""Finding duplicates across the corpus: per-record sketches, then the global exact + LSH step.

The dedup stage (`llmpipe.data.dedup`) sketches each input shard in parallel with `sketch_columns`:
for every record its exact hash (128-bit xxh3 of `minhash.dedup_key_text`), MinHash signature, id,
source, length, meta hash and (shard, row) position. `find_duplicates` then takes all sketches at
once: it groups equal exact hashes; bands the signatures of one record per exact group (LSH: `bands`
× `rows` slots per band, bucket by sorting the band hashes), verifies each candidate pair's estimated
Jaccard against `threshold`, and joins verified pairs with union-find.

With `LLMPIPE_DASK_SCHEDULER` set, the banding and verification run on the Dask cluster
(`lsh_edges_on_dask`): every band's buckets are partitioned by a hash of their key, one partition per
worker thread, so a bucket is never split across workers and the verified pairs are exactly those of
the local band loop (tests/data/test_dask.py compares them); grouping and union-find stay here.

Memory: O(records × num_perm) — each record holds 4 × num_perm bytes of signature (126 perms: 504
bytes) plus ~100 bytes of id, hashes and position, ~0.6 GB per million 4000-character chunks (4 GB of
text) — plus one band's keys and candidate pairs at a time. This index is the only part of the stage
whose memory grows with the corpus.

The kept member of each cluster is the longest text (characters), ties broken by the smallest id,
then source, then a hash of meta, then input position (only for fully identical records): it
depends on the records alone, never on shard order or the number of workers.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import xxhash

from llmpipe import env
from llmpipe.data import minhash
from llmpipe.data.accounting import Record

if TYPE_CHECKING:
    from llmpipe.data.dedup import DedupConfig

# -- sketches -------------------------------------------------------------------------------------

SKETCH_FIELDS = ("ids", "sources", "lengths", "meta_hash", "exact", "sig", "nonempty", "shard", "row")


def sketch_columns(batches, hasher: minhash.MinHasher, batch_chars: int = 1 << 18,
                   shard: int = 0) -> dict[str, np.ndarray]:
    """Everything `find_duplicates` needs about some records, from (ids, sources, texts, metas) column batches
    (metas: the JSON strings of the record schema): exact hashes, signatures, ranking keys and
    (shard, row) positions. Ids and sources are kept as UTF-8 bytes (numpy "S": 1 byte a character)."""
    ids, sources, lengths, meta_hash, parts = [], [], [], [], []
    pending: list[str] = []
    size = 0
    for batch_ids, batch_sources, texts, metas in batches:
        ids += [utf8_bytes(i) for i in batch_ids]
        sources += [utf8_bytes(s) for s in batch_sources]
        lengths += map(len, texts)
        meta_hash += [xxhash.xxh3_64_intdigest(utf8_bytes(m or "")) for m in metas]
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


def utf8_bytes(text: str) -> bytes:
    """How sketches hold ids and sources (surrogatepass: any str a record holds round-trips)."""
    return text.encode("utf-8", "surrogatepass")


def utf8_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


# -- the global step -----------------------------------------------------------------------------

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
    """Exact groups, then LSH candidates verified at `cfg.threshold`, joined by union-find."""
    n = len(sk["ids"])
    everyone = np.arange(n)
    rank = rank_records(sk)
    exact_rep = _best_of_groups(sk["exact"], rank)  # the best record with the same normalized text

    # Near duplicates among exact-group representatives that have shingles.
    reps = np.flatnonzero((exact_rep == everyone) & sk["nonempty"])
    edges, n_candidates = lsh_edges(sk["sig"], reps, rank[reps], cfg)  # (E, 2) global indices
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


def lsh_edges(sig: np.ndarray, reps: np.ndarray, rank_reps: np.ndarray,
              cfg: DedupConfig) -> tuple[np.ndarray, int]:
    """(verified pairs (E, 2) unique, candidate pairs summed over bands) among the records `reps`: in this
    process, or with `LLMPIPE_DASK_SCHEDULER` set on that Dask cluster (`lsh_edges_on_dask`)."""
    address = env.dask_scheduler()
    if address:
        return lsh_edges_on_dask(address, sig, reps, rank_reps, cfg)
    return partition_edges(sig, reps, rank_reps, cfg.bands, cfg.rows, cfg.threshold)


def partition_edges(sig: np.ndarray, reps: np.ndarray, rank_reps: np.ndarray, bands: int, rows: int,
                    threshold: float, part: int = 0, parts: int = 1) -> tuple[np.ndarray, int]:
    """`lsh_edges` of the LSH buckets whose key hashes to partition `part` of `parts`, one band at a time.

    A bucket is the set of records with one band key, so partitioning by key never splits a bucket:
    each bucket's pairs come out whole in exactly one partition, the same pairs as with one partition
    (bucket_pairs orders a bucket by `rank_reps`, which does not depend on who else is in the call).
    So the union over the partitions is the band loop's result, candidates summed alike.
    """
    edges, n_candidates = [np.zeros((0, 2), dtype=np.int64)], 0
    for band in range(bands):
        keys = minhash.band_key(sig, band, rows, subset=reps)
        mine = np.flatnonzero(keys % np.uint64(parts) == part)  # ascending, so pairs stay (i < j)
        # rank: big buckets pair up by content
        pairs = reps[mine[minhash.bucket_pairs(keys[mine], tiebreak=rank_reps[mine])]]
        n_candidates += len(pairs)
        edges.append(minhash.verified_pairs(sig, pairs, threshold)[0])
    return np.unique(np.concatenate(edges), axis=0), n_candidates


def lsh_edges_on_dask(address: str, sig: np.ndarray, reps: np.ndarray, rank_reps: np.ndarray,
                      cfg: DedupConfig) -> tuple[np.ndarray, int]:
    """`lsh_edges` as one `partition_edges` task per worker thread of the cluster at `address`.

    The signatures go to every worker once (scattered); each worker then holds them all, as this process
    does: Dask spreads the CPU of banding, sorting and verifying, not the signatures' memory.
    """
    from llmpipe.data.shards import dask_client

    with dask_client(address) as client:
        parts = max(1, sum(client.nthreads().values()))
        data = client.scatter([sig, reps, rank_reps], broadcast=True, hash=False)
        futures = [client.submit(partition_edges, *data, cfg.bands, cfg.rows, cfg.threshold, part, parts,
                                 pure=False, key=f"dedup: LSH partition {part} of {parts}-{uuid.uuid4().hex}")
                   for part in range(parts)]
        results = client.gather(futures)
    edges = np.unique(np.concatenate([e for e, _ in results]), axis=0)
    return edges, sum(n for _, n in results)


def clusters_table(sk: dict[str, np.ndarray], dup: Duplicates) -> pa.Table:
    """One row per cluster: kept id, members (kept first, then by keep preference), their sources and
    estimated Jaccard to the kept member, and how many were exact / near duplicates."""
    rank = rank_records(sk)
    members = np.flatnonzero(dup.cluster >= 0)
    members = members[np.lexsort((rank[members], dup.cluster[members]))]
    rows: dict[str, list] = {name: [] for name in CLUSTER_SCHEMA.names}
    for group in np.split(members, np.flatnonzero(np.diff(dup.cluster[members])) + 1) if len(members) else []:
        ids = [utf8_text(i) for i in sk["ids"][group].tolist()]
        sources = [utf8_text(s) for s in sk["sources"][group].tolist()]
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
