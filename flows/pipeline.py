"""The pipeline as a Prefect flow: one task per DVC stage, in dependency order.

DVC decides what is stale (a task whose stage is up to date returns at once); Prefect adds states,
retries, logs and a UI; MLflow gets one parent run per flow run, under which every stage process
opens its nested run (the parent's id travels in LLMPIPE_PARENT_RUN_ID). Wiring only: the work
is in llmpipe.pipeline and the stage modules.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, get_run_logger, task

from llmpipe import env
from llmpipe.errors import UserError
from llmpipe.pipeline import check_run, is_stale, repro
from llmpipe.stages import load_pipeline_config
from llmpipe.tracking import PARENT_RUN_ENV, git_commit, tracked_run


class UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task or flow with the exception's traceback; for a user error (a stage
    that failed, whose own error is in the message) the traceback is our plumbing, not the problem.
    `--debug` keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError) and not env.debug_or_off():
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):  # the loggers of Prefect's task and flow engines
    logging.getLogger(_name).addFilter(UserErrorsWithoutTraceback())


@task(task_run_name="{stage}")
def run_dvc_stage(root: str, stage: str, force: bool, parent_run_id: str | None) -> str:
    """Reproduce one stage if DVC finds it stale (or it is forced); returns what happened."""
    logger = get_run_logger()
    stale, why = is_stale(Path(root), stage)
    if not stale and not force:
        logger.info("%s is up to date: skipped", stage)
        return "up to date"
    logger.info("%s: %s", stage, "forced" if force and not stale else why)
    env = {PARENT_RUN_ENV: parent_run_id} if parent_run_id else {}
    repro(Path(root), stage, force=force, env=env, on_line=logger.info)
    return "ran (forced)" if force and not stale else "ran"


def run_on_pool(root: str, stage: str, force: bool, parent_run_id: str | None, pool_role: str,
                retries: int = 0, retry_delay_s: float = 0) -> str:
    """Run one stage as an `llmpipe-stage/<cpu|gpu>` flow run on a worker of its pool (a new run per
    retry), wait for it, and write the records it hands back (dvc.lock, metrics, plots) into this
    checkout. The stage runs in the worker's own checkout (its deployment's `root`): no disk is
    shared, data goes through DVC."""
    import time

    from prefect.deployments import run_deployment

    from llmpipe.ops.deploy import LOCK_FILE, stage_records_from, write_records

    logger = get_run_logger()
    lock_path = Path(root) / LOCK_FILE
    parameters = {"stage": stage, "force": force, "parent_run_id": parent_run_id,
                  "lock": lock_path.read_text() if lock_path.exists() else None}
    for attempt in range(retries + 1):
        child = run_deployment(f"llmpipe-stage/{pool_role}", parameters=parameters, timeout=None)
        if child.state and child.state.is_completed():
            break
        state = child.state.name if child.state else "unknown"
        why = (f"stage {stage}: its flow run {child.name} ({child.id}) on the {pool_role} pool ended {state}"
               f"{': ' + child.state.message if child.state and child.state.message else ''}; see its logs")
        if attempt == retries:
            raise UserError(why)
        logger.warning("%s; retry %d of %d in %g s", why, attempt + 1, retries, retry_delay_s)
        time.sleep(retry_delay_s)
    handed_back = stage_records_from(child.id)
    write_records(Path(root), handed_back["records"])
    return f"{handed_back['result']} (on the {pool_role} pool)"


@flow(name="llmpipe", log_prints=True)
def pipeline(root: str, until: str | None = None, force: list[str] | None = None,
             pools: bool = False) -> dict[str, str]:
    """Run the DVC stages up to `until`, forcing the stages named in `force`; with `pools`, each stage
    as its own flow run on the work pool params.yaml gives it (`llmpipe deploy`), else in this process."""
    project = Path(root)
    stages = check_run(project, until, force or [])
    settings = load_pipeline_config(project)
    results: dict[str, str] = {}
    with tracked_run(project, "pipeline", {"git_commit": git_commit(project), "stages": ",".join(stages)}) as tracker:
        for stage in stages:
            if pools:
                role = "gpu" if stage in settings.gpu_stages else "cpu"
                results[stage] = run_on_pool(root, stage, stage in (force or []), tracker.run_id, role,
                                             settings.retries.get(stage, settings.default_retries),
                                             settings.retry_delay_s)
                continue
            retries = settings.retries.get(stage, settings.default_retries)
            stage_task = run_dvc_stage.with_options(retries=retries, retry_delay_seconds=settings.retry_delay_s)
            results[stage] = stage_task(root, stage, stage in (force or []), tracker.run_id)
        tracker.set_tags({f"result.{k}": v for k, v in results.items()})
    return results


if __name__ == "__main__":
    import sys

    from llmpipe.io import project_root

    print(pipeline(str(project_root()), until=sys.argv[1] if len(sys.argv) > 1 else None))
