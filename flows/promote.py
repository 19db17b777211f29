"""Promotion as a Prefect flow: the gate on a registered version, then the `production` alias.

Its own flow, not a stage of the pipeline, because it acts on the registry rather than on files:
run it by hand (`python -m flows.promote`, or `llmpipe promote`, the same code), or on a schedule as a
deployment. A refused promotion ends the flow run Failed, with each failing rule in its log. Wiring
only: the gate and the alias moves are in llmpipe/package/registry.py (through llmpipe.pipeline).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger

from llmpipe.errors import UserError
from llmpipe.pipeline import promote as promote_version


@flow(name="llmpipe-promote", log_prints=True)
def promote(root: str, version: int | None = None) -> dict:
    """Promote `version` (default: the newest) of the project's registered model if it passes the gate."""
    logger = get_run_logger()
    decision = promote_version(Path(root), version)
    for line in decision.lines():
        logger.info(line)
    if not decision.passed:
        raise UserError(f"promotion refused: {'; '.join(decision.lines())}")
    return json.loads(decision.to_json())


if __name__ == "__main__":
    from llmpipe.io import project_root

    print(promote(str(project_root())))
