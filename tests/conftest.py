"""Shared fixtures: the demo corpus (fetched once per machine), a small slice of it, throwaway
copies of this project for end-to-end runs, and one Prefect test server per session."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from tests.helpers import DEMO_NAME, ROOT


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


@pytest.fixture(scope="session")
def prefect_server():
    """One ephemeral Prefect API for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
