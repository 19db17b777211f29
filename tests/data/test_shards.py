"""The one shard runner and the one report publisher, seen through the three data stages: a rerun with
fewer shards leaves none of the old ones, `mb_per_s` means the same thing in ingest, clean and dedup,
and each stage logs the same report files; only the runner reads or writes completion markers."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import types
from pathlib import Path

import pytest

from llmpipe.data import clean, dedup, ingest, shards
from llmpipe.data.accounting import Counts
from llmpipe.io import done_info
from llmpipe.tracking import NullTracker
from tests.data.code_project import REPO, stage_context
from tests.data.test_filters import GOOD

STAGES = {"ingest": ingest, "clean": clean, "dedup": dedup}
CONFIGS = {"ingest": {"sources": [{"name": "docs", "type": "files", "path": "docs"}], "shard_mb": 100 / 1e6},
           "clean": {}, "dedup": {}}


class Recorder(NullTracker):
    def __init__(self) -> None:
        self.artifacts: list[tuple[str, str | None]] = []

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append((Path(path).name, artifact_path))


def write_docs(root: Path, n: int) -> None:
    """n distinct documents that pass clean's filters, each its own ingest shard (so one shard per stage)."""
    docs = root / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for old in docs.iterdir():
        old.unlink()
    for i, season in enumerate(["winter", "autumn", "spring", "summer", "season"][:n]):
        (docs / f"doc{i}.txt").write_text(GOOD.replace("winter", season))


def run(root: Path, stage: str, tracker: NullTracker | None = None) -> dict[str, float]:
    ctx = dataclasses.replace(stage_context(root, stage), tracker=tracker or NullTracker())
    cfg = {"ingest": ingest.IngestConfig, "clean": clean.CleanConfig, "dedup": dedup.DedupConfig}[stage]
    return STAGES[stage].run(cfg.model_validate(CONFIGS[stage]), ctx)


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMPIPE_WORKERS", "1")  # in-process, so the clock below is the one the runner reads
    write_docs(tmp_path, 5)
    return tmp_path


@pytest.fixture
def clock(monkeypatch) -> None:
    """The runner's clocks, made to advance by exactly one second per reading: a pass over pending shards
    takes 1 wall second, and each processed shard 1 CPU second."""
    wall, cpu = itertools.count(), itertools.count()
    monkeypatch.setattr(shards, "time", types.SimpleNamespace(perf_counter=lambda: float(next(wall)),
                                                              process_time=lambda: float(next(cpu))))


def _marker_mb(out_dir: Path, names: list[str]) -> float:
    return sum(done_info(out_dir / n)["counts"]["stats"]["input_bytes"] for n in names) / 1e6


def test_mb_per_s_is_the_input_this_run_processed_per_second_of_shard_work_in_every_stage(project: Path, clock):
    first = {stage: run(project, stage) for stage in STAGES}
    for stage, metrics in first.items():  # every shard processed: one wall second per pass
        passes = 2 if stage == "dedup" else 1  # dedup's sketches are a pass over the same input
        assert metrics["mb_per_s"] == pytest.approx(metrics["input_mb"] / passes), stage
        assert metrics["mb_per_s_per_worker"] == pytest.approx(metrics["input_mb"] / (passes * 5)), stage
        assert metrics["input_mb"] > 0 and metrics["shards"] == 5 and metrics["shards_resumed"] == 0, stage

    again = {stage: run(project, stage) for stage in STAGES}
    for stage, metrics in again.items():  # all resumed: no MB and no time of this run
        assert (metrics["mb_per_s"], metrics["mb_per_s_per_worker"]) == (0, 0), stage
        assert metrics == {**first[stage], "mb_per_s": 0, "mb_per_s_per_worker": 0, "shards_resumed": 5,
                           **({"sketches_resumed": 5} if stage == "dedup" else {})}, stage

    (project / "docs" / "doc2.txt").write_text(GOOD.replace("winter", "a changed season"))
    redone = {stage: run(project, stage) for stage in STAGES}
    # ingest and clean redo one shard: its input MB in one second, over one CPU second.
    for stage, directory in (("ingest", "raw"), ("clean", "clean")):
        one_shard = _marker_mb(project / "data" / directory, ["part-00002.parquet"])
        assert redone[stage]["shards_resumed"] == 4, stage
        assert redone[stage]["mb_per_s"] == redone[stage]["mb_per_s_per_worker"] == pytest.approx(one_shard), stage
        assert one_shard < redone[stage]["input_mb"] / 2, stage
    # dedup re-sketches that shard and rewrites all five (duplicates are global): the whole input, over
    # two passes' wall seconds and six shards' CPU seconds.
    assert redone["dedup"]["sketches_resumed"] == 4 and redone["dedup"]["shards_resumed"] == 0
    assert redone["dedup"]["mb_per_s"] == pytest.approx(redone["dedup"]["input_mb"] / 2)
    assert redone["dedup"]["mb_per_s_per_worker"] == pytest.approx(redone["dedup"]["input_mb"] / 6)


FOLDERS = {"raw": ".parquet", "clean": ".parquet", "dedup": ".parquet", "dedup/sketches": ".npz"}


def test_a_rerun_with_fewer_shards_leaves_none_of_the_old_ones(project: Path):
    for stage in STAGES:
        run(project, stage)
    for folder in FOLDERS:
        (project / "data" / folder / ".tmp-part-00001-123").write_bytes(b"a killed writer's leftover")
    write_docs(project, 3)
    for stage in STAGES:
        assert run(project, stage)["shards"] == 3, stage
    for folder, suffix in FOLDERS.items():
        parts = [f"part-{i:05d}{suffix}" for i in range(3)]
        assert _shard_files(project / "data" / folder) == sorted(parts + [p + ".done.json" for p in parts]), folder
        if suffix == ".parquet":
            assert _shard_files(project / "data" / folder / "quarantine") == parts, folder


def _shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("part-", ".tmp")))


def test_every_stage_publishes_its_report_and_plots_the_same_way(project: Path):
    for stage in STAGES:
        tracker = Recorder()
        run(project, stage, tracker)
        extra = [("clusters.parquet", "dedup_report")] if stage == "dedup" else []
        assert tracker.artifacts == [("report.md", f"{stage}_report"), ("lengths.png", f"{stage}_report"),
                                     ("reject_reasons.png", f"{stage}_report"), *extra], stage


def test_only_the_runner_reads_or_writes_completion_markers():
    """Stages get their shards' counts from the runner's `ShardRun`; a stage checking markers again is
    how "is this shard done" came to exist three times."""
    marker_api = {"done_info", "mark_done", "marker_path"}
    users = sorted(f.name for f in (REPO / "llmpipe" / "data").glob("*.py")
                   for node in ast.walk(ast.parse(f.read_text()))
                   if isinstance(node, ast.ImportFrom) and {a.name for a in node.names} & marker_api)
    assert users == ["shards.py"]


def test_throughput_of_a_preparatory_pass_adds_its_time_not_its_bytes():
    def shard_run(new_mb: float, seconds: float, cpu: float, total_mb: float) -> shards.ShardRun:
        counts = Counts()
        counts.stats["input_bytes"] = int(total_mb * 1e6)
        return shards.ShardRun(counts, [counts] * 4, 1, int(new_mb * 1e6), seconds, cpu)

    write, sketch = shard_run(6.0, 2.0, 3.0, 8.0), shard_run(6.0, 1.0, 1.0, 8.0)
    assert shards.throughput_metrics(write) == {"shards": 4, "shards_resumed": 1, "input_mb": 8.0,
                                                "mb_per_s": 3.0, "mb_per_s_per_worker": 2.0}
    assert shards.throughput_metrics(write, preparatory=[sketch])["mb_per_s"] == 2.0
    assert shards.throughput_metrics(write, preparatory=[sketch])["mb_per_s_per_worker"] == 1.5
