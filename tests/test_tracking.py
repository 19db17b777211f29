import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmpipe.tracking import (ENDED_BY_TAG, HOST_TAG, PARENT_RUN_ENV, PID_NAMESPACE_TAG, PID_STARTED_TAG, PID_TAG,
                              NullTracker, configure_mlflow, end_dead_runs, input_hashes, tracked_run, tracking_uri)


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


# -- runs of dead processes -------------------------------------------------------------------------

# A process that opens a tracked run, says its id, and holds the run open until killed.
HOLD_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llmpipe.tracking import tracked_run
    with tracked_run(Path(sys.argv[1]), sys.argv[2], {"stage": sys.argv[2]}) as t:
        print(t.run_id, flush=True)
        time.sleep(600)
""")


def hold_run(root: Path, name: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_RUN, str(root), name], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "LLMPIPE_TRACKING": "on"})
    return proc, proc.stdout.readline().strip()


def kill_9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_a_run_records_the_host_and_process_that_own_it(project: Path):
    import psutil

    with tracked_run(project, "clean") as tracker:
        pass
    tags = _client(project).get_run(tracker.run_id).data.tags
    assert tags[HOST_TAG] == socket.gethostname() and tags[PID_TAG] == str(os.getpid())
    assert abs(float(tags[PID_STARTED_TAG]) - psutil.Process().create_time()) < 0.1


def test_the_next_run_ends_the_run_of_a_killed_process_as_killed(project: Path):
    proc, killed_id = hold_run(project, "clean")
    assert _client(project).get_run(killed_id).info.status == "RUNNING"
    kill_9(proc)
    with tracked_run(project, "clean") as tracker:
        pass
    client = _client(project)
    killed = client.get_run(killed_id)
    assert killed.info.status == "KILLED" and killed.info.end_time is not None
    assert f"process {proc.pid} on {socket.gethostname()}" in killed.data.tags["mlflow.note.content"]
    assert f"llmpipe process {os.getpid()}" in killed.data.tags[ENDED_BY_TAG]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_runs_of_live_processes_and_of_other_hosts_are_left_alone(project: Path):
    import psutil

    alive, alive_id = hold_run(project, "clean")
    try:
        client = _client(project)
        experiment = client.get_experiment_by_name("llmpipe").experiment_id
        here = {PID_NAMESPACE_TAG: os.readlink("/proc/self/ns/pid")}
        # a dead pid, but recorded by another machine: this one cannot know whether it still runs
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        elsewhere = client.create_run(experiment, run_name="elsewhere", tags={
            HOST_TAG: "another-machine", PID_TAG: dead, PID_STARTED_TAG: "1.0", **here}).info.run_id
        # the live holder's pid with another start time: the pid was reused, the run's process is gone
        reused = client.create_run(experiment, run_name="reused", tags={
            HOST_TAG: socket.gethostname(), PID_TAG: str(alive.pid),
            PID_STARTED_TAG: f"{psutil.Process(alive.pid).create_time() - 60:.2f}", **here}).info.run_id
        ended = end_dead_runs(project, by="a test")
        assert client.get_run(alive_id).info.status == "RUNNING"
        assert client.get_run(elsewhere).info.status == "RUNNING"
        assert client.get_run(reused).info.status == "KILLED"
        assert len(ended) == 1 and ended[0].startswith("reused")
    finally:
        kill_9(alive)


# -- what the MLflow UI shows ---------------------------------------------------------------------

def test_the_experiment_is_tagged_as_model_training_for_the_mlflow_ui(project: Path):
    from llmpipe.tracking import EXPERIMENT_KIND_TAG

    with tracked_run(project, "clean"):
        pass
    experiment = _client(project).get_experiment_by_name("llmpipe")
    # the value MLflow 3.17's UI maps to its classic runs view (ExperimentKind.CUSTOM_MODEL_DEVELOPMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_kind_the_user_chose_is_kept(project: Path):
    from llmpipe.tracking import EXPERIMENT_KIND_TAG

    client = _client(project)
    client.set_experiment_tag(client.get_experiment_by_name("llmpipe").experiment_id, EXPERIMENT_KIND_TAG,
                              "genai_development")
    with tracked_run(project, "clean"):
        pass
    assert _client(project).get_experiment_by_name("llmpipe").tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_stage_run_lists_its_data_inputs_as_datasets_with_the_dvc_hashes(project: Path):
    (project / "dvc.yaml").write_text(
        "stages:\n  tokenizer:\n    cmd: x\n    deps: [data/dedup, data/extra, llmpipe/tokenizer/train.py]\n")
    (project / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  dedup:\n    cmd: x\n    outs:\n    - path: data/dedup\n"
        "      md5: 9bf20e036a45043049e1655693aae268.dir\n"
        "  tokenizer:\n    cmd: x\n    deps:\n    - path: llmpipe/tokenizer/train.py\n      md5: 0123\n")
    with tracked_run(project, "tokenizer", {"stage": "tokenizer", **input_hashes(project, "tokenizer")}) as tracker:
        pass
    inputs = _client(project).get_run(tracker.run_id).inputs.dataset_inputs
    # data/extra has no DVC hash yet and the code is not data: neither is a dataset
    assert [(i.dataset.name, i.dataset.digest, i.dataset.source_type) for i in inputs] == [
        ("data/dedup", "9bf20e036a45043049e1655693aae268.dir", "local")]
    assert '"data/dedup"' in inputs[0].dataset.source
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "input"


def test_a_stage_run_opened_by_run_stage_lists_its_inputs(project: Path, monkeypatch):
    from llmpipe.config import StageConfig
    from llmpipe.stages import STAGES, StageSpec, run_stage

    class Spec(StageSpec):  # the real run_stage, with a stage body that reads nothing
        def load(self):
            return StageConfig, lambda cfg, ctx: {"n": 1.0}

    monkeypatch.setitem(STAGES, "clean", Spec("clean", "", "", "a test stage"))
    (project / "params.yaml").write_text("clean: {}\n")
    (project / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: x\n    outs:\n    - path: data/raw\n      md5: abc.dir\n")
    run_stage("clean", project)
    run = configure_mlflow(project).search_runs(filter_string="tags.stage = 'clean'", output_format="list")[0]
    assert [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs] == [("data/raw", "abc.dir")]
