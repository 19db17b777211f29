"""`Counts.check` fires: a record the writer loses, or one a stage forgets to count, stops the stage
with an AccountingError naming the shard and the numbers, and the shard is not marked done."""

from __future__ import annotations

import ast
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmpipe.data import ingest
from llmpipe.data.accounting import AccountingError, Counts, Record, RecordShardWriter, content_id
from llmpipe.data.shards import ShardTask, run_shards, shard_paths
from llmpipe.io import done_info
from tests.data.code_project import REPO, stage_context


def _docs_project(root: Path, n: int = 3) -> ingest.IngestConfig:
    for i in range(n):
        (root / "docs").mkdir(parents=True, exist_ok=True)
        (root / "docs" / f"{i}.txt").write_text(f"document number {i}")
    return ingest.IngestConfig.model_validate({"sources": [{"name": "docs", "type": "files", "path": "docs"}]})


def test_a_record_the_writer_loses_stops_ingest_before_the_shard_is_marked_done(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPIPE_WORKERS", "1")
    cfg = _docs_project(tmp_path)
    real_keep, seen = RecordShardWriter.keep, []

    def loses_the_second(self, record):
        seen.append(record)
        if len(seen) != 2:
            real_keep(self, record)

    with monkeypatch.context() as patch:
        patch.setattr(RecordShardWriter, "keep", loses_the_second)
        with pytest.raises(AccountingError) as err:
            ingest.run(cfg, stage_context(tmp_path, "ingest"))
    message = str(err.value)
    assert "ingest shard part-00000.parquet: records unaccounted for" in message
    assert "counted kept 3 + rejected 0, but the output holds 2 rows and the quarantine 0" in message
    output = tmp_path / "data" / "raw" / "part-00000.parquet"
    assert pq.read_metadata(output).num_rows == 2 and done_info(output) is None  # not taken as done

    metrics = ingest.run(cfg, stage_context(tmp_path, "ingest"))  # the rerun redoes the shard
    assert metrics["shards_resumed"] == 0 and pq.read_metadata(output).num_rows == metrics["records_kept"] == 3


def test_a_record_read_but_neither_kept_nor_rejected_stops_the_stage(tmp_path):
    records = [Record(content_id(t), "web", t) for t in ("one", "two", "three")]

    def forgets_the_last(task: ShardTask) -> Counts:
        counts = Counts()
        with RecordShardWriter(task.output, task.quarantine) as writer:
            for record in records:
                counts.on_read(record.source, len(record.text))
                if record.text != "three":  # a step that drops it without a reject reason
                    writer.keep(record)
                    counts.on_kept(record.source, len(record.text))
        return counts

    task = ShardTask(0, (), *shard_paths(tmp_path / "out", 0), "fingerprint")
    with pytest.raises(AccountingError, match=r"clean shard part-00000\.parquet: records unaccounted for.*\n"
                                              r"  web: read 3 != kept 2 \+ rejected 0"):
        run_shards([task], forgets_the_last, out_dir=tmp_path / "out", workers=1, stage="clean")
    assert done_info(task.output) is None


def test_data_checks_are_explicit_raises_not_asserts():
    """`python -O` strips asserts: the data and tokenizer code checks data with explicit raises. The one
    assert left guards an argument our own code passes (a programmer error that no data can cause)."""
    files = sorted([*(REPO / "llmpipe" / "data").glob("*.py"), *(REPO / "llmpipe" / "tokenizer").glob("*.py")])
    asserts = [(f.relative_to(REPO).as_posix(), ast.unparse(node.test)) for f in files
               for node in ast.walk(ast.parse(f.read_text())) if isinstance(node, ast.Assert)]
    assert asserts == [("llmpipe/tokenizer/shards.py", "tokens.ndim == 1")]
