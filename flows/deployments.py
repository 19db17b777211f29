"""The deployments `llmpipe deploy` registers and `llmpipe serve-flows` serves. Wiring only.

- llmpipe/full: the whole pipeline on a cron schedule (params.yaml pipeline.schedule), each stage on
  its pool (pools=True: one llmpipe-stage run per stage).
- llmpipe/data-refresh: the data stages, ingest to dedup (on demand: `prefect deployment run`).
- llmpipe-evaluate-promote/default: the stages up to package that are stale (a new model is
  evaluated, quantized and registered), then the promotion gate.
- llmpipe-stage/cpu and llmpipe-stage/gpu: one stage on a worker of the cpu or gpu pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow

from flows.pipeline import pipeline
from flows.promote import promote
from llmpipe.stages import load_pipeline_config


@flow(name="llmpipe-evaluate-promote", log_prints=True)
def evaluate_promote(root: str, pools: bool = False) -> dict:
    """The stale stages up to package (DVC skips the rest), then promotion of the newest version."""
    pipeline(root=root, until="package", pools=pools)
    return promote(root=root)


@dataclass(frozen=True)
class DeploymentSpec:
    entrypoint: str  # "flows/x.py:function", relative to the project root
    name: str
    pool: str
    parameters: dict = field(default_factory=dict)
    cron: str | None = None
    description: str = ""


def deployments(root: Path, only: tuple[str, ...] = ()) -> list[DeploymentSpec]:
    """What `llmpipe deploy` registers: the orchestrating flows on the cpu pool, the stage flow on both
    (`only`: just the deployments of these names, e.g. a worker machine's own `cpu`)."""
    settings = load_pipeline_config(root)
    cpu, gpu = settings.pools["cpu"], settings.pools["gpu"]
    base = {"root": str(root), "pools": True}
    stage_root = {"root": str(root)}  # where the workers' checkout is: a GPU node's is at the same path
    specs = [
        DeploymentSpec("flows/pipeline.py:pipeline", "full", cpu, base, settings.schedule,
                       "the whole pipeline, every stage on its work pool"),
        DeploymentSpec("flows/pipeline.py:pipeline", "data-refresh", cpu, {**base, "until": "dedup"},
                       description="the data stages, ingest to dedup"),
        DeploymentSpec("flows/deployments.py:evaluate_promote", "default", cpu, base,
                       description="stale stages up to package, then the promotion gate"),
        DeploymentSpec("flows/stage.py:stage_flow", "cpu", cpu, stage_root, description="one stage on a CPU worker"),
        DeploymentSpec("flows/stage.py:stage_flow", "gpu", gpu, stage_root, description="one stage on a GPU worker"),
    ]
    return [spec for spec in specs if not only or spec.name in only]


def served(root: Path) -> list:
    """The same orchestrating flows for `serve` on one machine: every stage runs in the serving process.
    Their names end in `-local`: a deployment `llmpipe deploy` registered keeps its pull steps when
    `serve` updates it under the same name, and its runs would then look for code where there is none."""
    settings = load_pipeline_config(root)
    base = {"root": str(root), "pools": False}
    return [
        pipeline.to_deployment(name="full-local", cron=settings.schedule, parameters=base),
        pipeline.to_deployment(name="data-refresh-local", parameters={**base, "until": "dedup"}),
        evaluate_promote.to_deployment(name="local", parameters=base),
    ]
