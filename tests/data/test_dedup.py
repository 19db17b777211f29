"""The dedup stage: exact and near duplicates across shards, deterministic kept members, cluster
report, accounting, resume after a crash, and the stage through the registry."""

import json
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from llmpipe.config import ConfigError, load_section
from llmpipe.data import dedup
from llmpipe.data.accounting import Record, content_id, write_records
from llmpipe.data.dedup import DedupConfig
from llmpipe.errors import UserError
from llmpipe.io import read_json
from llmpipe.stages import run_stage
from tests.data.code_project import stage_context

ROOT = Path(__file__).resolve().parents[2]
VOCAB = [f"{a}{b}{c}" for a in "bcdfghklmnprstvz" for b in "aeiou" for c in "lmnrst"]  # 480 words


def paragraph(rng: random.Random, words: int = 120) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(words)).capitalize() + "."


def edited(text: str, rng: random.Random, edits: int) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), edits):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


def rec(text: str, source: str = "web", **meta) -> Record:
    return Record(content_id(text), source, text, meta)


@pytest.fixture
def corpus() -> dict[str, list[Record]]:
    """Named groups: each group's members are duplicates of each other, groups are distinct."""
    rng = random.Random(7)
    base = [paragraph(rng) for _ in range(6)]
    longer = base[2] + " " + paragraph(rng, 6)  # a near duplicate that is longer: it must be the one kept
    return {
        "exact": [rec(base[0]), rec("  " + base[0].upper().replace(" ", "\n ", 5) + "!!", source="books")],
        "near": [rec(base[1]), rec(edited(base[1], rng, 3), source="books"), rec(edited(base[1], rng, 2))],
        "longest": [rec(base[2]), rec(longer)],
        "distinct": [rec(base[3]), rec(base[4]), rec(base[5]), rec("tiny"), rec("?!")],
    }


def survivor(group: list[Record]) -> Record:
    """The documented rule: the longest text, then the smallest id."""
    return min(group, key=lambda r: (-len(r.text), r.id))


def write_clean(root: Path, records: list[Record], per_shard: int) -> None:
    clean = root / "data" / "clean"
    shutil.rmtree(clean, ignore_errors=True)
    for i in range(0, len(records), per_shard):
        write_records(clean / f"part-{i // per_shard:05d}.parquet", records[i:i + per_shard])


def run_dedup(root: Path, monkeypatch, workers: int = 1, **overrides) -> dict[str, float]:
    monkeypatch.setenv("LLMPIPE_WORKERS", str(workers))
    return dedup.run(DedupConfig(**overrides), stage_context(root, "dedup"))


def outputs(root: Path) -> tuple[list[dict], list[dict]]:
    out = root / "data" / "dedup"
    kept = [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    quarantined = [r for p in sorted((out / "quarantine").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    return kept, quarantined


def test_exact_and_near_duplicates_are_quarantined_and_distinct_texts_kept(tmp_path, monkeypatch, corpus):
    records = [r for group in corpus.values() for r in group]
    write_clean(tmp_path, records, per_shard=4)
    metrics = run_dedup(tmp_path, monkeypatch)
    kept, quarantined = outputs(tmp_path)
    kept_ids = {r["id"] for r in kept}
    assert {r.id for r in corpus["distinct"]} <= kept_ids
    for name in ("exact", "near", "longest"):
        assert [r.id for r in corpus[name] if r.id in kept_ids] == [survivor(corpus[name]).id], name
    assert survivor(corpus["longest"]) is corpus["longest"][1]
    reasons = {r["id"]: r["reason"] for r in quarantined}
    assert reasons[corpus["exact"][0].id] == "exact_duplicate"  # its variant with extra spaces is longer
    assert [reasons[r.id] for r in corpus["near"] if r.id not in kept_ids] == ["near_duplicate"] * 2
    for row in quarantined:  # the detail names the survivor and how similar the dropped record was
        detail = json.loads(row["detail"])
        assert detail["kept"] in kept_ids and 0.45 <= detail["jaccard"] <= 1.0
        assert row["text"] and row["source"]
    assert metrics["exact_duplicates"] == 1 and metrics["near_duplicates"] == 3 and metrics["clusters"] == 3
    # Accounting: every record read is either kept or quarantined, per source.
    assert metrics["records_read"] == len(records) == len(kept) + len(quarantined)
    assert metrics["records_kept"] == len(kept) and metrics["rejected.near_duplicate"] == 3


def test_kept_members_do_not_depend_on_shard_order_or_workers(tmp_path, monkeypatch, corpus):
    records = [r for group in corpus.values() for r in group]
    results = []
    for trial, (order_seed, per_shard, workers) in enumerate([(0, 3, 1), (1, 5, 2), (2, 1, 2)]):
        shuffled = records[:]
        random.Random(order_seed).shuffle(shuffled)
        root = tmp_path / str(trial)
        write_clean(root, shuffled, per_shard)
        run_dedup(root, monkeypatch, workers=workers)
        kept, quarantined = outputs(root)
        clusters = pq.read_table(root / "data" / "dedup" / "clusters.parquet").to_pylist()
        results.append((sorted(r["id"] for r in kept), sorted((r["id"], r["detail"]) for r in quarantined), clusters))
    assert results[0] == results[1] == results[2]


def test_cluster_report_lists_kept_member_and_sources(tmp_path, monkeypatch, corpus):
    write_clean(tmp_path, [r for group in corpus.values() for r in group], per_shard=4)
    run_dedup(tmp_path, monkeypatch)
    out = tmp_path / "data" / "dedup"
    clusters = {c["kept_id"]: c for c in pq.read_table(out / "clusters.parquet").to_pylist()}
    near = clusters[survivor(corpus["near"]).id]
    assert near["size"] == 3 and near["near_duplicates"] == 2 and near["sources"] == ["books", "web"]
    assert near["member_ids"][0] == survivor(corpus["near"]).id
    assert sorted(near["member_ids"]) == sorted(r.id for r in corpus["near"])
    assert near["member_jaccard"][0] == 1.0 and min(near["member_jaccard"]) >= 0.45
    exact = [c for c in clusters.values() if c["exact_duplicates"]]
    assert len(exact) == 1 and sorted(exact[0]["member_ids"]) == sorted(r.id for r in corpus["exact"])
    report = (out / "report.md").read_text()
    assert "## Deduplication" in report and "bytes per record" in report and "clusters: 3" in report


def test_bands_times_rows_must_equal_num_perm():
    with pytest.raises(ValidationError, match="bands \\* rows must equal num_perm"):
        DedupConfig(num_perm=128, bands=10, rows=8)
    with pytest.raises(ConfigError, match="dedup: .*bands \\* rows must equal num_perm.*10 \\* 8 = 80 != 128"):
        load_section(DedupConfig, {"dedup": {"num_perm": 128, "bands": 10, "rows": 8}}, "dedup", "params.yaml")


def test_rerun_after_a_crash_reuses_finished_sketches(tmp_path, monkeypatch, corpus):
    records = [r for group in corpus.values() for r in group]
    write_clean(tmp_path, records, per_shard=2)
    assert len(records) == 12  # 6 shards
    real, calls = dedup._sketch_shard, []

    def crash_on_fourth(task, **kwargs):
        calls.append(task.index)
        if task.index == 3:
            raise RuntimeError("killed")
        return real(task, **kwargs)

    monkeypatch.setattr(dedup, "_sketch_shard", crash_on_fourth)
    with pytest.raises(RuntimeError, match="killed"):
        run_dedup(tmp_path, monkeypatch)
    assert not list((tmp_path / "data" / "dedup").glob("part-*.parquet"))
    monkeypatch.setattr(dedup, "_sketch_shard", lambda task, **kw: calls.append(task.index) or real(task, **kw))
    calls.clear()
    first = run_dedup(tmp_path, monkeypatch)
    assert calls == [3, 4, 5]  # shards 0-2 were sketched before the crash
    assert first["sketches_resumed"] == 3 and first["shards_resumed"] == 0
    calls.clear()
    assert first["mb_per_s"] > 0  # the write pass redid every shard: all of the input, processed this run
    # Nothing redone: the same metrics, except that this run processed no input at all.
    assert run_dedup(tmp_path, monkeypatch) == {**first, "mb_per_s": 0.0, "mb_per_s_per_worker": 0.0,
                                                "sketches_resumed": 6, "shards_resumed": 6}
    assert calls == []
    # A changed input shard is re-sketched alone, and the output is redone (duplicates are global).
    write_records(tmp_path / "data" / "clean" / "part-00005.parquet", [rec("something else entirely")])
    assert run_dedup(tmp_path, monkeypatch)["records_read"] == len(records) - 2 + 1
    assert calls == [5]


def test_stage_runs_through_the_registry_in_a_project(tmp_path, monkeypatch, corpus):
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    write_clean(tmp_path, [r for group in corpus.values() for r in group], per_shard=5)
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    monkeypatch.setenv("LLMPIPE_WORKERS", "2")
    metrics = run_stage("dedup", tmp_path)
    assert read_json(tmp_path / "metrics" / "dedup.json") == metrics
    assert metrics["records_read"] == metrics["records_kept"] + metrics["records_rejected"]
    assert {"clusters", "exact_duplicates", "near_duplicates", "mb_per_s"} <= set(metrics)
    assert metrics["near_duplicates"] == 3


def test_missing_input_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="run the clean stage first"):
        run_dedup(tmp_path, monkeypatch)


def test_empty_shards_and_texts_without_words(tmp_path, monkeypatch):
    clean = tmp_path / "data" / "clean"
    write_records(clean / "part-00000.parquet", [])
    write_records(clean / "part-00001.parquet", [rec("?!"), rec("..."), rec("!!! ???")])
    metrics = run_dedup(tmp_path, monkeypatch)
    kept, quarantined = outputs(tmp_path)
    assert [r["text"] for r in kept] == ["!!! ???"]  # punctuation only: all the same empty normalized text
    assert metrics["exact_duplicates"] == 2 and metrics["near_duplicates"] == 0 and metrics["records_read"] == 3
    assert (tmp_path / "data" / "dedup" / "part-00000.parquet").exists()


def test_an_empty_corpus_is_deduplicated_to_nothing(tmp_path, monkeypatch):
    write_records(tmp_path / "data" / "clean" / "part-00000.parquet", [])
    metrics = run_dedup(tmp_path, monkeypatch)
    assert metrics["records_read"] == metrics["clusters"] == 0
    assert outputs(tmp_path) == ([], [])


def test_a_sketch_changed_after_its_marker_is_a_user_error_naming_it(tmp_path, monkeypatch, corpus):
    write_clean(tmp_path, [r for group in corpus.values() for r in group], per_shard=5)  # 5, 5 and 2 records
    run_dedup(tmp_path, monkeypatch)
    sketches = tmp_path / "data" / "dedup" / "sketches"
    shutil.copy(sketches / "part-00002.npz", sketches / "part-00000.npz")
    with pytest.raises(UserError, match=r"sketches/part-00000\.npz: 2 records, its completion marker says 5: .*"
                                        r"delete .*sketches and rerun dedup"):
        run_dedup(tmp_path, monkeypatch)
