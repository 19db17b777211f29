"""The data stages on a Dask cluster (LLMPIPE_DASK_SCHEDULER): the same bytes as the local run, the
LSH step across workers equal to the local band loop, near duplicates sketched by different workers
found, and a worker's error reaching the stage with its message."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import dask
import numpy as np
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster, get_task_stream

from llmpipe.data import dedup, shards
from llmpipe.data.accounting import AccountingError, write_records
from llmpipe.data.dedup import DedupConfig
from llmpipe.data.duplicates import find_duplicates
from llmpipe.data.shards import ShardTask, run_shards, shard_paths
from llmpipe.errors import UserError
from llmpipe.io import marker_path
from tests.data.test_dedup import edited, paragraph, rec, write_clean
from tests.data.test_filters import GOOD
from tests.data.test_shards import run

STAGES = ("ingest", "clean", "dedup")
OUTPUTS = ("data/raw", "data/clean", "data/dedup")
TIMING = {"mb_per_s", "mb_per_s_per_worker"}  # the only metrics that may differ between two runs


@pytest.fixture(scope="module")
def cluster():
    # One task per worker at a time: the first two shards submitted go to the two (idle) workers, so
    # the test of shards sketched on different workers does not depend on Dask's queueing heuristics.
    with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        try:
            yield cluster
        finally:
            cluster.close()


@pytest.fixture
def on_dask(cluster):
    """A client of the cluster (for its task stream); LLMPIPE_DASK_SCHEDULER is set only by `use_dask`."""
    with Client(cluster, set_as_default=False) as client:
        yield client


def use_dask(monkeypatch, cluster) -> None:
    monkeypatch.setenv("LLMPIPE_DASK_SCHEDULER", cluster.scheduler_address)


def workers_of(stream: list[dict], prefix: str) -> dict[str, str]:
    """Task name ("dedup: sketch part-00000.npz") -> the worker that ran it, from a task stream."""
    return {r["key"].rpartition("-")[0]: r["worker"] for r in stream
            if isinstance(r["key"], str) and r["key"].startswith(prefix)}


def files(root: Path) -> dict[str, bytes]:
    """Every file the data stages wrote: shards, quarantine, markers, sketches, clusters, reports, plots."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for folder in OUTPUTS
            for p in sorted((root / folder).rglob("*")) if p.is_file()}


def write_corpus(root: Path) -> None:
    """Documents that pass clean, one ingest shard each, with an exact and a near duplicate among them."""
    docs = root / "docs"
    docs.mkdir(parents=True)
    texts = [GOOD.replace("winter", season) for season in ["winter", "autumn", "spring", "summer"]]
    texts += [texts[0], texts[1].replace("glorious", "splendid").replace("ocean", "sea")]
    for i, text in enumerate(texts):
        (docs / f"doc{i}.txt").write_text(text)


@pytest.mark.slow
def test_ingest_clean_dedup_on_dask_write_the_bytes_of_the_local_run(tmp_path, monkeypatch, cluster, on_dask):
    monkeypatch.setenv("LLMPIPE_WORKERS", "1")
    monkeypatch.delenv("LLMPIPE_DASK_SCHEDULER", raising=False)
    write_corpus(tmp_path)
    local = {stage: run(tmp_path, stage) for stage in STAGES}
    local_files = files(tmp_path)
    assert local["dedup"]["exact_duplicates"] + local["dedup"]["near_duplicates"] >= 2  # dedup had work
    for folder in OUTPUTS:
        shutil.rmtree(tmp_path / folder)

    use_dask(monkeypatch, cluster)
    with get_task_stream(client=on_dask) as stream:
        remote = {stage: run(tmp_path, stage) for stage in STAGES}
    assert sorted(files(tmp_path)) == sorted(local_files)
    for name, data in files(tmp_path).items():
        assert data == local_files[name], f"{name} differs from the local run's"
    for stage in STAGES:
        assert {k: v for k, v in remote[stage].items() if k not in TIMING} == \
            {k: v for k, v in local[stage].items() if k not in TIMING}, stage
    # The shards did run on the cluster, on both workers.
    ran = workers_of(stream.data, "clean ")
    assert sorted(ran) == [f"clean part-{i:05d}.parquet" for i in range(6)]
    assert len(set(ran.values())) == 2

    # The markers the workers wrote are the ones a rerun finds: every shard is resumed, nothing rewritten.
    again = {stage: run(tmp_path, stage) for stage in STAGES}
    for stage in STAGES:
        assert again[stage]["shards_resumed"] == again[stage]["shards"] == 6, stage
    assert again["dedup"]["sketches_resumed"] == 6
    assert files(tmp_path) == local_files


def near_duplicate_corpus() -> tuple[list, list]:
    """Two shards: originals in the first, their edited copies in the second, and 70 light edits of one
    boilerplate text split over both (an LSH bucket bigger than bucket_pairs' all-pairs limit)."""
    rng = random.Random(3)
    originals = [paragraph(rng) for _ in range(12)]
    copies = [edited(text, rng, 4) for text in originals]
    boiler = paragraph(rng, 60)
    variants = [edited(boiler, rng, 1) for _ in range(70)]
    first = [rec(t) for t in originals] + [rec(t) for t in variants[:35]]
    second = [rec(t, source="books") for t in copies] + [rec(t) for t in variants[35:]]
    return first, second


def test_near_duplicates_sketched_on_different_workers_are_found_as_locally(tmp_path, monkeypatch, cluster,
                                                                           on_dask):
    monkeypatch.setenv("LLMPIPE_WORKERS", "1")
    first, second = near_duplicate_corpus()
    write_records(tmp_path / "data" / "clean" / "part-00000.parquet", first)
    write_records(tmp_path / "data" / "clean" / "part-00001.parquet", second)
    use_dask(monkeypatch, cluster)
    with get_task_stream(client=on_dask) as stream:
        metrics = dedup.run(DedupConfig(), dedup_context(tmp_path))
    sketched = workers_of(stream.data, "dedup: sketch ")
    assert sorted(sketched) == ["dedup: sketch part-00000.npz", "dedup: sketch part-00001.npz"]
    assert len(set(sketched.values())) == 2, "both shards were sketched by one worker"
    assert len(workers_of(stream.data, "dedup: LSH partition ")) == 2  # one per worker thread

    quarantined = [r for i in range(2) for r in
                   pq.read_table(tmp_path / "data" / "dedup" / "quarantine" / f"part-{i:05d}.parquet").to_pylist()]
    kept_by = {r["id"]: json.loads(r["detail"])["kept"] for r in quarantined if r["reason"] == "near_duplicate"}
    for original, copy in zip(first[:12], second[:12]):  # each pair: one yields to the other, across shards
        assert kept_by.get(copy.id) == original.id or kept_by.get(original.id) == copy.id, original.text[:40]
    assert metrics["near_duplicates"] >= 12 + 60  # and the boilerplate variants collapse too

    sk = dedup.load_sketches([tmp_path / "data" / "dedup" / "sketches" / f"part-{i:05d}.npz" for i in range(2)],
                             [len(first), len(second)])
    cfg = DedupConfig()
    on_cluster = find_duplicates(sk, cfg)
    monkeypatch.delenv("LLMPIPE_DASK_SCHEDULER")
    here = find_duplicates(sk, cfg)
    for field in ("kept", "exact", "jaccard", "cluster"):
        np.testing.assert_array_equal(getattr(on_cluster, field), getattr(here, field), err_msg=field)
    assert (on_cluster.candidate_pairs, on_cluster.verified_pairs) == (here.candidate_pairs, here.verified_pairs)
    assert here.candidate_pairs > 70  # the big bucket's O(m) pairs and the copies' pairs, in several bands


def dedup_context(root: Path):
    from tests.data.code_project import stage_context

    return stage_context(root, "dedup")


def record_shard_tasks(root: Path, n: int, ids_of: dict[int, np.ndarray]) -> list[ShardTask]:
    """dedup's write tasks over n one-record input shards; `ids_of` replaces a shard's expected ids."""
    tasks = []
    for i in range(n):
        source = root / "in" / f"part-{i:05d}.parquet"
        write_records(source, [rec(f"record number {i}")])
        ids = ids_of.get(i, np.array([rec(f"record number {i}").id.encode()], dtype="S"))
        tasks.append(ShardTask(i, (source, ids, {}), *shard_paths(root / "out", i), f"fp{i}"))
    return tasks


@pytest.mark.parametrize("case", ["user_error", "accounting_error"])
def test_an_error_on_a_worker_reaches_the_stage_with_its_message(tmp_path, monkeypatch, cluster, case):
    use_dask(monkeypatch, cluster)
    if case == "user_error":  # dedup's own check that its input did not change, raised on the worker
        tasks = record_shard_tasks(tmp_path, 3, {1: np.array([b"someone else"], dtype="S")})
        process, error, message = dedup._write_shard, UserError, r"part-00001.parquet changed while dedup ran"
    else:  # a shard without its quarantine file: the runner's accounting check on the worker
        tasks = [dataclasses.replace(t, inputs=t.inputs[:1]) for t in record_shard_tasks(tmp_path, 3, {})]
        process = functools.partial(dedup._sketch_shard, hasher=DedupConfig().hasher(), batch_chars=1 << 10)
        error, message = AccountingError, r"dedup: write shard part-0000\d.parquet: .*quarantine.* not written"
    with pytest.raises(error, match=message):
        run_shards(tasks, process, out_dir=tmp_path / "out", workers=2, stage="dedup: write")
    failed = [tasks[1]] if case == "user_error" else tasks
    assert not any(marker_path(task.output).exists() for task in failed)
    assert not list((tmp_path / "out").glob(".tmp-dask-probe-*"))


def test_a_worker_that_does_not_see_the_project_is_a_user_error_naming_it(tmp_path):
    task = record_shard_tasks(tmp_path, 1, {})[0]
    with pytest.raises(UserError, match=r"does not see .*out: the workers of LLMPIPE_DASK_SCHEDULER must see"):
        shards._run_on_worker(dedup._write_shard, "dedup: write", task, tmp_path / "out" / ".tmp-dask-probe-x")
    assert not task.output.exists()


def held_on_first_try(task: ShardTask, gate: Path):
    """dedup's shard writer, except that shard 0's first try stops mid-file (a temp file written, as a
    writer's is) and waits there to be killed; a try after `gate/go` exists writes the shard."""
    if task.index == 0 and not (gate / "go").exists():
        (task.output.parent / f".tmp-{task.output.name}-0badf00d").write_bytes(b"half a shard")
        (gate / "pid").write_text(str(os.getpid()))
        time.sleep(60)
        raise AssertionError("the worker was not killed")
    return dedup._write_shard(task)


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_retried_and_leaves_the_bytes_of_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                           cluster, on_dask):
    expected = tmp_path / "expected"
    run_shards(record_shard_tasks(expected, 4, {}), dedup._write_shard, out_dir=expected / "out", workers=1,
               stage="dedup: write")
    use_dask(monkeypatch, cluster)
    cloudpickle.register_pickle_by_value(sys.modules[held_on_first_try.__module__])  # workers cannot import tests
    gate = tmp_path / "gate"
    gate.mkdir()
    root = tmp_path / "killed"
    tasks = record_shard_tasks(root, 4, {})

    def kill_the_held_worker() -> None:
        deadline = time.monotonic() + 60
        while not (gate / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (gate / "go").touch()
        os.kill(int((gate / "pid").read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_held_worker)
    killer.start()
    try:
        result = run_shards(tasks, functools.partial(held_on_first_try, gate=gate), out_dir=root / "out",
                            workers=2, stage="dedup: write")
    finally:
        killer.join()
        cloudpickle.unregister_pickle_by_value(sys.modules[held_on_first_try.__module__])
    assert (result.shards, result.resumed, sum(result.counts.read.values())) == (4, 0, 4)
    assert int((gate / "pid").read_text()) not in on_dask.run(os.getpid).values()  # that worker is gone
    out = sorted(p.relative_to(root).as_posix() for p in (root / "out").rglob("*"))
    assert out == sorted(p.relative_to(expected).as_posix() for p in (expected / "out").rglob("*"))  # no temp left
    for name in out:
        if (root / name).is_file():
            assert (root / name).read_bytes() == (expected / name).read_bytes(), name
