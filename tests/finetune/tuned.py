"""A throwaway project for the sft and dpo stages: the tiny chat tokenizer, a base checkpoint, and chat
data with a pattern a small model learns in tens of steps (a colour for each noun; a preferred and a
dispreferred way to answer), run through the real chat_data stage.

Import the fixtures into a test module (`from tests.finetune.tuned import *`).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llmpipe.model import GPT, ModelConfig
from llmpipe.stages import run_stage
from llmpipe.train import checkpoint as ckpt
from tests.finetune.chat_fixtures import chat_tokenizer_dir, write_jsonl  # noqa: F401
from tests.helpers import ROOT

NOUNS = [f"{a}{b}" for a in ("cat", "dog", "sun", "tree", "boat", "king", "stone", "bird") for b in ("", "s", "ling")]
COLOURS = ["red", "blue", "green", "white"]
SEQ = 64
TUNE = {"seq_len": SEQ, "micro_batch": 8, "global_batch_tokens": 8 * SEQ, "max_steps": 120, "warmup_steps": 3,
        "eval_every": 60, "checkpoint_every": 60, "eval_batches": 4, "sample_tokens": 12, "lr": 3e-3,
        "device": "cpu", "sample_prompts": ["what colour is the cat?", "tell me about the sun"]}


def conversations() -> list[dict[str, Any]]:
    rng = random.Random(0)
    out = []
    for k in range(240):
        noun = rng.choice(NOUNS)
        out.append({"messages": [{"role": "user", "content": f"what colour is the {noun}? ({k})"},
                                 {"role": "assistant", "content": f"the {noun} is {COLOURS[NOUNS.index(noun) % 4]}."}]})
    return out


def preference_pairs() -> list[dict[str, Any]]:
    """The preferred reply is kind and about the noun, the other one rude: learnable from the words alone."""
    rng = random.Random(1)
    return [{"prompt": f"tell me about the {noun} ({k})", "chosen": f"the {noun} is lovely and kind.",
             "rejected": "no. go away now."} for k, noun in ((k, rng.choice(NOUNS)) for k in range(240))]


def base_checkpoint(root: Path, seed: int = 0) -> Path:
    """A small random-init model saved as pretraining would, on the project's tokenizer."""
    from llmpipe.tokenizer import Tokenizer

    torch.manual_seed(seed)

    tok = Tokenizer.load(root / "models" / "tokenizer")
    cfg = ModelConfig.from_preset("tiny", tok.vocab_size, n_layer=2, d_model=128, max_seq_len=SEQ)
    model = GPT(cfg)
    ref = {"hash": tok.hash, "dir": "models/tokenizer", "vocab_size": tok.vocab_size}
    return ckpt.save_checkpoint(root / "models" / "pretrain" / "final", model.state_dict(), cfg, ref,
                                {"step": 0}, None, ckpt.tied_aliases(model))


def make_tuning_project(root: Path, tokenizer_dir: Path, **sections: dict) -> Path:
    shutil.copytree(tokenizer_dir, root / "models" / "tokenizer")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")  # the stages' code deps (their resume fingerprint)
    write_jsonl(root / "chats.jsonl", conversations())
    write_jsonl(root / "prefs.jsonl", preference_pairs())
    params = {"chat_data": {"sources": [{"name": "chats", "type": "messages", "path": "chats.jsonl"}],
                            "preferences": [{"name": "prefs", "type": "pairs", "path": "prefs.jsonl"}],
                            "max_tokens": SEQ, "val_ratio": 0.15},
              "sft": dict(TUNE), "dpo": {**TUNE, "lr": 1e-3, "micro_batch": 4, "global_batch_tokens": 4 * SEQ}}
    for name, overrides in sections.items():
        params[name].update(overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    base_checkpoint(root)
    run_stage("chat_data", root)
    return root


def set_params(root: Path, section: str, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def metrics(root: Path, stage: str) -> dict[str, float]:
    return json.loads((root / "metrics" / f"{stage}.json").read_text())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, chat_tokenizer_dir) -> Path:  # noqa: F811
    """The project after chat_data, sft (full) and dpo (full) with the test settings."""
    root = make_tuning_project(tmp_path_factory.mktemp("tuned"), chat_tokenizer_dir)
    run_stage("sft", root)
    run_stage("dpo", root)
    return root
