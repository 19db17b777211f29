"""The end-to-end project's settings: a slice of the demo corpus, models of a few steps."""

from __future__ import annotations

from pathlib import Path

DATA_STAGES = ["ingest", "clean", "dedup"]

# Small enough for CI: a few optimizer steps of a narrow model.
FINETUNE = {"seq_len": 64, "micro_batch": 4, "global_batch_tokens": 256, "max_steps": 4, "warmup_steps": 1,
            "eval_every": 2, "checkpoint_every": 2, "eval_batches": 2, "sample_tokens": 8}
E2E_OVERRIDES: dict = {
    "ingest": {"shard_mb": 0.1},  # several shards even for the slice, so workers and merging are exercised
    "pretrain": {"max_steps": 6, "seq_len": 64, "micro_batch": 4, "global_batch_tokens": 512,
                 "warmup_steps": 2, "eval_every": 3, "checkpoint_every": 3, "sample_tokens": 8},
    "chat_data": {"max_tokens": 64},
    "sft": FINETUNE, "dpo": FINETUNE,
    "evaluate": {"limit": 8, "batch_size": 8},
    "quantize": {"speed": {"new_tokens": 8, "repeats": 1}},
    # a model of a few steps is no better than chance: the e2e checks the moves, not the demo's minimums
    "promote": {"minimums": {"bpb_max": 50.0, "acc_min": {"llmpipe_chat_reply": 0.0, "llmpipe_continuation": 0.0}}},
}


def chat_copy(wheel: Path) -> dict:
    from llmpipe.io import sha256_file

    return {"chitchat": {"local_copy": str(wheel.resolve()), "sha256": sha256_file(wheel)}}
