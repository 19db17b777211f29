"""Shard-by-shard execution for the data stages: parallel, resumable, fingerprinted.

A stage splits its work into `ShardTask`s, each writing one output shard and one quarantine shard.
A task whose completion marker carries the same fingerprint (params + inputs + the stage's code
fingerprint) is skipped on rerun, so a killed run resumes where it stopped and a changed setting
redoes exactly the affected shards, and changed code all of them.
Peak memory is one shard per worker, independent of corpus size.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llmpipe.data.accounting import AccountingError, Counts
from llmpipe.io import clean_stale_temps, done_info, mark_done, marker_path

log = logging.getLogger("llmpipe.data")


@dataclass(frozen=True)
class ShardTask:
    index: int
    inputs: tuple[Any, ...]  # input shard paths, or source descriptors for ingest
    output: Path  # <out>/part-XXXXX.parquet
    quarantine: Path  # <out>/quarantine/part-XXXXX.parquet
    fingerprint: str  # hash of params + inputs + code; a marker with another one is stale
    records: bool = True  # output and quarantine are record shards, checked against the counts (not sketches)


def shard_paths(out_dir: Path, index: int) -> tuple[Path, Path]:
    name = f"part-{index:05d}.parquet"
    return out_dir / name, out_dir / "quarantine" / name


def prune_stale(out_dir: Path, tasks: list[ShardTask]) -> None:
    """Remove shards, markers and temp leftovers that the current task list does not produce."""
    wanted = {t.output.name for t in tasks}
    for directory in (out_dir, out_dir / "quarantine"):
        clean_stale_temps(directory)
        for part in directory.glob("part-*.parquet"):
            if part.name not in wanted:
                part.unlink()
                marker_path(part).unlink(missing_ok=True)


def run_shards(tasks: list[ShardTask], process: Callable[[ShardTask], Counts], *, workers: int, stage: str) -> Counts:
    """Run `process` on every task not already done; return the merged counts of all tasks."""
    total = Counts()
    pending = []
    for task in tasks:
        info = done_info(task.output)
        if info and info.get("fingerprint") == task.fingerprint and task.quarantine.exists():
            total.merge(Counts.from_dict(info["counts"]))
        else:
            pending.append(task)
    if len(pending) < len(tasks):
        log.info("%s: %d of %d shards already done, skipping them", stage, len(tasks) - len(pending), len(tasks))
    # This run's own figures, not summed over markers: what a rerun after a crash or an edit redid.
    total.stats.update(shards=len(tasks), shards_resumed=len(tasks) - len(pending))
    bar = tqdm(total=len(pending), desc=stage, unit="shard", disable=not pending)
    if workers <= 1 or len(pending) <= 1:
        for task in pending:
            total.merge(_run_one(process, stage, task))
            bar.update()
    else:
        # pyarrow imports pandas when it first builds a table; doing it once here saves every forked worker.
        import pandas  # noqa: F401

        with ProcessPoolExecutor(min(workers, len(pending)), mp_context=mp.get_context("fork")) as pool:
            futures = [pool.submit(_run_one, process, stage, task) for task in pending]
            for future in as_completed(futures):
                total.merge(future.result())
                bar.update()
    bar.close()
    total.check(stage)
    return total


def _run_one(process: Callable[[ShardTask], Counts], stage: str, task: ShardTask) -> Counts:
    counts = process(task)
    where = f"{stage} shard {task.output.name}"
    missing = [str(p) for p in dict.fromkeys((task.output, task.quarantine)) if not p.exists()]
    if missing:
        raise AccountingError(f"{where}: {', '.join(missing)} not written (a bug in llmpipe, please report it)")
    # The files, not only the tallies: a record the writer lost is caught before the marker says done.
    counts.check(where, written=_rows(task.output, task.quarantine) if task.records else None)
    mark_done(task.output, {"fingerprint": task.fingerprint, "counts": counts.to_dict()})
    return counts


def _rows(*paths: Path) -> tuple[int, ...]:
    import pyarrow.parquet as pq

    return tuple(pq.read_metadata(path).num_rows for path in paths)
