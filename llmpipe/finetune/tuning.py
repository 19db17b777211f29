"""What the `sft` and `dpo` stages share: settings, the starting checkpoint, LoRA, chat samples, outputs.

Both stages are the one training loop (llmpipe/train/loop.py) with their own Task: they start from a
checkpoint's weights (`init_from`, a fresh optimizer), train all weights or a LoRA adapter (peft), and
write the same checkpoint format as pretraining, so every later stage takes any of them. The resume
rules are pretraining's (llmpipe/train/pretrain.py: other settings or code are refused) plus the
starting weights: a new base model restarts, it never continues checkpoints made from the old one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.errors import UserError
from llmpipe.io import read_json, sha256_file, write_json_atomic, write_text_atomic
from llmpipe.model import ModelConfig
from llmpipe.stages import StageContext
from llmpipe.train import checkpoint as ckpt
from llmpipe.train.launch import system_metrics
from llmpipe.train.loop import EvalPrompts, TrainConfig, Trainer
from llmpipe.train.pretrain import RESOLVED_CONFIG, check_continuation, loss_csv
from llmpipe.train.settings import TrainSettings
from llmpipe.train import distributed as ddist
from llmpipe.train.task import Task

SAMPLE_PROMPTS = ["Hi! How are you doing today?", "What do you like to do on the weekend?",
                  "I just got back from a trip to the mountains."]


class LoraSection(StageConfig):
    """LoRA through peft: only the low-rank adapters train; final/ holds the merged weights."""

    r: int = Field(8, ge=1, description="rank of the update B @ A")
    alpha: float = Field(16, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(["wq", "wk", "wv", "wo"], min_length=1,
                                      description="linear layers adapted (wq wk wv wo w_gate w_up w_down)")


class FinetuneSettings(TrainSettings):
    """Settings sft and dpo share; their defaults differ from pretraining's only where noted."""

    method: Literal["full", "lora"] = Field("full", description="train every weight, or a LoRA adapter only")
    lora: LoraSection = Field(default_factory=LoraSection)
    sample_prompts: list[str] = Field(SAMPLE_PROMPTS, description="user turns answered at each eval (samples.txt)")
    # fine-tuning takes smaller, fewer steps from weights that already know the language; with AdamW,
    # whose defaults these are (Muon is measured for pretraining only; under LoRA it has no matrix to train)
    optimizer: Literal["adamw", "muon"] = Field("adamw", description="adamw | muon (full fine-tuning only)")
    max_steps: int = Field(150, ge=1, description="optimizer steps")
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    eval_every: int = Field(50, ge=1, description="steps between val metrics and chat samples")
    checkpoint_every: int = Field(50, ge=1, description="steps between resumable checkpoints")
    eval_batches: int = Field(8, ge=1, description="val micro-batches (at most the whole val split)")
    sample_tokens: int = Field(48, ge=0, description="most tokens of each sample reply (0: no samples)")


# -- the starting checkpoint ---------------------------------------------------------------------------

def base_checkpoint(ctx: StageContext, data_meta: dict[str, Any]) -> tuple[Path, ModelConfig, dict[str, Any]]:
    """The checkpoint the stage starts from (its "base" input), its model config and tokenizer reference,
    after checking it was trained on the tokenizer that encoded the chat data."""
    base = ckpt.find_checkpoint(ctx.input("base"))
    ref = ckpt.read_tokenizer_ref(base)
    if ref.get("hash") != data_meta["tokenizer_hash"]:
        raise UserError(f"{base} was trained with tokenizer {ref.get('hash')!r} but {ctx.input('chat')} was encoded "
                        f"with {data_meta['tokenizer_hash']!r}: rerun chat_data (dvc repro chat_data)")
    return base, ckpt.read_model_config(base), ref


def check_seq_len(cfg: TrainSettings, model_cfg: ModelConfig, data_meta: dict[str, Any], section: str) -> None:
    if cfg.seq_len > model_cfg.max_seq_len:
        raise UserError(f"{section}.seq_len ({cfg.seq_len}) exceeds the base model's max_seq_len "
                        f"({model_cfg.max_seq_len}): lower it")
    if data_meta["max_tokens"] > cfg.seq_len:
        raise UserError(f"chat_data.max_tokens ({data_meta['max_tokens']}) exceeds {section}.seq_len ({cfg.seq_len}): "
                        f"conversations would not fit a row; lower chat_data.max_tokens or raise {section}.seq_len")


def lora_adapter(cfg: FinetuneSettings) -> Any:
    if cfg.method != "lora":
        return None
    from llmpipe.finetune.lora import LoraAdapter, LoraSettings

    return LoraAdapter(LoraSettings(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                    target_modules=tuple(cfg.lora.target_modules)))


def files_hash(*paths: Path) -> str:
    """sha256 over the names and contents of the data files a run trains on (its identity on resume)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


# -- chat samples ----------------------------------------------------------------------------------------

def chat_prompts(tokenizer_dir: Path, prompts: list[str]) -> EvalPrompts | None:
    """Each prompt as a one-turn chat ending in `<|assistant|>`; a sample is the reply, up to end of turn."""
    if not prompts:
        return None
    from llmpipe.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    rendered = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]

    def reply(ids: list[int]) -> str:
        last = len(ids) - 1 - ids[::-1].index(tok.assistant_id)
        return tok.decode(ids[last + 1:])

    return EvalPrompts(rendered, reply, tok.end_of_turn_id)


def samples_text(samples_log: Path, prompts: list[str]) -> str:
    """samples.jsonl -> per eval step, each prompt and the model's reply (to read base -> sft -> dpo)."""
    if not samples_log.exists():
        return ""
    blocks: dict[int, list[str]] = {}
    for line in samples_log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        prompt = prompts[record["prompt"]] if record["prompt"] < len(prompts) else f"prompt {record['prompt']}"
        blocks.setdefault(record["step"], []).append(f"user: {prompt}\nassistant: {record['text']}\n")
    return "".join(f"=== step {step} ===\n" + "\n".join(lines) + "\n" for step, lines in sorted(blocks.items()))


# -- one run of a fine-tuning stage --------------------------------------------------------------------

def resolve(cfg: FinetuneSettings, ctx: StageContext, extra: dict[str, Any]) -> dict[str, Any]:
    """What a rerun must match to continue the checkpoints: training settings, stage settings, code."""
    settings = {**cfg.train_settings(), "method": cfg.method, **extra}
    if cfg.method == "lora":
        settings["lora"] = cfg.lora.model_dump()
    return {"train": settings, "code": ctx.code_fingerprint}


@dataclass(frozen=True)
class Start:
    """What a fine-tuning run starts from: the chat data, the base checkpoint and this process's world."""
    chat: Path
    base: Path
    model_cfg: ModelConfig
    tokenizer_ref: dict[str, Any]
    world: ddist.World
    accum: int


def start(cfg: FinetuneSettings, ctx: StageContext) -> Start:
    """Check the chat data, the base checkpoint and the settings against each other; join the world."""
    chat = ctx.input("chat")
    meta = read_data_meta(chat)
    base, model_cfg, tokenizer_ref = base_checkpoint(ctx, meta)
    check_seq_len(cfg, model_cfg, meta, ctx.name)
    world = one_process(cfg, ctx.name)
    return Start(chat, base, model_cfg, tokenizer_ref, world, accum_steps(cfg, world))


def one_process(cfg: FinetuneSettings, section: str) -> ddist.World:
    """The world of a fine-tuning run: this process (pretraining alone runs under torchrun today)."""
    if cfg.nproc_per_node > 1:
        raise UserError(f"{section}.nproc_per_node > 1: fine-tuning runs in one process for now (pretraining "
                        f"runs under torchrun); set it to 1")
    return ddist.init(cfg.device)


def accum_steps(cfg: FinetuneSettings, world: ddist.World) -> int:
    return TrainConfig(**cfg.train_settings()).accum_steps(world.world_size)


def train_stage(cfg: FinetuneSettings, ctx: StageContext, setup: Start, task: Task, data_ref: dict[str, Any],
                extra: dict[str, Any]) -> dict[str, float]:
    """Train `task` from the base checkpoint, then write the loss plot, samples and tracker artifacts."""
    out = ctx.output("model")
    base, model_cfg, tokenizer_ref, world = setup.base, setup.model_cfg, setup.tokenizer_ref, setup.world
    restart_on_new_inputs(ctx, {**data_ref, "init": ckpt.weights_hash(base)})
    resolved = resolve(cfg, ctx, extra)
    check_continuation(ctx, resolved)
    write_json_atomic(out / RESOLVED_CONFIG, resolved)
    try:
        trainer = Trainer(model_cfg, TrainConfig(**cfg.train_settings()), task, out, tokenizer_ref, ctx.tracker, world,
                          chat_prompts(ctx.input("tokenizer"), cfg.sample_prompts) if cfg.sample_tokens else None,
                          data_ref, init_from=base, adapter=lora_adapter(cfg))
        ctx.log.info("%s: %s of %s params trainable (%s), %d steps from %s", ctx.name,
                     f"{trainer.trainable_params:,}", f"{trainer.model.num_params():,}", cfg.method,
                     cfg.max_steps, base)
        with system_metrics(ctx.tracker):
            metrics = trainer.fit()
    finally:
        ddist.shutdown()
    publish(cfg, ctx)
    return {k: float(v) for k, v in metrics.items()}


def restart_on_new_inputs(ctx: StageContext, inputs: dict[str, Any]) -> None:
    """Drop the checkpoints and logs of a run on other starting weights or data.

    Retraining the base model or changing the chat data is the pipeline's normal course: DVC reruns this
    stage, and its persisted checkpoints then belong to a model that no longer exists. (Other settings or
    code are refused instead, as in pretraining: that is a choice the user should make.)"""
    out = ctx.output("model")
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    if latest is None:
        return
    saved = ckpt.read_meta(latest).get("data") or {}
    changed = [k for k in ("init", "sha256") if saved.get(k) != inputs.get(k)]
    if not changed:
        return
    what = " and ".join({"init": "starting weights", "sha256": "training data"}[k] for k in changed)
    ctx.log.warning("%s: the %s changed since %s was saved: starting over", ctx.name, what, latest)
    shutil.rmtree(out / "checkpoints")
    for log_file in ("metrics.jsonl", "samples.jsonl", RESOLVED_CONFIG):
        (out / log_file).unlink(missing_ok=True)


def publish(cfg: FinetuneSettings, ctx: StageContext) -> None:
    out = ctx.output("model")
    [plot] = ctx.spec.plots
    write_text_atomic(ctx.path(plot), loss_csv(out / "metrics.jsonl"))
    samples = out / "samples.txt"
    write_text_atomic(samples, samples_text(out / "samples.jsonl", cfg.sample_prompts))
    for artifact in (samples, out / RESOLVED_CONFIG):
        ctx.tracker.log_artifact(artifact)
    if cfg.log_model:
        ctx.tracker.log_artifact(out / "final", artifact_path="final")


def read_data_meta(chat_dir: Path) -> dict[str, Any]:
    meta = chat_dir / "meta.json"
    if not meta.exists():
        raise UserError(f"{meta} not found: run the chat_data stage first (dvc repro chat_data)")
    return read_json(meta)
