"""One DVC stage as its own flow, for a worker of the stage's work pool (`llmpipe-stage/cpu`, `/gpu`).

The deployed pipeline (flows/pipeline.py with pools=True) starts one run of it per stage. It pulls the
stage's inputs from the DVC remote, reproduces the stage, pushes its outputs, and leaves dvc.lock and
the stage's metrics and plots as an artifact for the orchestrator: no disk is shared. Wiring only:
the work is in llmpipe/ops/deploy.py (run_stage_here).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import Artifact

from llmpipe.ops.deploy import RECORDS_ARTIFACT, run_stage_here


@flow(name="llmpipe-stage", flow_run_name="{stage}", log_prints=True)
def stage_flow(root: str, stage: str, force: bool = False, parent_run_id: str | None = None,
               lock: str | None = None) -> str:
    """Reproduce `stage` of the project at `root` on this worker if DVC finds it stale (or it is forced)."""
    logger = get_run_logger()
    result, records = run_stage_here(Path(root), stage, force=force, parent_run_id=parent_run_id, lock=lock,
                                     log=logger.info)
    Artifact(type=RECORDS_ARTIFACT, data={"result": result, "records": records},
             description=f"dvc.lock, metrics and plots of {stage}").create()
    return result
