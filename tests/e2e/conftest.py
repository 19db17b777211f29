"""The end-to-end project: a throwaway copy of this checkout on a slice of the demo corpus, run once by
`dvc repro` per session. tests/e2e/test_pipeline.py checks it on the embedded defaults; the stack
tests (test_stack_pipeline.py, which run last) take a copy of it to the server stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.project import E2E_OVERRIDES, chat_copy
from tests.helpers import make_project, run_dvc


@pytest.fixture(scope="session")
def project(demo_slice: Path, chitchat_slice: Path, tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("project"), demo_slice, E2E_OVERRIDES | chat_copy(chitchat_slice))
    run_dvc(root, "repro")
    return root
