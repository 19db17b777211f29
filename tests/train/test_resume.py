"""Kill the training process for real (SIGKILL, SIGTERM), or damage its newest checkpoint, and resume: the
weights must be bit-identical to an uninterrupted run's."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmpipe.train import checkpoint as ckpt
from tests.train.synthetic import resolved_config, write_tokens

ROOT = Path(__file__).resolve().parents[2]

# Runs the real entry point, but sends `signal` to itself when `at_step` steps are done.
SELF_SIGNAL = """
import os, signal, sys
from llmpipe.train import loop
at_step, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
original = loop.Trainer.train_step
def train_step(self):
    if self.step == at_step:
        os.kill(os.getpid(), sig)
    return original(self)
loop.Trainer.train_step = train_step
from llmpipe.train.pretrain_worker import main
main(sys.argv[3:])
"""


def run(root: Path, resolved: dict, name: str, kill: tuple[int, str] | None = None) -> subprocess.CompletedProcess:
    config = root / f"{name}.json"
    config.write_text(json.dumps({**resolved, "out_dir": f"models/{name}"}))
    args = ["-c", SELF_SIGNAL, str(kill[0]), kill[1]] if kill else ["-m", "llmpipe.train.pretrain_worker"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args, "--config", str(config)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = ckpt.load_weights(a), ckpt.load_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_tokens(root)
    resolved = resolved_config(root, train={"max_steps": 20, "checkpoint_every": 4, "keep_last": 3})
    straight = run(root, resolved, "straight")
    assert straight.returncode == 0, straight.stderr
    return root, resolved


@pytest.mark.slow
def test_sigkill_after_step_12_then_resume_gives_bit_identical_weights(project):
    root, resolved = project
    killed = run(root, resolved, "killed", kill=(14, "SIGKILL"))  # dies inside step 15, step-12 saved
    assert killed.returncode == -signal.SIGKILL
    out = root / "models" / "killed"
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step-000012"
    assert not (out / "final").exists()
    resumed = run(root, resolved, "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step-000012" in resumed.stderr
    assert_same_weights(root / "models/straight/final", out / "final")
    assert losses(out) == losses(root / "models/straight")  # the log has each step once, same values
    # optimizer moments too, not only the weights
    sa = ckpt.load_trainer_state(root / "models/straight/checkpoints/step-000020")["optimizer"]["state"]
    sb = ckpt.load_trainer_state(out / "checkpoints/step-000020")["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(sa[k].keys() == sb[k].keys() for k in sa)
    assert {"exp_avg_sq", "momentum_buffer"} <= {n for k in sa for n in sa[k]}  # AdamW's and Muon's state
    assert all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exiting_and_the_run_resumes(project):
    root, resolved = project
    stopped = run(root, resolved, "stopped", kill=(6, "SIGTERM"))  # between checkpoints 4 and 8
    assert stopped.returncode == -signal.SIGTERM, stopped.stderr
    out = root / "models" / "stopped"
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step-000007"  # the step in flight finished
    assert run(root, resolved, "stopped").returncode == 0
    assert_same_weights(root / "models/straight/final", out / "final")


@pytest.fixture(scope="module")
def killed_at_14(project):
    """A run killed inside step 15: checkpoints 4, 8 and 12 on disk, no final/."""
    root, resolved = project
    killed = run(root, resolved, "killed-base", kill=(14, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL
    out = root / "models" / "killed-base"
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000004", "step-000008", "step-000012"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damaged", [ckpt.WEIGHTS, ckpt.STATE])
def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_resumes_to_identical_weights(project, killed_at_14,
                                                                                           damaged):
    root, resolved = project
    name = f"corrupt-{damaged.split('.')[0]}"
    out = root / "models" / name
    shutil.copytree(killed_at_14, out)
    file = out / "checkpoints" / "step-000012" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # e.g. the disk filled up after the save
    resumed = run(root, resolved, name)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping corrupt checkpoint {out / 'checkpoints' / 'step-000012'}" in resumed.stderr
    assert str(file) in resumed.stderr  # the warning names the damaged file
    assert f"resumed from {out / 'checkpoints' / 'step-000008'}" in resumed.stderr
    assert_same_weights(root / "models/straight/final", out / "final")
    assert losses(out) == losses(root / "models/straight")
    ckpt.verify_checkpoint(out / "checkpoints" / "step-000012")  # written again, intact this time
