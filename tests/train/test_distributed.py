"""The same entry point under torchrun with 2 CPU processes (gloo).

DDP and FSDP2 with gradient accumulation (2 micro-batches per rank) follow the loss curve of one
process running all 4 micro-batches of the same global batch; FSDP2 really shards the parameters;
their checkpoints load like any other; and a run whose ranks are SIGKILLed resumes to exactly what
the uninterrupted two-process run computed.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmpipe.model import GPT, ModelConfig
from llmpipe.train import checkpoint as ckpt
from tests.train.synthetic import resolved_config, write_tokens

ROOT = Path(__file__).resolve().parents[2]
STEPS, KILL_AT = 8, 6  # checkpoints at 4 and 8: a kill after step 6 resumes from step 4
# micro_batch 4 x seq_len 64 = 256 tokens a pass: accum 4 in one process, 2 on each of two ranks
TRAIN = {"max_steps": STEPS, "checkpoint_every": 4, "eval_every": 4, "global_batch_tokens": 1024}

# The real entry point; before the first step each rank saves the parameters it holds, and with a
# kill step every rank SIGKILLs itself once that many steps are done (after step 6's last collective).
PROBE = """
import os, signal, sys
import torch
from llmpipe.train import loop
kill_at = int(sys.argv[1])
original = loop.Trainer.train_step
def train_step(self):
    if self.step == 0:
        held = {name: {"type": type(p).__name__, "shape": tuple(p.shape),
                       "local": (p.to_local() if hasattr(p, "to_local") else p).detach().clone()}
                for name, p in self.model.named_parameters()}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(held, self.out_dir / f"rank{self.world.rank}-params.pt")
    if self.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self)
loop.Trainer.train_step = train_step
from llmpipe.train.pretrain_worker import main
main(sys.argv[2:])
"""


def run(root: Path, name: str, nproc: int, mode: str, kill_at: int | None = None, probe: bool = False) -> dict:
    resolved = resolved_config(root, out_dir=f"models/{name}", train={**TRAIN, "distributed": mode})
    config = root / f"{name}.json"
    config.write_text(json.dumps(resolved))
    script = root / "probe.py"
    script.write_text(PROBE)
    entry = [str(script), str(-1 if kill_at is None else kill_at)] if probe or kill_at else ["-m", "llmpipe.train.pretrain_worker"]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *launcher, *entry, "--config", str(config)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=180)
    if kill_at is None:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    out = root / "models" / name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"loss": {r["step"]: r["train/loss"] for r in records if "train/loss" in r}, "log": proc.stderr,
            "val": {r["step"]: r["val/loss"] for r in records if "val/loss" in r}, "out": out,
            "model": resolved["model"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_tokens(root)
    return root


@pytest.fixture(scope="module")
def single(root):
    return run(root, "single", 1, "none")


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def straight(request, root):
    return request.param, run(root, request.param, 2, request.param, probe=True)


@pytest.mark.slow
def test_two_processes_with_accumulation_follow_the_single_process_loss_curve(straight, single):
    mode, two = straight
    assert sorted(two["loss"]) == list(range(1, STEPS + 1))
    assert list(two["loss"].values()) == pytest.approx(list(single["loss"].values()), abs=1e-5)
    assert two["val"] == pytest.approx(single["val"], abs=1e-5)
    model, cfg, meta = ckpt.load_checkpoint(two["out"])  # full weights in the one-process format
    assert meta["step"] == STEPS and model.lm_head.weight is model.tok_embeddings.weight
    reference = ckpt.load_weights(single["out"] / "final")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-4, rtol=0, msg=name)
    state = ckpt.load_trainer_state(two["out"] / "checkpoints" / f"step-{STEPS:06d}")
    assert state["optimizer"]["state"]  # the full optimizer state, gathered to rank 0


@pytest.mark.slow
def test_fsdp2_shards_every_parameter_and_ddp_replicates_them(straight):
    mode, two = straight
    torch.manual_seed(TRAIN.get("seed", 1337))
    initial = dict(GPT(ModelConfig.from_dict(two["model"])).named_parameters())  # what every rank starts from
    held = [torch.load(two["out"] / f"rank{r}-params.pt", weights_only=True) for r in range(2)]
    assert set(held[0]) == set(held[1]) == set(initial)
    for name, full in initial.items():
        r0, r1 = held[0][name], held[1][name]
        assert r0["shape"] == r1["shape"] == tuple(full.shape), name
        if mode == "fsdp2":  # a DTensor per parameter; each rank holds its half of dim 0, nothing more
            assert r0["type"] == r1["type"] == "DTensor", name
            assert r0["local"].shape[0] == r1["local"].shape[0] == full.shape[0] // 2, name
            assert torch.equal(torch.cat([r0["local"], r1["local"]]), full.detach()), name
        else:
            assert r0["type"] == r1["type"] == "Parameter", name
            assert torch.equal(r0["local"], full.detach()) and torch.equal(r1["local"], full.detach()), name


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_what_the_uninterrupted_run_computed(straight, root):
    mode, two = straight
    name = f"{mode}-killed"
    killed = run(root, name, 2, mode, kill_at=KILL_AT)
    out = root / "models" / name
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step-000004" and not (out / "final").exists()
    assert max(killed["loss"]) == KILL_AT
    resumed = run(root, name, 2, mode)  # rank 0 reads step-4, the helpers broadcast (and shard) it
    assert f"resumed from {out / 'checkpoints' / 'step-000004'}" in resumed["log"]
    after = {step: loss for step, loss in two["loss"].items() if step > 4}
    assert {step: resumed["loss"][step] for step in after} == after  # the steps trained after the resume
    assert resumed["val"] == two["val"]
    final, reference = ckpt.load_weights(out / "final"), ckpt.load_weights(two["out"] / "final")
    assert final.keys() == reference.keys()
    for key in final:
        assert torch.equal(final[key], reference[key]), key
