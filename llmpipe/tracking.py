"""Experiment tracking: a small `Tracker` protocol, MLflow behind it, and a null object when it is off.

The embedded default is MLflow on SQLite under `<project>/mlruns/` (independent of the working
directory); `MLFLOW_TRACKING_URI` points at a server instead; `LLMPIPE_TRACKING=off` turns it off.
A pipeline run is one parent MLflow run; `llmpipe run` passes its id to each stage process in
`LLMPIPE_PARENT_RUN_ID`, and each stage execution becomes a nested run.

A process killed with SIGKILL (or by the OOM killer) cannot end its run, so every run records the
process that owns it (host, pid, the pid's start time); whoever opens the next run, and `llmpipe
status`, ends the RUNNING runs whose process is gone as KILLED, with a note saying so.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import yaml

from llmpipe import env

PARENT_RUN_ENV = env.PARENT_RUN_ID.name
TRACKING_SWITCH_ENV = env.TRACKING.name
EXPERIMENT_ENV = env.EXPERIMENT.name
DEFAULT_EXPERIMENT = env.EXPERIMENT.default

# Which process owns a run: enough to tell, on the same machine, whether it still exists.
HOST_TAG = "llmpipe.host"
PID_TAG = "llmpipe.pid"
PID_STARTED_TAG = "llmpipe.pid_started"  # the pid's start time, so a reused pid does not look alive
PID_NAMESPACE_TAG = "llmpipe.pid_namespace"  # containers sharing a host name do not share pids
ENDED_BY_TAG = "llmpipe.ended_by"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
# Without this tag MLflow 3's UI opens an experiment in its GenAI view (traces, judges); the value is
# the UI's ExperimentKind.CUSTOM_MODEL_DEVELOPMENT, its classic view of runs, metrics and datasets.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
INPUT_TAG_PREFIX = "input."  # a run's tag input.<dep path> = the dep's DVC hash
UNRECORDED = "unrecorded"


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class NullTracker:
    """Tracking switched off: every call is accepted and ignored."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class MLflowTracker:
    """Logs into one active MLflow run (the one `tracked_run` opened)."""

    def __init__(self, run_id: str):
        import mlflow

        self._mlflow = mlflow
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow caps a param value at 6000 chars and refuses to change a logged value.
        self._mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)


def tracking_enabled() -> bool:
    return env.tracking_enabled()


def tracking_uri(root: Path) -> str:
    if env.tracking_uri():
        return env.tracking_uri()
    (root / "mlruns").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


def artifact_location(root: Path) -> str:
    return (root / "mlruns" / "artifacts").resolve().as_uri()


def configure_mlflow(root: Path) -> Any:
    """Point MLflow at the project's store and experiment; returns the mlflow module."""
    import logging

    import mlflow

    # Alembic chatters about every migration on a fresh SQLite store; users need none of it.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(root))
    name = env.experiment()
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(name) is None:
        location = None if env.tracking_uri() else artifact_location(root)
        try:
            client.create_experiment(name, artifact_location=location)
        except Exception:  # another process created it first
            if client.get_experiment_by_name(name) is None:
                raise
    experiment = mlflow.set_experiment(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind the user chose in the UI stays
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return mlflow


@contextmanager
def tracked_run(root: Path, run_name: str, tags: dict[str, str] | None = None) -> Iterator[Tracker]:
    """Open a run (nested under $LLMPIPE_PARENT_RUN_ID when set) and close it with the right status.

    An exception, Ctrl-C or SIGTERM ends the run FAILED/KILLED; it is never left RUNNING. Runs that
    a killed process left RUNNING are ended first (see `end_dead_runs`).
    """
    if not tracking_enabled():
        yield NullTracker()
        return
    mlflow = configure_mlflow(root)
    end_dead_runs(root, by=f"the start of run {run_name!r}")
    parent = env.parent_run_id()
    run = mlflow.start_run(run_name=run_name, nested=bool(parent), parent_run_id=parent or None,
                           tags={**(tags or {}), **process_tags()})
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if in_main_thread:  # signal handlers can only be set from the main thread
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    status = "FAILED"
    try:
        log_data_inputs(mlflow, tags or {})
        yield MLflowTracker(run.info.run_id)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        mlflow.end_run(status=status)


def data_inputs(tags: dict[str, str]) -> dict[str, str]:
    """{dep path: DVC hash} of the data a run read, from its input.<path> tags: llmpipe's own code
    (llmpipe/..., or absolute paths into the installed package) and paths DVC has not hashed are left out."""
    out = {}
    for key, digest in tags.items():
        path = key.removeprefix(INPUT_TAG_PREFIX)
        if key.startswith(INPUT_TAG_PREFIX) and digest and digest != UNRECORDED \
                and Path(path).parts[:1] != ("llmpipe",) and not Path(path).is_absolute():
            out[path] = digest
    return out


def log_data_inputs(mlflow: Any, tags: dict[str, str]) -> None:
    """Each data input as an MLflow dataset whose digest is its DVC hash: the run page's Dataset
    column then names what the stage read, and equal digests across runs mean the same bytes."""
    import json

    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset

    inputs = data_inputs(tags)
    if not inputs:
        return
    datasets = [MetaDataset(source=get_dataset_source_from_json(json.dumps({"uri": path}), source_type="local"),
                            name=path, digest=digest) for path, digest in sorted(inputs.items())]
    mlflow.log_inputs(datasets=datasets, contexts=["input"] * len(datasets), tags_list=[None] * len(datasets))


class Terminated(BaseException):
    """SIGTERM turned into an exception so cleanup (tracking, checkpoints) runs."""


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(f"received signal {signum}")


# -- runs of dead processes ------------------------------------------------------------------------

def process_tags() -> dict[str, str]:
    """The tags that name this process as the owner of a run."""
    import psutil

    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            PID_STARTED_TAG: f"{psutil.Process().create_time():.2f}", PID_NAMESPACE_TAG: _pid_namespace()}


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: the host name alone identifies the machine
        return ""


def process_alive(pid: int, started: float | None) -> bool:
    """Whether the process `pid` that started at `started` (None: unknown) still runs on this machine."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # dead, only not yet reaped by its parent
            return False
        # create_time is derived from clock ticks since boot: equal to the hundredth for one process
        return started is None or abs(proc.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


def end_dead_runs(root: Path, by: str) -> list[str]:
    """End as KILLED every RUNNING run of this project's experiment whose process is gone from this
    machine; runs owned by other machines are left alone. Returns one line per run ended."""
    if not tracking_enabled():
        return []
    mlflow = configure_mlflow(root)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(env.experiment())
    mine = process_tags()
    query = (f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{mine[HOST_TAG]}'"
             f" and tags.`{PID_NAMESPACE_TAG}` = '{mine[PID_NAMESPACE_TAG]}'")
    ended = []
    for run in client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000):
        tags = run.data.tags
        started = float(tags[PID_STARTED_TAG]) if tags.get(PID_STARTED_TAG) else None
        if process_alive(int(tags[PID_TAG]), started):
            continue
        owner = f"process {tags[PID_TAG]} on {tags[HOST_TAG]}"
        me = f"llmpipe process {os.getpid()} ({by})"
        when = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        client.set_tag(run.info.run_id, ENDED_BY_TAG, me)
        client.set_tag(run.info.run_id, NOTE_TAG, f"Ended as KILLED at {when} by {me}: {owner}, which ran "
                       f"this run, no longer exists (killed by a signal such as SIGKILL, or out of memory) "
                       f"and could not end it.")
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(f"{run.info.run_name} ({run.info.run_id[:8]}): {owner} is gone")
    return ended


# -- tags -----------------------------------------------------------------------------------------

def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def input_hashes(root: Path, stage: str) -> dict[str, str]:
    """The hash DVC recorded for each dep of `stage`: from dvc.lock (outs of upstream stages, or this
    stage's last run) and `.dvc` files; 'unrecorded' where DVC has not seen the path yet."""
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    deps = (dvc_yaml.get("stages", {}).get(stage) or {}).get("deps", [])
    known: dict[str, str] = {}
    lock_path = root / "dvc.lock"
    if lock_path.exists():
        lock = yaml.safe_load(lock_path.read_text()) or {}
        for name, entry in (lock.get("stages") or {}).items():
            for item in (entry.get("outs") or []) + ((entry.get("deps") or []) if name == stage else []):
                known.setdefault(item["path"], item.get("md5") or item.get("hash") or "")
    # .dvc files live next to the raw data they track; never walk .venv or the DVC cache.
    for dvc_file in [*root.glob("*.dvc"), *root.glob("data/**/*.dvc")]:
        if not dvc_file.is_file():
            continue
        spec = yaml.safe_load(dvc_file.read_text()) or {}
        for out in spec.get("outs") or []:
            rel = (dvc_file.parent / out["path"]).relative_to(root).as_posix()
            known.setdefault(rel, out.get("md5", ""))
    return {f"{INPUT_TAG_PREFIX}{dep}": known.get(dep, UNRECORDED) for dep in deps}


def last_runs(root: Path, stages: list[str]) -> dict[str, dict[str, str]]:
    """The newest tracked run of each stage: status, start time, run id ({} where none)."""
    if not tracking_enabled():
        return {}
    mlflow = configure_mlflow(root)
    out: dict[str, dict[str, str]] = {}
    for stage in stages:
        runs = mlflow.search_runs(filter_string=f"tags.stage = '{stage}'", order_by=["start_time DESC"],
                                  max_results=1, output_format="list")
        if runs:
            info = runs[0].info
            started = dt.datetime.fromtimestamp(info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
            out[stage] = {"status": info.status, "started": started, "run_id": info.run_id}
    return out
