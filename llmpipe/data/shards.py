"""The one shard runner of the data stages: completion, pruning, resumption and throughput.

A stage splits its work into `ShardTask`s, each writing one output shard (and, for record shards, one
quarantine shard) under one output directory, and hands them to `run_shards`, which
- prunes the shards, markers and temp files of that directory that the task list no longer produces,
- skips a task whose completion marker carries the task's fingerprint (params + inputs + the stage's
  code fingerprint), so a killed run resumes where it stopped, a changed setting redoes exactly the
  affected shards, and changed code all of them,
- runs the others, in a pool of `workers` processes, checks each shard's accounting against its files
  and only then writes its marker,
- and returns a `ShardRun`: the merged counts of every shard (resumed ones from their markers, which
  stages never read themselves) and what this run did.
Peak memory is one shard per worker, independent of corpus size.

Where the shards run: with `LLMPIPE_DASK_SCHEDULER` set (`llmpipe.env.dask_scheduler`, a
`tcp://host:8786` address), on that Dask cluster instead of the local pool; everything else (pruning,
markers, the accounting check of each shard, counts, progress bar, errors) is the same, because the
same `_run_one` wrapper runs on the Dask worker: it checks the shard's files and writes its marker
there. So the Dask workers must see the project directory at the same path as this process (a shared
volume on a cluster; a worker that does not is a UserError naming the directory) and run the same
llmpipe code (the resume fingerprints hash the code here). A UserError or AccountingError raised on a
worker reaches the stage with its type and message. A worker that dies mid-shard is Dask's to retry:
shards are written atomically, so a retried shard has the same bytes.

Throughput, one definition for every data stage (`throughput_metrics`):
    mb_per_s             = input MB newly processed by this run / wall seconds of this run's shard work
    mb_per_s_per_worker  = the same MB / CPU seconds of that shard work, summed over the shards
                           (what one core does; stable when other jobs share the machine)
    input_mb             = input MB of all shards, processed now or resumed
The input MB of a shard is the `input_bytes` its task counts: the bytes of the stage's input behind
it (source file bytes for ingest, characters for a Hugging Face stream; the UTF-8 text of the input
shard for clean and dedup). Newly processed: shards resumed from their markers count neither their
MB nor their time, and a run that resumed every shard reports 0. The shard work is the runner
processing those shards, worker pool start included; a stage with a preparatory pass over the same
input (dedup's sketches) adds that pass's seconds, not its MB (the same bytes again). Excluded:
planning and hashing the inputs, pruning and the marker checks, work between passes (dedup's global
LSH step), the report and its plots, and tracking. On Dask a shard's CPU seconds are its worker
process's, which include another shard's on a worker with several threads.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llmpipe import env
from llmpipe.data.accounting import AccountingError, Counts
from llmpipe.errors import UserError
from llmpipe.io import clean_stale_temps, done_info, mark_done, marker_path

log = logging.getLogger("llmpipe.data")


@dataclass(frozen=True)
class ShardTask:
    index: int
    inputs: tuple[Any, ...]  # input shard paths, or source descriptors for ingest
    output: Path  # <out>/part-XXXXX.parquet
    quarantine: Path | None  # <out>/quarantine/part-XXXXX.parquet; None: not a record shard (a sketch)
    fingerprint: str  # hash of params + inputs + code; a marker with another one is stale


def shard_paths(out_dir: Path, index: int) -> tuple[Path, Path]:
    """(output, quarantine) of record shard `index`."""
    name = f"part-{index:05d}.parquet"
    return out_dir / name, out_dir / "quarantine" / name


@dataclass
class ShardRun:
    """What one `run_shards` call found and did."""

    counts: Counts  # merged over every shard, processed now or resumed
    shard_counts: list[Counts]  # per task, in task order
    resumed: int  # shards taken as done from their markers
    new_input_bytes: int  # `input_bytes` of the shards processed now
    seconds: float  # wall seconds of processing them (0 when none were)
    cpu_seconds: float  # CPU seconds of processing them, summed over shards

    @property
    def shards(self) -> int:
        return len(self.shard_counts)


def run_shards(tasks: list[ShardTask], process: Callable[[ShardTask], Counts], *, out_dir: Path, workers: int,
               stage: str, suffix: str = ".parquet") -> ShardRun:
    """Prune `out_dir` to the shards `tasks` produce, run `process` on every task not already done, and
    return the counts of all of them. `suffix` names the shard files (`part-*<suffix>`)."""
    _prune(out_dir, {t.output.name for t in tasks}, suffix)
    shard_counts = [_done_counts(task) for task in tasks]
    pending = [i for i, counts in enumerate(shard_counts) if counts is None]
    if len(pending) < len(tasks):
        log.info("%s: %d of %d shards already done, skipping them", stage, len(tasks) - len(pending), len(tasks))
    start, cpu = time.perf_counter(), 0.0
    for i, counts, task_cpu in _process(tasks, pending, process, workers, stage, out_dir):
        shard_counts[i] = counts
        cpu += task_cpu
    seconds = time.perf_counter() - start if pending else 0.0
    total = Counts()
    for counts in shard_counts:
        total.merge(counts)
    total.check(stage)
    new_bytes = sum(int(shard_counts[i].stats["input_bytes"]) for i in pending)
    return ShardRun(total, shard_counts, len(tasks) - len(pending), new_bytes, seconds, cpu)


def throughput_metrics(run: ShardRun, preparatory: Sequence[ShardRun] = ()) -> dict[str, float]:
    """The runner's metrics of a stage whose output shards `run` wrote (see the module docstring);
    `preparatory`: earlier passes over the same input, whose time counts and whose MB do not."""
    new_mb = run.new_input_bytes / 1e6
    seconds = run.seconds + sum(p.seconds for p in preparatory)
    cpu = run.cpu_seconds + sum(p.cpu_seconds for p in preparatory)
    return {"shards": float(run.shards), "shards_resumed": float(run.resumed),
            "input_mb": run.counts.stats["input_bytes"] / 1e6,
            "mb_per_s": new_mb / seconds if new_mb and seconds else 0.0,
            "mb_per_s_per_worker": new_mb / cpu if new_mb and cpu else 0.0}


def describe_throughput(metrics: dict[str, float]) -> str:
    """The runner's metrics as a log phrase: "7 shards (2 resumed), 12.4 MB, 9.1 MB/s (11.0 per worker)"."""
    return (f"{metrics['shards']:.0f} shards ({metrics['shards_resumed']:.0f} resumed), {metrics['input_mb']:.1f} MB, "
            f"{metrics['mb_per_s']:.1f} MB/s ({metrics['mb_per_s_per_worker']:.1f} per worker) this run")


def _prune(out_dir: Path, wanted: set[str], suffix: str) -> None:
    """Remove shards, their markers and temp leftovers that the current task list does not produce."""
    for directory in (out_dir, out_dir / "quarantine"):
        clean_stale_temps(directory)
        for part in directory.glob(f"part-*{suffix}"):
            if part.name not in wanted:
                part.unlink()
                marker_path(part).unlink(missing_ok=True)


def _done_counts(task: ShardTask) -> Counts | None:
    """The counts in the task's marker if the shard is complete for this fingerprint, else None."""
    info = done_info(task.output)
    complete = task.quarantine is None or task.quarantine.exists()
    if info and info.get("fingerprint") == task.fingerprint and complete:
        return Counts.from_dict(info["counts"])
    return None


def _process(tasks: list[ShardTask], pending: list[int], process: Callable[[ShardTask], Counts], workers: int,
             stage: str, out_dir: Path) -> Iterator[tuple[int, Counts, float]]:
    """Run the tasks at positions `pending`; yield (position, counts, CPU seconds) as each one finishes."""
    bar = tqdm(total=len(pending), desc=stage, unit="shard", disable=not pending)
    try:
        address = env.dask_scheduler() if pending else None
        if address:
            for done in _process_on_dask(address, tasks, pending, process, stage, out_dir):
                yield done
                bar.update()
            return
        if workers <= 1 or len(pending) <= 1:
            for i in pending:
                yield i, *_run_one(process, stage, tasks[i])
                bar.update()
            return
        # pyarrow imports pandas when it first builds a table; doing it once here saves every forked worker.
        import pandas  # noqa: F401

        with ProcessPoolExecutor(min(workers, len(pending)), mp_context=mp.get_context("fork")) as pool:
            futures = {pool.submit(_run_one, process, stage, tasks[i]): i for i in pending}
            for future in as_completed(futures):
                yield futures[future], *future.result()
                bar.update()
    finally:
        bar.close()


def _process_on_dask(address: str, tasks: list[ShardTask], pending: list[int],
                     process: Callable[[ShardTask], Counts], stage: str,
                     out_dir: Path) -> Iterator[tuple[int, Counts, float]]:
    """`_process` on the Dask cluster at `address`."""
    from distributed import as_completed

    with dask_client(address) as client, _shared_probe(out_dir) as probe:
        # All at once (one message: the scheduler places them together); pure=False: a shard is work on
        # files, never a result to share with another submit of the same task.
        n = len(pending)
        submitted = client.map(_run_on_worker, [process] * n, [stage] * n, [tasks[i] for i in pending], [probe] * n,
                               key=[f"{stage} {tasks[i].output.name}-{uuid.uuid4().hex}" for i in pending], pure=False)
        futures = dict(zip(submitted, pending))
        for future in as_completed(submitted, loop=client.loop):
            yield futures[future], *future.result()  # a worker's exception is raised here, type and message kept
    # A worker killed mid-shard left its temp files; Dask retried the shard elsewhere, so the stage
    # succeeds, and nothing prunes them before the next run: remove them now that no shard is running.
    for directory in (out_dir, out_dir / "quarantine"):
        clean_stale_temps(directory)


CONNECT_TIMEOUT_S = 30  # to reach the scheduler, then again for its first worker


@contextlib.contextmanager
def dask_client(address: str) -> Iterator[Any]:
    """A `distributed.Client` of the scheduler at `address` that has at least one worker, closed afterwards."""
    from distributed import Client

    name = env.DASK_SCHEDULER.name
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except OSError as exc:  # TimeoutError included
        raise UserError(f"{name}={address}: no Dask scheduler answers there ({type(exc).__name__}: {exc}); start "
                        f"one (dask scheduler) with workers that see this project directory (dask worker "
                        f"{address}), or unset {name} to run on local processes") from exc
    with client:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError as exc:
            raise UserError(f"{name}={address}: the scheduler has no workers after {CONNECT_TIMEOUT_S} s; start "
                            f"some that see this project directory (dask worker {address})") from exc
        yield client


@contextlib.contextmanager
def _shared_probe(out_dir: Path) -> Iterator[Path]:
    """A file in `out_dir` for the workers to look for: one that does not see it would write its shards
    and markers to a disk this process never reads. A `.tmp-` name, so a killed run's probe is pruned."""
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = out_dir / f".tmp-dask-probe-{uuid.uuid4().hex}"
    probe.touch()
    try:
        yield probe
    finally:
        probe.unlink(missing_ok=True)


def _run_on_worker(process: Callable[[ShardTask], Counts], stage: str, task: ShardTask,
                   probe: Path) -> tuple[Counts, float]:
    if not probe.exists():
        raise UserError(f"{stage} shard {task.output.name}: the Dask worker on {socket.gethostname()} does not see "
                        f"{probe.parent}: the workers of {env.DASK_SCHEDULER.name} must see the project directory "
                        f"at the same path (a shared volume); mount it there, or unset {env.DASK_SCHEDULER.name} "
                        f"to run on local processes")
    return _run_one(process, stage, task)


def _run_one(process: Callable[[ShardTask], Counts], stage: str, task: ShardTask) -> tuple[Counts, float]:
    start = time.process_time()
    counts = process(task)
    where = f"{stage} shard {task.output.name}"
    missing = [str(p) for p in dict.fromkeys((task.output, task.quarantine)) if p and not p.exists()]
    if missing:
        raise AccountingError(f"{where}: {', '.join(missing)} not written (a bug in llmpipe, please report it)")
    # The files, not only the tallies: a record the writer lost is caught before the marker says done.
    counts.check(where, written=_rows(task.output, task.quarantine) if task.quarantine else None)
    mark_done(task.output, {"fingerprint": task.fingerprint, "counts": counts.to_dict()})
    return counts, time.process_time() - start


def _rows(*paths: Path) -> tuple[int, ...]:
    import pyarrow.parquet as pq

    return tuple(pq.read_metadata(path).num_rows for path in paths)
