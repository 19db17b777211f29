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


@flow(name="llmpipe", log_prints=True)
def pipeline(root: str, until: str | None = None, force: list[str] | None = None) -> dict[str, str]:
    """Run the DVC stages up to `until`, forcing the stages named in `force`."""
    project = Path(root)
    stages = check_run(project, until, force or [])
    settings = load_pipeline_config(project)
    results: dict[str, str] = {}
    with tracked_run(project, "pipeline", {"git_commit": git_commit(project), "stages": ",".join(stages)}) as tracker:
        for stage in stages:
            retries = settings.retries.get(stage, settings.default_retries)
            stage_task = run_dvc_stage.with_options(retries=retries, retry_delay_seconds=settings.retry_delay_s)
            results[stage] = stage_task(root, stage, stage in (force or []), tracker.run_id)
        tracker.set_tags({f"result.{k}": v for k, v in results.items()})
    return results


if __name__ == "__main__":
    import sys

    from llmpipe.io import project_root

    print(pipeline(str(project_root()), until=sys.argv[1] if len(sys.argv) > 1 else None))
