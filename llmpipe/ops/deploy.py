"""Deployments on a Prefect server: work pools, the deployed flows, the stage exchange and zombie recovery.

`deploy(root)` is `llmpipe deploy`: it creates the work pools that are missing (CPU stages on a
process pool, GPU stages on a Kubernetes pool, llmpipe/ops/pools.py), registers the deployments of
flows/deployments.py from this checkout, and the automation that reschedules a flow run whose
machine died. `serve_flows(root)` is `llmpipe serve-flows`: the same flows served from one process.

Stages on different machines share no disk. A stage's run on a worker (`run_stage_here`, the body
of the `llmpipe-stage` flow) pulls its inputs from the DVC remote, reproduces the stage, pushes its
outputs, and hands back what DVC does not cache (dvc.lock, the stage's metrics and plots) as the
records the orchestrating pipeline flow writes into its own checkout. Without a DVC remote (`dvc
remote list` empty) every machine is this one: nothing is pulled or pushed.

A worker killed with its machine leaves its flow run Running for ever. Prefect 3's answer is flow
run heartbeats (every PREFECT_FLOWS_HEARTBEAT_FREQUENCY s, at least 30, sent by the flow run's own
process) and a proactive automation on the missing heartbeat; ours sets such a run back to
Scheduled, so the next worker of its pool runs it again and DVC skips what was already finished.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import yaml

from llmpipe.errors import UserError
from llmpipe.pipeline import _dvc, is_stale, repro
from llmpipe.stages import get_stage, load_pipeline_config
from llmpipe.tracking import PARENT_RUN_ENV

POOL_TYPES = {"cpu": "process", "gpu": "kubernetes"}
ZOMBIE_AUTOMATION = "llmpipe: reschedule flow runs whose heartbeat stopped"
RECORDS_ARTIFACT = "llmpipe-stage-records"
LOCK_FILE = "dvc.lock"


# --- one stage on a worker: the DVC exchange -------------------------------------------------------

def has_dvc_remote(root: Path) -> bool:
    return bool(_dvc(root, ["remote", "list"]).strip())


def upstream_outputs(root: Path, stage: str) -> list[str]:
    """The deps of `stage` in dvc.yaml that another stage writes (what a fresh machine must pull)."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    written = {_out_path(out) for name, spec in stages.items() if name != stage for out in spec.get("outs") or []}
    return [dep for dep in stages.get(stage, {}).get("deps") or [] if dep in written]


def records(root: Path, stage: str) -> dict[str, str]:
    """What DVC does not carry for `stage` (dvc.lock, the uncached metrics and plots): path -> text."""
    spec = get_stage(stage)
    paths = [LOCK_FILE, spec.metrics_file, *spec.plots]
    return {path: (root / path).read_text() for path in paths if (root / path).exists()}


def write_records(root: Path, texts: dict[str, str]) -> None:
    for relative, text in texts.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def run_stage_here(root: Path, stage: str, *, force: bool, parent_run_id: str | None, lock: str | None,
                   log: Callable[[str], None] = print) -> tuple[str, dict[str, str]]:
    """Reproduce `stage` in this checkout, exchanging data through the DVC remote when there is one.
    `lock` is the orchestrator's dvc.lock, so DVC here judges staleness as it would there. Returns
    (what happened, records)."""
    if lock is not None:
        (root / LOCK_FILE).write_text(lock)
    else:  # the orchestrator has run nothing yet: neither has this checkout, whatever its old lock says
        (root / LOCK_FILE).unlink(missing_ok=True)
    remote = has_dvc_remote(root)
    inputs = upstream_outputs(root, stage)
    if remote and inputs:
        log(f"{stage}: dvc pull {' '.join(inputs)}")
        _dvc(root, ["pull", *inputs])
    stale, why = is_stale(root, stage)
    if not stale and not force:
        log(f"{stage} is up to date: skipped")
        return "up to date", records(root, stage)
    log(f"{stage}: {'forced' if force and not stale else why}")
    repro(root, stage, force=force, env={PARENT_RUN_ENV: parent_run_id} if parent_run_id else {}, on_line=log)
    if remote:
        log(f"{stage}: dvc push")
        _dvc(root, ["push", stage])
    return ("ran (forced)" if force and not stale else "ran"), records(root, stage)


def _out_path(out: str | dict) -> str:
    return out if isinstance(out, str) else next(iter(out))


# --- pools, deployments, the zombie automation -----------------------------------------------------

def ensure_pools(root: Path) -> list[str]:
    """Create the pipeline's work pools that do not exist yet (an existing pool, maybe of another type
    a user chose, is left as it is). Returns the pools created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    from llmpipe.ops.pools import template

    settings = load_pipeline_config(root)
    created = []
    with get_client(sync_client=True) as client:
        for role, name in settings.pools.items():
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                pool_type = POOL_TYPES[role]
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type,
                                                       base_job_template=template(pool_type)))
                created.append(f"work pool {name} ({pool_type})")
    return created


def zombie_automation(within_s: float):
    """Prefect's "detect zombie flows" automation, acting by rescheduling: a flow run that sent a
    heartbeat and then neither another one nor a final state within `within_s`."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    final = ["prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
             "prefect.flow-run.Crashed"]
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="The flow run's process stopped sending heartbeats (its machine or worker died): run it again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        # Forced: the run is still Running on the server, and Running -> Scheduled is no normal move.
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                                    message="no heartbeat from the flow run's process: rescheduled")],
    )


def ensure_zombie_automation(within_s: float | None = None) -> str:
    """Create (or replace) the automation; `within_s` defaults to three heartbeat periods."""
    from prefect.automations import Automation
    from prefect.settings import get_current_settings

    heartbeat = get_current_settings().flows.heartbeat_frequency or 180
    within_s = within_s if within_s is not None else 3 * heartbeat
    try:
        Automation.read(name=ZOMBIE_AUTOMATION).delete()
    except ValueError:  # none yet
        pass
    zombie_automation(within_s).create()
    return f"automation '{ZOMBIE_AUTOMATION}' (after {within_s:.0f} s without a heartbeat)"


def deploy(root: Path, zombie_after_s: float | None = None, only: tuple[str, ...] = ()) -> list[str]:
    """`llmpipe deploy`: the work pools, the deployments and the zombie automation on the configured
    Prefect server (PREFECT_API_URL). `only` names the deployments to (re)register, e.g. ("gpu",) from
    the checkout of a GPU machine whose path differs. Returns one line per thing created or updated."""
    from flows.deployments import deployments

    _check_server()
    created = ensure_pools(root)
    for deployment_id, name in _apply(root, deployments(root, only)):
        created.append(f"deployment {name} ({deployment_id})")
    created.append(ensure_zombie_automation(zombie_after_s))
    return created


def serve_flows(root: Path) -> None:
    """`llmpipe serve-flows`: the pipeline's scheduled flows served by this one process, every stage
    in it (no pools, no workers: a single machine). Blocks until stopped."""
    from prefect import serve

    from flows.deployments import served

    serve(*served(root))


def _apply(root: Path, specs) -> list[tuple[str, str]]:
    from prefect import flow as prefect_flow

    applied = []
    for spec in specs:
        remote_flow = prefect_flow.from_source(str(root), spec.entrypoint)
        with contextlib.redirect_stdout(io.StringIO()):  # Prefect's tables; deploy() reports each one
            deployment_id = remote_flow.deploy(name=spec.name, work_pool_name=spec.pool, cron=spec.cron,
                                               parameters=spec.parameters, description=spec.description,
                                               tags=["llmpipe"], print_next_steps=False)
        applied.append((str(deployment_id), f"{remote_flow.name}/{spec.name}"))
    return applied


def _check_server() -> None:
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise UserError("PREFECT_API_URL is not set: point it at the Prefect server to deploy to "
                        "(`llmpipe up` writes it to its credentials file), e.g. "
                        "`set -a; . ~/.llmpipe/stack/credentials.env; set +a`")


def stage_records_from(flow_run_id) -> dict:
    """What a finished `llmpipe-stage` flow run left as its artifact: {"result": ..., "records": {path: text}}."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=[RECORDS_ARTIFACT])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    if not artifacts:
        raise UserError(f"flow run {flow_run_id} of llmpipe-stage left no records artifact")
    data = max(artifacts, key=lambda a: a.created).data  # a rerun's records replace the killed attempt's
    return json.loads(data) if isinstance(data, str) else data


__all__ = ["deploy", "serve_flows", "run_stage_here", "ensure_pools", "ensure_zombie_automation",
           "stage_records_from"]
