"""Shared fixtures: the demo corpus (fetched once per machine), a small slice of it, throwaway
copies of this project for end-to-end runs, and one Prefect test server per session."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from tests.helpers import DEMO_NAME, ROOT
# The server stack (`llmpipe up`), one per session for every test directory: defined once, here.
from tests.ops.stack_fixture import stack  # noqa: F401


def pytest_collection_modifyitems(config, items):
    # The stack tests last (order otherwise kept): the servers start at the first of them and run to the
    # session's end, and on two cores their background work would slow every test after them.
    items.sort(key=lambda item: item.get_closest_marker("stack") is not None)


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
def chitchat_wheel() -> Path:
    """The real chat data (the chitchat-dataset wheel): the project's fetched copy, else fetched once into a user cache."""
    from llmpipe.finetune.chitchat import CHITCHAT_REQUIREMENT, CHITCHAT_SHA256
    from llmpipe.data.demo import fetch_package_file

    name = "chitchat_dataset-0.9.0-py3-none-any.whl"
    local = ROOT / "data" / "sources" / name
    if local.exists():
        return local
    cache = Path(os.environ.get("LLMPIPE_TEST_CACHE", Path.home() / ".cache" / "llmpipe-tests"))
    return fetch_package_file(cache / name, CHITCHAT_REQUIREMENT, CHITCHAT_SHA256, None, cache, "chitchat")


@pytest.fixture(scope="session")
def chitchat_slice(chitchat_wheel: Path, tmp_path_factory) -> Path:
    """A wheel with the real one's layout holding its first 400 conversations (fast enough for CI runs)."""
    import json
    import zipfile

    member = "chitchat_dataset/dataset.json"
    with zipfile.ZipFile(chitchat_wheel) as wheel:
        data = json.loads(wheel.read(member))
    out = tmp_path_factory.mktemp("chitchat") / chitchat_wheel.name
    with zipfile.ZipFile(out, "w") as dst:
        dst.writestr(zipfile.ZipInfo(member, (1980, 1, 1, 0, 0, 0)), json.dumps(dict(list(data.items())[:400])))
    return out


@pytest.fixture(scope="session")
def prefect_server():
    """One ephemeral Prefect API for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
