"""The clean stage: chunking, the step pipeline, chunk-level accounting and quarantine, and the stage
run end to end (resume, determinism, params) in a throwaway project."""

import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmpipe.data.accounting import Record, content_id, read_records, write_records
from llmpipe.data.clean import CleanConfig, CleanPipeline, clean_shard, split_chunks
from llmpipe.data.shards import ShardTask, shard_paths
from llmpipe.errors import UserError
from llmpipe.stages import run_stage
from tests.data.test_filters import GOOD
from tests.data.test_normalize import BODY, MODERN
from tests.helpers import ROOT


def test_chunks_pack_paragraphs_up_to_the_limit():
    paragraphs = [f"Paragraph {i} " + "word " * (i * 2) for i in range(30)]  # each under the limit
    text = "\n\n".join(p.strip() for p in paragraphs)
    chunks = split_chunks(text, 400)
    assert all(len(c) <= 400 for c in chunks) and len(chunks) > 5
    assert "\n\n".join(chunks) == text  # split only on paragraph boundaries, nothing lost or reordered
    assert all(len(a) + 2 + len(b.split("\n\n")[0]) > 400 for a, b in zip(chunks, chunks[1:]))  # greedy


def test_long_paragraphs_split_on_lines_then_words_then_hard():
    verse = "\n".join(f"Line {i} of a long poem without any blank line in it" for i in range(40))
    chunks = split_chunks(verse + "\n\nCoda.", 300)
    assert all(len(c) <= 300 for c in chunks)
    assert all(not c.startswith("\n") and "\n\n" not in c[:-7] for c in chunks)  # cut at line ends
    assert chunks[-1].endswith("\n\nCoda.")  # the paragraph's tail shares a chunk with what follows
    assert split_chunks("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_chunks("", 10) == [""]


def test_pipeline_strips_boilerplate_before_chunking_and_gives_chunks_ids_and_meta(tmp_path: Path):
    doc = Record("doc-1", "books", MODERN.replace(BODY, "\n\n".join([GOOD] * 3)), {"origin": "hamlet.txt"})
    out = list(CleanPipeline(CleanConfig(chunk_chars=1000), tmp_path)(doc))
    chunks = [c for c, _ in out]
    assert len(chunks) == 3 and not any("Gutenberg" in c.text or "LICENSE" in c.text for c in chunks)
    for i, chunk in enumerate(chunks):
        assert chunk.id == content_id(chunk.text)
        assert chunk.meta == {"origin": "hamlet.txt", "parent_id": "doc-1", "chunk_index": i, "chunk_count": 3}
    # Identical chunks share a content id (dedup's job to drop); the repetition filter sees each alone.
    assert [v for _, v in out] == [None, None, None]


SOLILOQUY = """To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles
and by opposing end them. To die, to sleep, no more; and by a sleep to say we end
the heart-ache and the thousand natural shocks that flesh is heir to: 'tis a consummation
devoutly to be wish'd. To die, to sleep; to sleep, perchance to dream, ay, there's the rub:
for in that sleep of death what dreams may come, when we have shuffled off this mortal coil,
must give us pause. There's the respect that makes calamity of so long life."""


def _raw_docs() -> list[Record]:
    docs = [
        Record("good", "books", GOOD + "\n\n" + SOLILOQUY, {"origin": "a.txt"}),
        Record("toc", "books", "CONTENTS\n\nI. 1\n\nII. 7\n\nIII. 19\n\nIV. 23", {"origin": "b.txt"}),
        Record("empty", "web", " \n\t\r\n", {"origin": "c.jsonl:1"}),
        Record("mail", "web", GOOD + "\n\nContact hamlet@elsinore.dk or call 555-123-4567.", {"origin": "c.jsonl:2"}),
        Record("rude", "web", GOOD.replace("winter", "fucking winter").replace("summer", "shit summer")
               .replace("clouds", "fucking clouds"), {"origin": "c.jsonl:3"}),
    ]
    return docs


def _run_shard(tmp_path: Path, cfg: CleanConfig = CleanConfig(chunk_chars=1200)):
    raw = tmp_path / "raw.parquet"
    write_records(raw, _raw_docs())
    out, quarantine = shard_paths(tmp_path / "clean", 0)
    counts = clean_shard(ShardTask(0, (str(raw),), out, quarantine, "fp"), cfg=cfg, root=tmp_path)
    return counts, list(read_records(out)), pq.read_table(quarantine).to_pylist()


def test_chunk_level_accounting_and_quarantine(tmp_path: Path):
    counts, kept, rejected = _run_shard(tmp_path)
    counts.check("clean")  # read == kept + rejected per source, at chunk level
    assert sum(counts.kept.values()) == len(kept) and counts.rejected_total() == len(rejected)
    assert {r["reason"] for r in rejected} == {"quality.too_few_words", "empty", "toxicity"}
    assert {(r["source"], json.loads(r["meta"])["parent_id"]) for r in rejected} == {
        ("books", "toc"), ("web", "empty"), ("web", "rude")}
    assert counts.read == {"books": len([c for c in kept if c.source == "books"]) + 1, "web": 3}
    assert counts.stats["documents_in"] == 5 and counts.stats["documents_out"] == 2
    assert counts.stats["documents_in[web]"] == 3 and counts.stats["documents_out[web]"] == 1
    scrubbed = next(c for c in kept if c.meta["parent_id"] == "mail")
    assert "<EMAIL>" in scrubbed.text and "<PHONE>" in scrubbed.text and "hamlet@" not in scrubbed.text
    assert counts.stats["pii.email"] == 1 and counts.stats["pii.phone"] == 1 and counts.stats["pii.ip_address"] == 0


def test_filter_params_reach_the_shard(tmp_path: Path):
    lenient = CleanConfig(chunk_chars=1200, quality={"min_words": 1}, toxicity={"threshold": 1})
    _, _, rejected = _run_shard(tmp_path, lenient)
    reasons = [r["reason"] for r in rejected]
    assert "quality.too_few_words" not in reasons and "toxicity" not in reasons and "empty" in reasons


# -- the stage -----------------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, root / name)
    docs = _raw_docs()
    write_records(root / "data/raw/part-00000.parquet", docs[:2])
    write_records(root / "data/raw/part-00001.parquet", docs[2:])
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    monkeypatch.setenv("LLMPIPE_WORKERS", "1")
    return root


def _outputs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "data/clean").rglob("part-*.parquet"))}


def test_stage_runs_resumes_and_is_deterministic(project: Path, monkeypatch):
    metrics = run_stage("clean", project)
    assert metrics["records_read"] == metrics["records_kept"] + metrics["records_rejected"]
    assert metrics["documents_in"] == 5 and metrics["documents_out"] == 2
    assert metrics["chunks_out"] == metrics["records_kept"] > 0 and metrics["pii.email"] == 1
    assert metrics["mb_per_s"] > 0 and not any("[" in k for k in metrics)
    assert json.loads((project / "metrics/clean.json").read_text()) == metrics
    assert "the chunk" in (project / "data/clean/report.md").read_text()
    first = _outputs(project)
    assert sorted(first) == ["data/clean/part-00000.parquet", "data/clean/part-00001.parquet",
                             "data/clean/quarantine/part-00000.parquet", "data/clean/quarantine/part-00001.parquet"]

    again = run_stage("clean", project)  # every shard's marker matches: nothing redone, same totals
    assert again["mb_per_s"] == 0 and again["records_kept"] == metrics["records_kept"]

    shutil.rmtree(project / "data/clean")
    monkeypatch.setenv("LLMPIPE_WORKERS", "2")
    run_stage("clean", project)
    assert _outputs(project) == first  # same bytes, whatever the worker count


def test_changed_params_redo_the_shards(project: Path):
    run_stage("clean", project)
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("    min_words: 50\n", "    min_words: 1\n"))
    metrics = run_stage("clean", project)
    assert metrics["mb_per_s"] > 0 and "rejected.quality.too_few_words" not in metrics


def test_missing_input_is_a_user_error(project: Path):
    shutil.rmtree(project / "data/raw")
    with pytest.raises(UserError, match="ingest"):
        run_stage("clean", project)


def test_defaults_keep_nearly_all_of_the_real_demo_text(demo_slice: Path, tmp_path: Path):
    # Real plays and Milton (cut to ~40k chars each): under 5% of chunks may be rejected.
    with tarfile.open(demo_slice) as tar:
        docs = [Record(m.name, "demo", tar.extractfile(m).read().decode("utf-8", "replace"), {"origin": m.name})
                for m in tar.getmembers() if m.isfile()]
    pipeline = CleanPipeline(CleanConfig(), tmp_path)
    verdicts = [v for doc in docs for _, v in pipeline(doc)]
    rejected = [v for v in verdicts if v is not None]
    assert len(verdicts) > 50 and len(rejected) / len(verdicts) < 0.05, rejected
