"""The same entry point under torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the loss
curve of one process with the same global batch, and their checkpoints load like any other."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmpipe.train import checkpoint as ckpt
from tests.train.synthetic import resolved_config, write_tokens

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def run(root: Path, name: str, nproc: int, mode: str, steps: int = STEPS) -> dict:
    resolved = resolved_config(root, out_dir=f"models/{name}",
                               train={"max_steps": steps, "checkpoint_every": 4, "eval_every": 4, "distributed": mode})
    config = root / f"{name}.json"
    config.write_text(json.dumps(resolved))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *launcher, "-m", "llmpipe.train.pretrain", "--config", str(config)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (root / "models" / name / "metrics.jsonl").read_text().splitlines()]
    return {"loss": [r["train/loss"] for r in records if "train/loss" in r], "log": proc.stderr,
            "val": [r["val/loss"] for r in records if "val/loss" in r], "out": root / "models" / name}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_tokens(root)
    return root, run(root, "single", 1, "none")  # accum 2 x 1 process = the global batch


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_follow_the_single_process_loss_curve(single, mode):
    root, one = single
    two = run(root, mode, 2, mode)  # accum 1 x 2 ranks
    assert len(two["loss"]) == STEPS
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert two["val"] == pytest.approx(one["val"], abs=1e-5)
    model, cfg, meta = ckpt.load_checkpoint(two["out"])  # full weights in the one-process format
    assert meta["step"] == STEPS and model.lm_head.weight is model.tok_embeddings.weight
    reference = ckpt.load_weights(one["out"] / "final")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-4, rtol=0, msg=name)
    state = ckpt.load_trainer_state(two["out"] / "checkpoints" / f"step-{STEPS:06d}")
    assert state["optimizer"]["state"]  # the full optimizer state, gathered to rank 0
    if mode == "fsdp2":  # resume: rank 0 reads the checkpoint, the helpers broadcast and shard it
        longer = run(root, mode, 2, mode, steps=STEPS + 2)
        assert f"resumed from {two['out'] / 'checkpoints' / f'step-{STEPS:06d}'}" in longer["log"]
        assert len(longer["loss"]) == STEPS + 2 and longer["loss"][:STEPS] == two["loss"]
