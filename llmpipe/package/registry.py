"""The MLflow model registry: register a packaged model once, promote it through the gate, roll back.

A version carries everything the gate and `llmpipe models` need as its own tags, so they never depend
on the source run still existing: `llmpipe.content_sha256` (the packaged files' hash, which makes
registration idempotent), one `metric.<key>` tag per eval metric, and the lineage tags given.

Two aliases: `production` (what serving loads, `models:/<name>@production`) and `previous` (what
`llmpipe rollback` returns to). A promotion moves `previous` first and `production` second, so a
process killed in between leaves `production` on the old version, which still loads.
Every decision is recorded on a version as a JSON tag (`llmpipe.promotion`, `llmpipe.rollback`).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llmpipe.errors import UserError
from llmpipe.package.gate import GateSettings, Rule, check, is_accuracy, is_bpb, is_contamination

CONTENT_TAG = "llmpipe.content_sha256"
METRIC_PREFIX = "metric."
PROMOTION_TAG = "llmpipe.promotion"
ROLLBACK_TAG = "llmpipe.rollback"
PRODUCTION = "production"
PREVIOUS = "previous"
DECISION_TAGS = (PROMOTION_TAG, ROLLBACK_TAG)

T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """A registered version as the gate sees it: read back from the version's tags alone."""

    name: str
    version: int
    content_sha256: str
    metrics: dict[str, float]
    tags: dict[str, str]


@dataclass(frozen=True)
class Decision:
    """What promote or rollback did, with the numbers it decided on."""

    name: str
    action: str  # "promote" or "rollback"
    outcome: str  # "promoted", "refused" or "rolled back"
    version: int  # the candidate, or the version rolled back to
    production_before: int | None
    production_after: int | None
    rules: list[Rule] = field(default_factory=list)
    time: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome != "refused"

    def to_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if k != "rules"}
        return json.dumps({**data, "rules": [r.to_dict() for r in self.rules]}, sort_keys=True)

    def lines(self) -> list[str]:
        """What the CLI prints: the outcome, then every rule (on a refusal only the failing ones)."""
        before = "none" if self.production_before is None else f"version {self.production_before}"
        head = f"{self.name} version {self.version}: {self.outcome} (production was {before}"
        head += f", now version {self.production_after})" if self.production_after is not None else ")"
        shown = self.rules if self.passed else [r for r in self.rules if not r.passed]
        return [head] + ["  " + r.describe() for r in shown]


def retry_locked(write: Callable[[], T], attempts: int = 20, wait_s: float = 0.25) -> T:
    """Run a registry write, retrying while SQLite says another writer holds the database."""
    for attempt in range(attempts):
        try:
            return write()
        except Exception as exc:
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _versions(client: Any, name: str) -> list[Any]:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def project_registry(root: Path) -> tuple[Any, str, GateSettings]:
    """The project's MLflow client, its registered model's name (`package.registered_model`) and the
    `promote` gate, from params.yaml."""
    from llmpipe.config import load_stage_config
    from llmpipe.package.package import PackageConfig
    from llmpipe.tracking import configure_mlflow

    params = root / "params.yaml"
    name = load_stage_config(PackageConfig, "package", params).registered_model
    return configure_mlflow(root).MlflowClient(), name, load_stage_config(GateSettings, "promote", params)


def find_version(client: Any, name: str, content_sha256: str) -> int | None:
    """The version of `name` that holds this content, if one does (checked before logging it again)."""
    for existing in _versions(client, name):
        if existing.tags.get(CONTENT_TAG) == content_sha256:
            return int(existing.version)
    return None


def register(client: Any, model_uri: str, name: str, content_sha256: str, metrics: dict[str, float],
             tags: dict[str, str]) -> tuple[int, bool]:
    """Register `model_uri` as a new version of `name`, unless a version holds the same content.

    Returns (version, created). Registration goes through `mlflow.register_model`, which uses the tracking
    URI that `configure_mlflow` set (the same store as `client`).
    """
    import mlflow

    existing = find_version(client, name, content_sha256)
    if existing is not None:
        return existing, False
    version_tags = {**tags, CONTENT_TAG: content_sha256,
                    **{METRIC_PREFIX + k: repr(float(v)) for k, v in metrics.items()}}
    created = retry_locked(lambda: mlflow.register_model(model_uri, name, tags=version_tags))
    return int(created.version), True


def read_version(client: Any, name: str, version: int) -> Candidate:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise UserError(f"registered model {name!r} has no version {version}: `llmpipe models` lists them") from None
    metrics = {k[len(METRIC_PREFIX):]: float(v) for k, v in mv.tags.items() if k.startswith(METRIC_PREFIX)}
    return Candidate(name, int(mv.version), mv.tags.get(CONTENT_TAG, ""), metrics, dict(mv.tags))


def alias_version(client: Any, name: str, alias: str) -> int | None:
    """The version `alias` points at, None when it is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _newest(client: Any, name: str) -> int:
    versions = _versions(client, name)
    if not versions:
        raise UserError(f"registered model {name!r} has no versions: run the package stage first "
                        f"(`dvc repro package`), or set package.registered_model in params.yaml")
    return int(versions[-1].version)


def _set_alias(client: Any, name: str, alias: str, version: int) -> None:
    retry_locked(lambda: client.set_registered_model_alias(name, alias, str(version)))


def _record(client: Any, decision: Decision, version: int, tag: str) -> None:
    retry_locked(lambda: client.set_model_version_tag(decision.name, str(version), tag, decision.to_json()))


def promote(client: Any, name: str, version: int | None, gate: GateSettings) -> Decision:
    """Gate `version` (None: the newest) against `production`; on a pass move `previous`, then `production`."""
    version = _newest(client, name) if version is None else version
    candidate = read_version(client, name, version)
    before = alias_version(client, name, PRODUCTION)
    if before == version:
        raise UserError(f"{name} version {version} is already production; nothing to promote")
    reference = None if before is None else read_version(client, name, before).metrics
    rules = check(candidate.metrics, reference, gate)
    if all(r.passed for r in rules):
        # `previous` first: dying between the two writes must leave production where it was.
        if before is not None:
            _set_alias(client, name, PREVIOUS, before)
        _set_alias(client, name, PRODUCTION, version)
        decision = Decision(name, "promote", "promoted", version, before, version, rules, _now())
    else:
        decision = Decision(name, "promote", "refused", version, before, before, rules, _now())
    _record(client, decision, version, PROMOTION_TAG)
    return decision


def rollback(client: Any, name: str) -> Decision:
    """Point `production` back at `previous`, and `previous` at the version rolled back from."""
    current = alias_version(client, name, PRODUCTION)
    target = alias_version(client, name, PREVIOUS)
    if current is None or target is None or target == current:
        raise UserError(f"{name} has no version to roll back to (production: {current}, previous: {target}); "
                        "`llmpipe models` shows the versions, `llmpipe promote --version N` picks one")
    # production first: a failure in between leaves both aliases on `target`, a loadable version.
    _set_alias(client, name, PRODUCTION, target)
    _set_alias(client, name, PREVIOUS, current)
    decision = Decision(name, "rollback", "rolled back", target, current, target, [], _now())
    _record(client, decision, current, ROLLBACK_TAG)
    return decision


def _key_metrics(metrics: dict[str, float]) -> dict[str, str]:
    shown = {k: v for k, v in sorted(metrics.items()) if is_bpb(k) or is_accuracy(k) or is_contamination(k)}
    return {k: f"{v:.4g}" for k, v in shown.items()}


def versions_table(client: Any, name: str) -> list[dict]:
    """One row per version, newest first: version, aliases, created, key metrics, lineage tags."""
    versions = _versions(client, name)
    # search_model_versions leaves `aliases` empty on the SQLite store; the registered model has them all.
    aliases: dict[int, list[str]] = {}
    for alias, number in (client.get_registered_model(name).aliases if versions else {}).items():
        aliases.setdefault(int(number), []).append(alias)
    rows = []
    for mv in reversed(versions):
        metrics = {k[len(METRIC_PREFIX):]: float(v) for k, v in mv.tags.items() if k.startswith(METRIC_PREFIX)}
        lineage = {k: v for k, v in sorted(mv.tags.items())
                   if not k.startswith(METRIC_PREFIX) and k not in DECISION_TAGS}
        created = dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.timezone.utc)
        rows.append({"version": int(mv.version), "aliases": ",".join(sorted(aliases.get(int(mv.version), []))),
                     "created": created.strftime("%Y-%m-%d %H:%M"), "metrics": _key_metrics(metrics),
                     "lineage": lineage})
    return rows


def format_versions(rows: list[dict]) -> str:
    """The terminal table of `llmpipe models`: one line per version, its metrics and lineage indented below."""
    if not rows:
        return "no versions registered yet"
    lines = [f"{'version':>7}  {'aliases':<20} {'created (UTC)':<17}"]
    for row in rows:
        lines.append(f"{row['version']:>7}  {row['aliases'] or '-':<20} {row['created']:<17}")
        lines += [f"{'':9}{k} = {v}" for k, v in row["metrics"].items()]
        lines += [f"{'':9}{k}: {v[:80]}" for k, v in row["lineage"].items()]
    return "\n".join(lines)
