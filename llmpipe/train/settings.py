"""The training settings every training stage's section of params.yaml shares (pretrain, sft, dpo).

Their defaults are TrainConfig's (llmpipe/train/loop.py): one source, so a stage and the loop never
disagree; a stage's config subclasses this one and overrides a default only where its job differs.
A pydantic module, like the stage modules: torchrun workers get the resolved plain values.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from llmpipe.config import StageConfig
from llmpipe.train.loop import TrainConfig

_D = TrainConfig()


class TrainSettings(StageConfig):
    """What the training loop needs from a training stage's section (validated, with the loop's defaults)."""

    # batch and length of training
    seq_len: int = Field(_D.seq_len, ge=8, description="context length trained on (the model's max_seq_len)")
    micro_batch: int = Field(_D.micro_batch, ge=1, description="sequences per forward pass per process")
    global_batch_tokens: int = Field(_D.global_batch_tokens, ge=1, description="tokens per optimizer step, all processes together")
    max_steps: int = Field(_D.max_steps, ge=1, description="optimizer steps (or give train_tokens instead)")
    train_tokens: int | None = Field(None, ge=1, description="token budget: max_steps = ceil(train_tokens / global batch)")
    # optimizer and schedule
    lr: float = Field(_D.lr, gt=0, description="peak learning rate (AdamW's; with muon, of the embedding, head and gains)")
    optimizer: Literal["adamw", "muon"] = Field(_D.optimizer, description="muon: Muon for the blocks' matrices, AdamW for the rest")
    muon_lr: float = Field(_D.muon_lr, gt=0, description="muon: peak learning rate of the matrices")
    muon_momentum: float = Field(_D.muon_momentum, ge=0, lt=1)
    min_lr_ratio: float = Field(_D.min_lr_ratio, ge=0, le=1)
    warmup_steps: int = Field(_D.warmup_steps, ge=0)
    schedule: Literal["cosine", "wsd"] = _D.schedule
    decay_frac: float = Field(_D.decay_frac, gt=0, le=1, description="wsd: share of the steps spent decaying")
    weight_decay: float = Field(_D.weight_decay, ge=0)
    beta1: float = Field(_D.beta1, ge=0, lt=1)
    beta2: float = Field(_D.beta2, ge=0, lt=1)
    grad_clip: float = Field(_D.grad_clip, gt=0)
    # eval, checkpoints, logging
    eval_every: int = Field(_D.eval_every, ge=1, description="steps between val loss / bpb / sample")
    eval_batches: int = Field(_D.eval_batches, ge=1, description="micro-batches in the fixed val set")
    checkpoint_every: int = Field(_D.checkpoint_every, ge=1, description="steps between checkpoints (best-by-val needs a multiple of eval_every)")
    keep_last: int = Field(_D.keep_last, ge=1, description="checkpoints kept besides the best by val loss")
    log_every: int = Field(_D.log_every, ge=1)
    sample_tokens: int = Field(_D.sample_tokens, ge=0, description="tokens sampled at each eval (0: none)")
    # hardware
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp32"] = Field(_D.dtype, description="auto: bf16 autocast on a GPU that has it, else fp32")
    compile: bool = Field(_D.compile, description="torch.compile the model (GPU; minutes of warm-up)")
    distributed: Literal["none", "ddp", "fsdp2"] = _D.distributed
    nproc_per_node: int = Field(1, ge=1, description="> 1 launches torchrun with this many processes (one per GPU)")
    seed: int = _D.seed
    log_model: bool = Field(True, description="log final/ (weights) to MLflow as artifacts")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSettings":
        if {"max_steps", "train_tokens"} <= self.model_fields_set:
            raise ValueError("set max_steps or train_tokens, not both")
        if self.nproc_per_node > 1 and self.distributed == "none":
            raise ValueError("nproc_per_node > 1 needs distributed: ddp or fsdp2")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds the run's {self.steps} steps")
        return self

    @property
    def steps(self) -> int:
        return math.ceil(self.train_tokens / self.global_batch_tokens) if self.train_tokens else self.max_steps

    def train_settings(self) -> dict[str, Any]:
        """The TrainConfig fields of the section, with the step count a token budget implies."""
        fields = set(TrainConfig.__dataclass_fields__)
        settings = {k: v for k, v in self.model_dump().items() if k in fields}
        settings["max_steps"] = self.steps
        TrainConfig(**settings).accum_steps(self.nproc_per_node)  # a batch that does not divide fails here, early
        return settings
