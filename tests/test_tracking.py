import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmpipe.tracking import (PARENT_RUN_ENV, NullTracker, configure_mlflow, input_hashes, tracked_run,
                              tracking_uri)


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "dvc.yaml").write_text("stages:\n  clean:\n    cmd: x\n    deps: [data/raw, code.py]\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.setenv("LLMPIPE_TRACKING", "on")
    return tmp_path


def _client(root: Path):
    return configure_mlflow(root).MlflowClient()


def test_default_store_is_sqlite_under_project_regardless_of_cwd(project: Path, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert tracking_uri(project) == f"sqlite:///{project.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(project) == "http://127.0.0.1:5000"


def test_failed_body_marks_run_failed_and_nested_under_parent(project: Path, monkeypatch):
    with tracked_run(project, "pipeline") as parent:
        parent_id = parent.run_id
    monkeypatch.setenv(PARENT_RUN_ENV, parent_id)
    with pytest.raises(ZeroDivisionError):
        with tracked_run(project, "clean", {"stage": "clean"}) as tracker:
            tracker.log_metrics({"x": 1.0})
            1 / 0
    client = _client(project)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.metrics["x"] == 1.0
    assert client.get_run(parent_id).info.status == "FINISHED"


def test_sigterm_marks_run_failed_not_running(project: Path):
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from llmpipe.tracking import tracked_run
        with tracked_run(Path({str(project)!r}), "pretrain") as t:
            print(t.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            import time; time.sleep(30)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LLMPIPE_TRACKING": "on"})
    assert proc.returncode != 0
    run_id = proc.stdout.split()[0]
    assert _client(project).get_run(run_id).info.status == "FAILED"


def test_tracking_off_gives_null_tracker(project: Path, monkeypatch):
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    with tracked_run(project, "clean") as tracker:
        assert isinstance(tracker, NullTracker)
        tracker.log_metrics({"a": 1})
    assert not (project / "mlruns").exists()


def test_input_hashes_from_dvc_lock_and_dvc_files(project: Path):
    (project / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: x\n    outs:\n    - path: data/raw\n      md5: abc.dir\n")
    (project / "data").mkdir()
    assert input_hashes(project, "clean") == {"input.data/raw": "abc.dir", "input.code.py": "unrecorded"}
