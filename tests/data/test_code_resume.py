"""Resume is code-aware: an edit of the code dvc.yaml lists for a data stage redoes that stage's
shards on the next run (DVC reruns the stage for that edit, and no shard of the old code may count
as done), an edit of any other stage's code redoes nothing; and the lists are complete."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmpipe.stages import STAGES, code_deps, run_stage
from tests.data.code_project import REPO, code_project, edit_code, imported_modules, module_file
from tests.data.test_filters import GOOD

DATA_STAGES = ("ingest", "clean", "dedup")


def _docs() -> dict[str, str]:
    """Five small documents, each its own shard in every stage (clean and dedup drop some)."""
    verse = [GOOD, GOOD.replace("winter", "autumn"), GOOD.replace("York", "Lancaster").upper(), GOOD[::-1]]
    return {f"doc{i}.txt": text for i, text in enumerate(verse + [verse[0] + "\n"])}


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    monkeypatch.setenv("LLMPIPE_WORKERS", "1")
    root = code_project(tmp_path / "proj", {"ingest": {
        "sources": [{"name": "docs", "type": "files", "path": "docs"}], "shard_mb": 100 / 1e6}})
    for name, text in _docs().items():
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / name).write_text(text)
    return root


def _run_all(root: Path) -> dict[str, dict[str, float]]:
    return {stage: run_stage(stage, root) for stage in DATA_STAGES}


def _redone(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per stage, how many shards this run did (not resumed); dedup's sketches count as its shards."""
    return {stage: m["shards"] - m["shards_resumed"] for stage, m in metrics.items()} | {
        "dedup sketches": metrics["dedup"]["shards"] - metrics["dedup"]["sketches_resumed"]}


def _outputs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for stage_dir in ("data/raw", "data/clean", "data/dedup")
            for p in sorted((root / stage_dir).rglob("*.parquet"))}


@pytest.mark.slow  # the three stages, seven times over
def test_editing_a_stages_code_redoes_its_shards_and_only_its_own(project: Path):
    first = _run_all(project)
    assert _redone(first) == {"ingest": 5, "clean": 5, "dedup": 5, "dedup sketches": 5}
    outputs = _outputs(project)
    nothing = {"ingest": 0, "clean": 0, "dedup": 0, "dedup sketches": 0}
    assert _redone(_run_all(project)) == nothing

    edit_code(project, "llmpipe/train/loop.py")  # another stage's code
    assert _redone(_run_all(project)) == nothing

    edit_code(project, "llmpipe/data/readers.py")  # ingest's alone; its new shards have the same bytes
    assert _redone(_run_all(project)) == {**nothing, "ingest": 5}

    edit_code(project, "llmpipe/data/filters.py")  # a clean filter; clean's new shards have the same bytes
    assert _redone(_run_all(project)) == {**nothing, "clean": 5}

    edit_code(project, "llmpipe/data/minhash.py")
    assert _redone(_run_all(project)) == {**nothing, "dedup": 5, "dedup sketches": 5}

    edit_code(project, "llmpipe/data/shards.py")  # shared by the three stages
    assert _redone(_run_all(project)) == {"ingest": 5, "clean": 5, "dedup": 5, "dedup sketches": 5}
    assert _outputs(project) == outputs


@pytest.mark.parametrize("stage", [*DATA_STAGES, "tokenizer"])
def test_dvc_yaml_lists_every_llmpipe_module_the_stage_imports(stage: str):
    module = STAGES[stage].run.partition(":")[0]
    deps = code_deps(REPO, stage)
    missing = []
    for name in sorted(imported_modules(module)):
        file = module_file(name)
        covered = any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)
        if not covered and (REPO / file).read_text().strip():  # an empty __init__.py shapes nothing
            missing.append(file)
    assert not missing, f"dvc.yaml stage {stage} imports but does not list as deps: {', '.join(missing)}"


def test_every_listed_code_dep_exists():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in [*DATA_STAGES, "tokenizer"]:
        assert stages[stage]["deps"], stage
        for dep in code_deps(REPO, stage):
            assert (REPO / dep).exists(), f"dvc.yaml stage {stage}: {dep} does not exist"
