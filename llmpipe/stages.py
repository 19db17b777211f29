"""The stage registry and the one way a stage body is run.

A stage is `run(cfg, ctx) -> dict[str, float]`. This module loads the stage's section of params.yaml,
opens its tracked run (tagged with git commit, params hash and DVC input hashes), calls the body,
and writes the returned metrics to `metrics/<stage>.json` and to the tracker. Stage code never
writes its own metrics file nor opens its own run.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from llmpipe import env
from llmpipe.config import StageConfig, ConfigError, flatten, load_section, params_hash, read_params
from llmpipe.io import write_json_atomic
from llmpipe.tracking import NullTracker, Tracker, git_commit, input_hashes, tracked_run


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: str  # "module:Class"
    run: str  # "module:function"
    summary: str

    def load(self) -> tuple[type[StageConfig], Callable[..., dict[str, float]]]:
        return _resolve(self.config), _resolve(self.run)


# In pipeline order; dvc.yaml declares the same stages (a test keeps the two in step).
STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec("ingest", "llmpipe.data.ingest:IngestConfig", "llmpipe.data.ingest:run",
                  "read raw sources into Parquet shards of {id, source, text, meta}"),
        StageSpec("clean", "llmpipe.data.clean:CleanConfig", "llmpipe.data.clean:run",
                  "normalize, strip boilerplate, quality/PII/toxicity filters"),
        StageSpec("dedup", "llmpipe.data.dedup:DedupConfig", "llmpipe.data.dedup:run",
                  "exact and MinHash-LSH near-duplicate removal"),
        StageSpec("tokenizer", "llmpipe.tokenizer.stage:TokenizerConfig", "llmpipe.tokenizer.stage:run",
                  "train a SentencePiece BPE tokenizer and encode packed token shards"),
        StageSpec("pretrain", "llmpipe.train.stage:PretrainConfig", "llmpipe.train.stage:run",
                  "pretrain the decoder-only transformer"),
    ]
}


class PipelineConfig(StageConfig):
    """The `pipeline` section: how the Prefect flow runs the stages."""

    retries: dict[str, int] = Field(default_factory=dict, description="stage name -> retries on failure")
    default_retries: int = Field(0, ge=0, le=10)
    retry_delay_s: float = Field(10.0, ge=0)


@dataclass
class StageContext:
    """What a stage body gets besides its config."""

    root: Path
    name: str
    tracker: Tracker = field(default_factory=NullTracker)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("llmpipe"))

    def path(self, relative: str | Path) -> Path:
        return self.root / relative

    @property
    def workers(self) -> int:
        return env.workers()


def get_stage(name: str) -> StageSpec:
    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
    return STAGES[name]


def load_config(name: str, root: Path) -> StageConfig:
    params_path = root / "params.yaml"
    config_cls, _ = get_stage(name).load()
    return load_section(config_cls, read_params(params_path), name, params_path)


def load_pipeline_config(root: Path) -> PipelineConfig:
    params_path = root / "params.yaml"
    return load_section(PipelineConfig, read_params(params_path), "pipeline", params_path)


def run_stage(name: str, root: Path) -> dict[str, float]:
    """Run one stage body with tracking; returns (and records) its metrics."""
    spec = get_stage(name)
    config_cls, body = spec.load()
    params_path = root / "params.yaml"
    cfg = load_section(config_cls, read_params(params_path), name, params_path)
    tags = {"stage": name, "git_commit": git_commit(root), "params_hash": params_hash(cfg),
            **input_hashes(root, name)}
    log = logging.getLogger(f"llmpipe.{name}")
    with tracked_run(root, name, tags) as tracker:
        tracker.log_params(flatten(cfg))
        metrics = body(cfg, StageContext(root=root, name=name, tracker=tracker, log=log))
        metrics = {k: float(v) for k, v in sorted(metrics.items())}
        metrics_file = root / "metrics" / f"{name}.json"
        write_json_atomic(metrics_file, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(metrics_file)
    return metrics


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["STAGES", "StageSpec", "StageContext", "PipelineConfig", "ConfigError", "get_stage", "load_config",
           "load_pipeline_config", "run_stage"]
