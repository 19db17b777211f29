"""The `sft` stage: supervised chat fine-tuning, data/chat/sft + models/pretrain -> models/sft.

The loss is the next-token loss on assistant tokens only (chat_data's mask: each reply and its
end-of-turn; user and system tokens only condition). Conversations are batched one per row,
right padded within length buckets (`batching: bucket`, the default) or packed several to a row
with attention kept inside each (`batching: pack`); llmpipe/finetune/batches.py explains both and
docs/benchmarks.md has their measured tokens/s. Full fine-tuning or LoRA (`method`), from the
pretrained weights with a fresh optimizer; outputs as pretraining's (checkpoints/, final/, logs),
plus chat samples on fixed prompts at each eval (samples.txt).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmpipe.finetune.batches import SftBatches, read_sft_examples, sft_val_batches
from llmpipe.finetune.tuning import FinetuneSettings, files_hash, start, train_stage
from llmpipe.stages import StageContext
from llmpipe.train.task import Task, lm_loss


class SftConfig(FinetuneSettings):
    """The `sft` section of params.yaml."""

    batching: Literal["bucket", "pack"] = Field("bucket", description="one conversation per padded row, or packed")
    micro_batch: int = Field(8, ge=1, description="rows per forward pass per process")
    global_batch_tokens: int = Field(8 * 256, ge=1, description="rows x seq_len per optimizer step (the capacity)")


def run(cfg: SftConfig, ctx: StageContext) -> dict[str, float]:
    setup = start(cfg, ctx)
    train_file, val_file = setup.chat / "sft" / "train.parquet", setup.chat / "sft" / "val.parquet"
    train = SftBatches(read_sft_examples(train_file), cfg.micro_batch, cfg.seq_len, setup.accum, cfg.seed,
                       setup.world.rank, setup.world.world_size, mode=cfg.batching)
    val = sft_val_batches(read_sft_examples(val_file), cfg.micro_batch, cfg.seq_len, cfg.batching, cfg.eval_batches)
    data_ref = {"dir": f"{setup.chat.name}/sft", "sha256": files_hash(train_file)}
    return train_stage(cfg, ctx, setup, Task(train, val, lm_loss), data_ref, {"batching": cfg.batching})
