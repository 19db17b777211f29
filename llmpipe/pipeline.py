"""DVC-side operations the orchestrator and the CLI share: stage order, staleness, repro, status.

DVC is the single judge of what is stale; the Prefect flow (flows/pipeline.py) only asks it.
DVC is driven through its CLI in a subprocess so a stage runs exactly as under `dvc repro`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from llmpipe.errors import UserError


class StageFailed(UserError):
    """A stage's process failed under dvc repro; the message ends with the stage's last output, whose
    own error says what went wrong there."""


def dvc_executable() -> str:
    """The dvc next to this interpreter (the project venv), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    if local.exists():
        return str(local)
    found = shutil.which("dvc")
    if not found:
        raise UserError("dvc not found: install llmpipe's dependencies (scripts/install.sh)")
    return found


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for dvc and its stage commands: this interpreter's bin dir first on PATH, so
    `llmpipe stage X` in dvc.yaml resolves to this installation even when the venv is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **(extra or {})}


def stage_order(root: Path) -> list[str]:
    """Stages of dvc.yaml in file order (which the project keeps topological; a test checks it)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    return list((spec.get("stages") or {}).keys())


def select_stages(root: Path, until: str | None) -> list[str]:
    order = stage_order(root)
    if until is None:
        return order
    if until not in order:
        raise UserError(f"--until {until}: no such stage in {root / 'dvc.yaml'} (stages: {', '.join(order)})")
    return order[: order.index(until) + 1]


def check_run(root: Path, until: str | None, force: list[str]) -> list[str]:
    """The stages a run will visit; UserError for what would make it fail before any work."""
    stages = select_stages(root, until)
    unknown = set(force) - set(stages)
    if unknown:
        raise UserError(f"--force {', '.join(sorted(unknown))}: not among the stages to run ({', '.join(stages)})")
    missing = missing_sources(root)
    if missing:
        raise UserError("source data missing: " + ", ".join(map(str, missing))
                         + " (tracked by their .dvc files but not in this workspace: `dvc pull` them from the DVC remote)")
    return stages


def is_stale(root: Path, stage: str) -> tuple[bool, str]:
    """(stale?, why) for one stage, as `dvc status` sees it."""
    out = _dvc(root, ["status", "--json", stage])
    changes = json.loads(out or "{}")
    if not changes:
        return False, "up to date"
    return True, _describe_changes(changes)


def repro(root: Path, stage: str, *, force: bool, env: dict[str, str] | None = None,
          on_line: Callable[[str], None] = print) -> None:
    """`dvc repro --single-item STAGE`, streaming its output line by line; raises on failure."""
    cmd = [dvc_executable(), "repro", "--single-item", stage] + (["--force"] if force else [])
    # Every progress-bar redraw becomes a log line here: one every 10 s is enough for a log.
    env = {"TQDM_MININTERVAL": "10", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=root, env=venv_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        on_line(line)
        tail = (tail + [line])[-30:]
    if proc.wait() != 0:
        raise StageFailed(f"stage {stage} failed (dvc repro exit {proc.returncode}); last output:\n" + "\n".join(tail))


def missing_sources(root: Path) -> list[Path]:
    """Data tracked by .dvc files (a user's raw sources) that is absent from the workspace. (The demo
    corpus is no such file: the demo stage produces it.)"""
    missing = []
    for dvc_file in sorted(root.glob("data/**/*.dvc")):
        for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []:
            path = dvc_file.parent / out["path"]
            if not path.exists():
                missing.append(path)
    return missing


def status_rows(root: Path) -> list[str]:
    """One line per stage: DVC staleness and the last tracked run."""
    from llmpipe.tracking import last_runs

    stages = stage_order(root)
    runs = last_runs(root, stages)
    rows = [f"{'stage':<10} {'dvc':<40} last run"]
    for stage in stages:
        stale, why = is_stale(root, stage)
        state = f"stale: {why}" if stale else "up to date"
        run = runs.get(stage)
        last = f"{run['status']} {run['started']} ({run['run_id'][:8]})" if run else "never tracked"
        rows.append(f"{stage:<10} {state[:40]:<40} {last}")
    return rows


def dvc_commit(root: Path, dvc_file: Path) -> None:
    """Record data that matches its .dvc file in DVC's cache (a no-op when already there)."""
    _dvc(root, ["commit", "--force", "--quiet", str(dvc_file.relative_to(root))])


def _dvc(root: Path, args: list[str]) -> str:
    proc = subprocess.run([dvc_executable(), *args], cwd=root, capture_output=True, text=True, env=venv_env())
    if proc.returncode != 0:
        raise UserError(f"dvc {' '.join(args)} failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _describe_changes(changes: dict) -> str:
    parts = []
    for entries in changes.values():
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, str):
                parts.append(entry)
            elif isinstance(entry, dict):
                for kind, items in entry.items():
                    names = ", ".join(f"{k} ({v})" for k, v in items.items()) if isinstance(items, dict) else str(items)
                    parts.append(f"{kind}: {names}")
    return "; ".join(parts) or "changed"


def promote(root: Path, version: int | None = None):
    """The gate on a registered version (the newest by default), then the alias moves: what `llmpipe
    promote` and flows/promote.py both run (llmpipe/package/registry.py). Returns the Decision."""
    from llmpipe.package.registry import project_registry
    from llmpipe.package.registry import promote as promote_version

    client, name, gate = project_registry(root)
    return promote_version(client, name, version, gate)
