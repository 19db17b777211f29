"""The `dpo` stage: direct preference optimization, data/chat/dpo + models/sft -> models/dpo.

Each pair is a prompt with a chosen and a rejected reply; the loss (Rafailov et al. 2023, in
llmpipe/finetune/losses.py) raises the policy's log-probability margin of chosen over rejected
relative to a frozen reference, the SFT weights, on response tokens only; `beta` sets how far the
policy may move from the reference. The reference's log-probs are computed once before training
and cached when the run visits at least every pair once (then that is fewer forwards), else live
each step: with LoRA the same model with its adapter off, with full fine-tuning a frozen copy.
Logged: reward margin, reward accuracy and chosen/rejected log-probs, train and val.

The embedded default pairs come from the chitchat conversations (llmpipe/finetune/preferences.py):
the real reply is chosen, a reply from another conversation rejected, a *relevance* preference set.
Real preference data comes by path or hub name (chat_data.preferences).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from llmpipe.finetune.batches import DpoBatches, dpo_reference_batches, dpo_val_batches, read_pairs
from llmpipe.finetune.losses import DpoLoss, sequence_logprobs
from llmpipe.finetune.tuning import FinetuneSettings, files_hash, start, train_stage
from llmpipe.stages import StageContext
from llmpipe.train import checkpoint as ckpt
from llmpipe.train.task import Task


class DpoConfig(FinetuneSettings):
    """The `dpo` section of params.yaml."""

    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference (the SFT model)")
    reference: Literal["auto", "cached", "live"] = Field(
        "auto", description="reference log-probs computed once (cached) or every step (live); auto: the cheaper")
    micro_batch: int = Field(4, ge=1, description="pairs per forward pass (2 rows each: chosen, rejected)")
    global_batch_tokens: int = Field(4 * 256, ge=1, description="pairs x seq_len per optimizer step (the capacity)")
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    lr: float = Field(1e-4, gt=0)


def run(cfg: DpoConfig, ctx: StageContext) -> dict[str, float]:
    setup = start(cfg, ctx)
    train_file, val_file = setup.chat / "dpo" / "train.parquet", setup.chat / "dpo" / "val.parquet"
    train_pairs, val_pairs = read_pairs(train_file), read_pairs(val_file)
    device = setup.world.device
    reference = choose_reference(cfg, len(train_pairs), setup.accum)
    ref_train = ref_val = None
    if reference == "cached":
        model = ckpt.load_checkpoint(setup.base, device)[0]
        ctx.log.info("dpo: reference log-probs of %d + %d pairs, once", len(train_pairs), len(val_pairs))
        ref_train, ref_val = (reference_logps(model, pairs, cfg.micro_batch, cfg.seq_len, device)
                              for pairs in (train_pairs, val_pairs))
        del model
    elif cfg.method == "full":  # live, a frozen copy of the SFT weights
        reference = ckpt.load_checkpoint(setup.base, device)[0]
    else:  # live, the policy with its LoRA adapter off
        reference = "disable_adapter"
    train = DpoBatches(train_pairs, cfg.micro_batch, cfg.seq_len, setup.accum, cfg.seed, setup.world.rank,
                       setup.world.world_size, ref_logp=ref_train)
    val = dpo_val_batches(val_pairs, cfg.micro_batch, cfg.seq_len, cfg.eval_batches, ref_logp=ref_val)
    data_ref = {"dir": f"{setup.chat.name}/dpo", "sha256": files_hash(train_file)}
    task = Task(train, val, DpoLoss(cfg.beta, reference))
    return train_stage(cfg, ctx, setup, task, data_ref, {"beta": cfg.beta, "reference": cfg.reference})


def choose_reference(cfg: DpoConfig, num_pairs: int, accum: int) -> str:
    """cached when the run sees every pair at least once (one reference forward per pair beats one per
    visit); live otherwise. A LoRA policy's live reference costs no memory (its adapter switched off)."""
    if cfg.reference != "auto":
        return "cached" if cfg.reference == "cached" else "live"
    visits = cfg.max_steps * cfg.micro_batch * accum
    return "cached" if visits >= num_pairs else "live"


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: list, micro_batch: int, seq_len: int,
                    device: torch.device) -> np.ndarray:
    """(num pairs, 2) summed response log-probs (chosen, rejected) of `model`, every pair once."""
    out = np.zeros((len(pairs), 2), dtype=np.float64)
    for index, batch in dpo_reference_batches(pairs, micro_batch, seq_len):
        logits, _ = model(batch["idx"].to(device))
        logp = sequence_logprobs(logits, batch["targets"].to(device)).double().cpu().numpy()
        out[index, 0], out[index, 1] = logp[:len(index)], logp[len(index):]
    return out
