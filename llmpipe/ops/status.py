"""`llmpipe status`: one view of where the project stands, for the servers it is configured with.

Four parts, each read from the component that owns it, never from a copy of our own:
- servers: the MLflow, Prefect and S3 endpoints in effect, with the URL of each UI;
- pipeline runs: the last flow runs as Prefect records them (a configured server), else the last
  pipeline runs as MLflow records them (the embedded store);
- stages: what DVC finds stale, and each stage's last tracked run;
- registry: the version the `production` alias points at.
A part whose server does not answer says so in its own lines; the rest still shows.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path

from llmpipe import env

RUNS_SHOWN = 5


def servers(root: Path) -> list[str]:
    """Each server in effect: what it is, where, and its UI."""
    from llmpipe.tracking import tracking_uri

    mlflow_uri = tracking_uri(root)
    mlflow_ui = "the same URL" if mlflow_uri.startswith("http") else f"mlflow ui --backend-store-uri {mlflow_uri}"
    prefect_api = os.environ.get("PREFECT_API_URL")
    prefect = (f"{prefect_api}  (UI: {prefect_api.removesuffix('/').removesuffix('/api')})" if prefect_api
               else "ephemeral (started per run; set PREFECT_API_URL for a server)")
    s3 = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
          or os.environ.get("AWS_ENDPOINT_URL"))
    return [f"MLflow   {mlflow_uri}  (UI: {mlflow_ui})",
            f"Prefect  {prefect}",
            f"S3       {s3 or 'none (artifacts on local disk)'}",
            f"DVC      remote: {dvc_remote(root) or 'none (the local cache only)'}"]


def dvc_remote(root: Path) -> str | None:
    """The default DVC remote's URL, None when the project has none."""
    from llmpipe.pipeline import _dvc

    try:
        listed = _dvc(root, ["remote", "list"]).split("\n")
        default = _dvc(root, ["remote", "default"]).strip()
    except Exception:  # no remote configured: `dvc remote default` fails
        return None
    urls = dict(line.split(None, 1) for line in listed if line.strip())
    return f"{default} {urls.get(default, '').strip()}".strip() if default else None


def prefect_runs(limit: int = RUNS_SHOWN) -> list[str]:
    """The last flow runs of llmpipe's flows on the configured Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    names = ["llmpipe", "llmpipe-stage", "llmpipe-promote"]
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=names)))}
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=names)),
                                     sort=FlowRunSort.START_TIME_DESC, limit=limit) if flows else []
    return [f"{_when(r.start_time or r.expected_start_time)}  {flows.get(r.flow_id, '?'):<15} {r.name:<24} "
            f"{r.state_name or '?'}" + (" (deployment)" if r.deployment_id else "") for r in runs]


def mlflow_runs(root: Path, limit: int = RUNS_SHOWN) -> list[str]:
    """The last pipeline runs as MLflow recorded them (the parent run of each `llmpipe run`)."""
    from llmpipe.tracking import configure_mlflow, tracking_enabled

    if not tracking_enabled():
        return ["(tracking is off: LLMPIPE_TRACKING=off)"]
    runs = configure_mlflow(root).search_runs(filter_string="tags.stage = 'pipeline'", order_by=["start_time DESC"],
                                              max_results=limit, output_format="list")
    return [f"{_when(dt.datetime.fromtimestamp(r.info.start_time / 1000))}  {r.info.status:<9} "
            f"{r.info.run_id[:8]}  stages: {r.data.tags.get('stages', '?')}" for r in runs]


def production(root: Path) -> list[str]:
    from llmpipe.package.registry import alias_version, project_registry

    client, name, _ = project_registry(root)
    version = alias_version(client, name, "production")
    return [f"{name}: production = version {version}" if version is not None
            else f"{name}: no production version yet (`llmpipe promote` after the package stage)"]


def stack() -> list[str]:
    """The services of `llmpipe up` on this machine (LLMPIPE_STACK_DIR), when a stack was ever started."""
    from llmpipe.ops.stack import running, service_urls

    where = env.stack_dir()
    urls, alive = service_urls(where), running(where)
    return [f"{name:<9}{'running' if alive.get(name) else 'stopped':<9}{urls.get(name, '')}" for name in alive]


def report(root: Path) -> list[str]:
    """The whole view, section by section."""
    from llmpipe.pipeline import status_rows

    has_prefect = bool(os.environ.get("PREFECT_API_URL"))
    sections: list[tuple[str, Callable[[], list[str]]]] = [
        ("servers", lambda: servers(root)),
        ("pipeline runs (Prefect)" if has_prefect else "pipeline runs (MLflow)",
         prefect_runs if has_prefect else lambda: mlflow_runs(root)),
        ("stages (staleness from DVC, last run from MLflow)", lambda: status_rows(root)),
        ("registry", lambda: production(root)),
    ]
    if (env.stack_dir() / "stack.json").exists():
        sections.insert(1, (f"stack ({env.stack_dir()})", stack))
    lines: list[str] = []
    for title, read in sections:
        lines.append(f"== {title}")
        lines.extend("  " + row for row in _answer_or_why(read, title))
    return lines


def _answer_or_why(read: Callable[[], list[str]], title: str) -> list[str]:
    """A section's rows, or one row saying why its server did not answer (the other sections still show)."""
    try:
        return read() or ["(none yet)"]
    except Exception as exc:  # a server down or refusing us is part of the status, not a crash
        if env.debug_or_off():
            raise
        return [f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]]


def _when(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "not started".ljust(19)
