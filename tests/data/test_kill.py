"""kill -9 of a data stage while its two pool workers write shards: nothing partial is left at a
final path, and the rerun finishes with the bytes of a run that was never interrupted; and kill -9
of a shard writer halfway through its row groups leaves only its temp file."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmpipe.data.accounting import Record, content_id, write_records
from llmpipe.io import read_json
from tests.data.code_project import REPO
from tests.data.test_filters import GOOD

SHARDS = 10
LLMPIPE = Path(sys.executable).parent / "llmpipe"
ENV = {**os.environ, "LLMPIPE_TRACKING": "off", "LLMPIPE_WORKERS": "2"}


def _raw_shards(root: Path) -> None:
    """data/raw: SHARDS shards of ~1 MB (a fraction of a second of clean each), kept and rejected text."""
    rng = random.Random(0)
    words = GOOD.split()
    for shard in range(SHARDS):
        docs = []
        for i in range(300):
            paragraphs = [" ".join(rng.choice(words) for _ in range(150)) for _ in range(5)]
            text = f"Chapter {i}." if rng.random() < 0.2 else "\n\n".join(paragraphs)  # too few words: rejected
            docs.append(Record(content_id(text), rng.choice(["books", "web"]), text, {"origin": f"s{shard}"}))
        write_records(root / "data" / "raw" / f"part-{shard:05d}.parquet", docs)


def _project(root: Path) -> Path:
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    return root


def _clean(root: Path, **popen) -> subprocess.Popen:
    with open(root / "clean.log", "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([str(LLMPIPE), "stage", "clean"], cwd=root, env=ENV, stdout=log, stderr=log, **popen)


def _finished(proc: subprocess.Popen, root: Path) -> None:
    assert proc.wait(timeout=600) == 0, (root / "clean.log").read_text()[-3000:]


def _markers(root: Path) -> int:
    return len(list((root / "data" / "clean").glob("part-*.parquet.done.json")))


def _parquet_files(root: Path) -> dict[str, bytes]:
    out = root / "data" / "clean"
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def _in_flight(root: Path) -> list[str]:
    """Shard files being written now: temp files, or final files not (yet) marked done."""
    out = root / "data" / "clean"
    temps = [p.name for p in out.rglob(".tmp-part-*")]
    unmarked = [p.name for p in out.glob("part-*.parquet") if not p.with_name(p.name + ".done.json").exists()]
    return temps + unmarked


def _kill_mid_write(root: Path) -> list[str] | None:
    """Start clean in its own session; once a shard is marked done and another is being written,
    SIGKILL the whole group (the pool workers too). None if the run ended before that moment."""
    proc = _clean(root, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (_markers(root) and (writing := _in_flight(root))):
        if proc.poll() is not None:
            assert proc.returncode == 0, (root / "clean.log").read_text()[-3000:]
            return None
        assert time.monotonic() < deadline, "no shard done in 300 s"
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while True:  # the workers die with the group; wait until none is left
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return writing
        assert time.monotonic() < deadline, "pool workers outlived the kill"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_of_clean_mid_pool_then_rerun_gives_the_bytes_of_an_uninterrupted_run(tmp_path):
    straight, killed = _project(tmp_path / "straight"), _project(tmp_path / "killed")
    _raw_shards(straight)
    shutil.copytree(straight / "data" / "raw", killed / "data" / "raw")
    _finished(_clean(straight), straight)
    expected = _parquet_files(straight)
    assert len(expected) == 2 * SHARDS  # every output shard and its quarantine shard
    assert all(pq.read_metadata(straight / "data" / "clean" / name).num_rows for name in expected)

    for _attempt in range(5):  # the moment to kill lasts milliseconds; a run that slipped past it is redone
        if writing := _kill_mid_write(killed):
            break
        shutil.rmtree(killed / "data" / "clean")
    assert writing, "never caught clean while it wrote a shard"
    assert 1 <= _markers(killed) < SHARDS, f"killed with {_markers(killed)} of {SHARDS} shards done: not mid-run"
    # Every file at a final name is whole: written under a .tmp- name, then renamed.
    for name in _parquet_files(killed):
        pq.read_table(killed / "data" / "clean" / name)

    _finished(_clean(killed), killed)
    metrics = read_json(killed / "metrics" / "clean.json")
    assert 1 <= metrics["shards_resumed"] < SHARDS  # the rerun kept the finished shards and did the rest
    assert _parquet_files(killed) == expected
    report = Path("data") / "clean" / "report.md"
    assert (killed / report).read_bytes() == (straight / report).read_bytes()
    assert not list((killed / "data" / "clean").rglob(".tmp-*"))
    assert _markers(killed) == SHARDS


# Writes row group after row group (flush_chars is small) until it is killed; says when several are in.
SLOW_WRITER = """
import sys, time
from pathlib import Path
from llmpipe.data.accounting import Record, RecordShardWriter
out = Path(sys.argv[1])
with RecordShardWriter(out / "part-00000.parquet", out / "quarantine" / "part-00000.parquet", flush_chars=1000) as w:
    for i in range(100_000):
        w.keep(Record(str(i), "web", "x" * 1000))
        w.reject(Record(str(i), "web", "y" * 10), "too_short")
        if i == 20:
            (out / "started").touch()
        time.sleep(0.002)
"""


@pytest.mark.slow
def test_kill_9_of_a_shard_writer_mid_file_leaves_nothing_at_the_final_paths(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path)], start_new_session=True,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "part-00000.parquet").exists()
    assert not (tmp_path / "quarantine" / "part-00000.parquet").exists()
    # Both files were being written, under their temp names (the stage's next run removes them).
    temps = sorted(p.relative_to(tmp_path).as_posix().rsplit("-", 1)[0] for p in tmp_path.rglob(".tmp-*"))
    assert temps == [".tmp-part-00000.parquet", "quarantine/.tmp-part-00000.parquet"]
