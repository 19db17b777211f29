"""The quantize stage as a user runs it (`llmpipe stage quantize`, a real process) on a trained model:
the targets hold, every output is written whole, and a run killed with SIGKILL mid-way leaves nothing
at a final path and reruns to the bytes of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmpipe.evaluate.tasks import build_examples, write_tasks
from tests.package.test_hf_harness import heldout_docs

pytestmark = pytest.mark.slow

LLMPIPE = Path(sys.executable).parent / "llmpipe"
ENV = {**os.environ, "LLMPIPE_TRACKING": "off", "HF_DATASETS_OFFLINE": "1"}
OUTPUTS = ("models/quantized", "models/export/hf", "models/export/gguf")


@pytest.fixture(scope="module")
def template(trained_project: Path, corpus_text: str, tmp_path_factory) -> Path:
    """The trained project with params.yaml and the evaluate stage's tasks (built from held-out text)."""
    root = shutil.copytree(trained_project, tmp_path_factory.mktemp("quantize") / "project")
    params = {"quantize": {"model": "pretrain", "speed": {"new_tokens": 8, "repeats": 1}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    examples = build_examples(heldout_docs(corpus_text), seed=0, limit=6, choices=3, min_words=20, max_words=60)
    write_tasks(root / "data" / "eval" / "tasks", examples)  # absolute paths: the copies keep this one's tasks
    return root


def stage(root: Path, **popen) -> subprocess.Popen:
    with open(root / "quantize.log", "ab") as log:
        return subprocess.Popen([str(LLMPIPE), "stage", "quantize"], cwd=root, env={**ENV, "HF_HOME": str(root / "hf")},
                                stdout=log, stderr=log, **popen)


def finished(proc: subprocess.Popen, root: Path) -> None:
    assert proc.wait(timeout=600) == 0, (root / "quantize.log").read_text()[-3000:]


def output_bytes(root: Path) -> dict[str, str]:
    """sha256 of every output file but the measured report (tokens/s differ run to run)."""
    files = {}
    for out in OUTPUTS:
        for path in sorted((root / out).rglob("*")):
            if path.is_file() and path.name not in ("report.md", "quantize.png"):
                files[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "models").rglob(".tmp-*"))


@pytest.fixture(scope="module")
def uninterrupted(template: Path, tmp_path_factory) -> Path:
    root = shutil.copytree(template, tmp_path_factory.mktemp("whole") / "project")
    finished(stage(root), root)
    return root


def test_the_stage_meets_the_targets_on_a_trained_model(uninterrupted: Path):
    metrics = json.loads((uninterrupted / "metrics" / "quantize.json").read_text())
    assert metrics["quantize/int8/size_ratio"] <= 0.3 and metrics["quantize/int8/bpb_change"] <= 0.005
    assert metrics["quantize/int4/size_ratio"] <= 0.18 and metrics["quantize/int4/bpb_change"] <= 0.03
    assert metrics["quantize/int8/tokens_per_s"] > 0 and metrics["quantize/int4/tokens_per_s"] > 0
    assert {p.name for p in (uninterrupted / "models" / "export" / "gguf").iterdir()} == {"pretrain-f16.gguf",
                                                                                          "pretrain-q8_0.gguf"}
    assert metrics["export/gguf/q8_0/size_bytes"] < metrics["export/gguf/f16/size_bytes"]
    assert (uninterrupted / "models" / "export" / "hf" / "config.json").exists()
    report = (uninterrupted / "models" / "quantized" / "report.md").read_text()
    assert report.count("| met (") == 2, report
    assert leftovers(uninterrupted) == []


def test_kill_9_mid_run_leaves_no_partial_output_and_the_rerun_gives_the_same_bytes(template: Path,
                                                                                    uninterrupted: Path, tmp_path):
    root = shutil.copytree(template, tmp_path / "project")
    proc = stage(root, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((root / "models").glob(".tmp-quantized-*/int8/checkpoint.json")):  # int8 written, int4 next
        assert proc.poll() is None, "the stage ended before the kill: " + (root / "quantize.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "no int8 variant written in 300 s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not any((root / out).exists() for out in OUTPUTS)  # nothing at a final path
    assert leftovers(root)  # the killed run's temp directory is still there...

    finished(stage(root), root)
    assert leftovers(root) == []  # ...until the rerun removes it
    assert output_bytes(root) == output_bytes(uninterrupted)
