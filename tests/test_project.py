"""dvc.yaml generated from the stage registry, and `llmpipe init` projects for a user's own data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from llmpipe.cli import main
from llmpipe.config import read_params
from llmpipe.pipeline import venv_env
from llmpipe.project import render_dvc_yaml, render_params, source_deps
from llmpipe.stages import STAGES, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_this_repositorys_dvc_yaml_is_what_the_registry_generates():
    generated = render_dvc_yaml(ROOT, read_params(ROOT / "params.yaml"))
    assert (ROOT / "dvc.yaml").read_text() == generated, (
        "dvc.yaml differs from the registry: run `llmpipe init --update .` and commit the result")


def test_source_deps_watch_each_path_or_the_fixed_directory_of_a_glob():
    params = {"ingest": {"sources": [
        {"name": "a", "type": "files", "path": "corpus/**/*.md"},
        {"name": "b", "type": "jsonl", "path": "data/qa.jsonl.gz"},
        {"name": "c", "type": "hf", "dataset": "json", "limit": 3, "data_files": ["hf/x.json", "hf/y.json"]},
        {"name": "d", "type": "hf", "dataset": "org/name", "limit": 3},  # the hub: nothing local to watch
    ]}}
    assert source_deps(params) == ["corpus", "data/qa.jsonl.gz", "hf/x.json", "hf/y.json"]


@pytest.mark.parametrize("sources", [None, [{"name": "mine", "type": "files", "path": "texts"}]])
def test_generated_params_validate_for_every_stage(tmp_path: Path, sources):
    (tmp_path / "params.yaml").write_text(render_params(sources))
    (tmp_path / "dvc.yaml").write_text(render_dvc_yaml(tmp_path, read_params(tmp_path / "params.yaml")))
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert ("demo" in stages) == (sources is None)  # a project on its own data has no demo stage
    for name in stages:
        load_config(name, tmp_path)
    from llmpipe.config import load_stage_config
    from llmpipe.package.gate import GateSettings

    assert load_stage_config(GateSettings, "promote", tmp_path / "params.yaml") == GateSettings()
    if sources:
        assert stages["ingest"]["deps"][0] == "texts"
        assert read_params(tmp_path / "params.yaml")["ingest"]["sources"] == sources


def test_init_refuses_an_existing_project_and_a_missing_source(tmp_path: Path):
    result = CliRunner().invoke(main, ["init", str(tmp_path / "p"), "--source", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "Error: --source" in result.output and "does not exist" in result.output
    assert not (tmp_path / "p" / "dvc.yaml").exists()
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "dvc.yaml").write_text("stages: {}\n")
    result = CliRunner().invoke(main, ["init", str(tmp_path / "q")])
    assert result.exit_code == 1 and "already holds an llmpipe project" in result.output


def test_an_init_project_ignores_the_mlflow_store_temp_writes_and_the_registry_cache(tmp_path: Path):
    result = CliRunner().invoke(main, ["init", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert {"/mlruns/", ".tmp-*", "/.llmpipe/"} <= set((tmp_path / "p" / ".gitignore").read_text().splitlines())


def _texts(archive: Path, dest: Path) -> Path:
    """A user's own text: a few plays of the demo slice as plain files."""
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith("_gut.txt"):
                (dest / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return dest


@pytest.mark.slow
def test_init_then_dvc_repro_on_own_data_reruns_only_what_an_llmpipe_upgrade_changes(demo_slice: Path,
                                                                                        tmp_path: Path):
    # "the installed llmpipe" is a copy on PYTHONPATH, so a test can change its code like an upgrade would
    site = tmp_path / "site"
    shutil.copytree(ROOT / "llmpipe", site / "llmpipe", ignore=shutil.ignore_patterns("__pycache__"))
    env = venv_env({"PYTHONPATH": str(site), "LLMPIPE_WORKERS": "2", "LLMPIPE_TRACKING": "off"})
    texts = _texts(demo_slice, tmp_path / "my-texts")

    def run(*cmd: str, cwd: Path) -> str:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    llmpipe, dvc = str(Path(sys.executable).parent / "llmpipe"), str(Path(sys.executable).parent / "dvc")
    run(llmpipe, "init", "proj", "--source", str(texts), cwd=tmp_path)
    project = tmp_path / "proj"
    assert (project / ".git").is_dir() and (project / ".dvc").is_dir() and (project / "README.md").exists()
    deps = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["ingest"]["deps"]
    assert deps[0] == str(texts) and str(site / "llmpipe" / "data" / "readers.py") in deps

    run(dvc, "repro", "dedup", cwd=project)
    kept = json.loads((project / "metrics" / "dedup.json").read_text())["records_kept"]
    assert kept > 0
    assert "up to date" in run(dvc, "status", "--with-deps", "dedup", cwd=project)

    # an unrelated stage's code changes: nothing up to dedup is stale
    with open(site / "llmpipe" / "train" / "loop.py", "a") as fh:
        fh.write("\n# a new llmpipe version\n")
    assert "up to date" in run(dvc, "status", "--with-deps", "dedup", cwd=project)

    # a reader changes: DVC reruns ingest, and ingest redoes its shards instead of reusing them
    with open(site / "llmpipe" / "data" / "readers.py", "a") as fh:
        fh.write("\n# a new llmpipe version\n")
    assert "ingest" in run(dvc, "status", "--with-deps", "dedup", cwd=project)
    out = run(dvc, "repro", "dedup", cwd=project)
    ingest = json.loads((project / "metrics" / "ingest.json").read_text())
    assert ingest["shards_resumed"] == 0 and ingest["shards"] >= 1
    # the same records under new completion markers: clean reruns but redoes no shard, dedup is skipped
    clean = json.loads((project / "metrics" / "clean.json").read_text())
    assert clean["shards_resumed"] == clean["shards"] >= 1
    assert "Stage 'dedup' didn't change, skipping" in out
    assert json.loads((project / "metrics" / "dedup.json").read_text())["records_kept"] == kept
    assert os.environ.get("PYTHONPATH") != str(site)  # the test process itself ran the real package
