"""The training Job's torchrun command, run for real: two "pods" on this machine (one torchrun agent each,
one CPU rank per node, gloo), with the args of infra/k8s/train-job.yaml, only the node's address, port
and GPU count swapped for local ones. Both nodes are SIGKILLed mid-run, as a lost node's pods are, and
started again, as the Job replaces them: every rank resumes from the newest checkpoint and the run
completes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from llmpipe.train import checkpoint as ckpt
from tests.train.synthetic import resolved_config, write_tokens

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "infra" / "k8s" / "train-job.yaml"
STEPS = 12
# micro_batch 4 x seq_len 64 x 2 ranks = 512 tokens a step; a checkpoint every 4 steps
TRAIN = {"max_steps": STEPS, "checkpoint_every": 4, "eval_every": 4, "global_batch_tokens": 512,
         "distributed": "ddp", "keep_last": 3}


def job_args() -> tuple[int, list[str]]:
    [job] = [d for d in yaml.safe_load_all(JOB.read_text()) if d and d["kind"] == "Job"]
    [main] = job["spec"]["template"]["spec"]["containers"]
    return job["spec"]["completions"], main["args"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(arg: str, index: int, port: int) -> str:
    """A pod's arg on this machine: its completion index in, the master on loopback, one rank per node."""
    arg = arg.replace("$(JOB_COMPLETION_INDEX)", str(index))
    for flag, value in (("--master-addr", "127.0.0.1"), ("--master-port", str(port)), ("--nproc-per-node", "1")):
        if arg.startswith(f"{flag}="):
            return f"{flag}={value}"
    return arg


def start_nodes(root: Path, logs: str) -> list[subprocess.Popen]:
    nodes, args = job_args()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *(local(a, i, port) for a in args)],
                             cwd=root, env=env, start_new_session=True,
                             stdout=open(root / f"{logs}-node{i}.log", "w"), stderr=subprocess.STDOUT)
            for i in range(nodes)]


def kill_pod(agent: subprocess.Popen) -> None:
    """SIGKILL what a pod's container holds: the agent and its ranks (torchrun puts them in sessions of their own)."""
    groups = {os.getpgid(p.pid) for p in [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]}
    for group in groups:
        os.killpg(group, 9)
    agent.wait(timeout=30)


@pytest.mark.slow
def test_the_jobs_torchrun_resumes_every_node_from_the_newest_checkpoint(tmp_path):
    write_tokens(tmp_path)
    out = tmp_path / "models" / "pretrain"
    out.mkdir(parents=True)
    (out / "resolved_config.json").write_text(json.dumps(resolved_config(tmp_path, train=TRAIN)))
    checkpoints = out / "checkpoints"

    nodes = start_nodes(tmp_path, "first")
    deadline = time.monotonic() + 240
    while not (checkpoints / "step-000004" / ckpt.MARKER).exists():
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), \
            "\n".join((tmp_path / f"first-node{i}.log").read_text()[-2000:] for i in range(len(nodes)))
        time.sleep(0.2)
    for node in nodes:
        kill_pod(node)
    newest = ckpt.read_meta(ckpt.newest_intact_checkpoint(checkpoints))["step"]
    assert newest < STEPS, "killed after the run ended: nothing to resume"

    nodes = start_nodes(tmp_path, "again")
    for i, node in enumerate(nodes):
        assert node.wait(timeout=240) == 0, (tmp_path / f"again-node{i}.log").read_text()[-3000:]
    logs = [(tmp_path / f"again-node{i}.log").read_text() for i in range(len(nodes))]
    assert "x 2 ranks" in logs[0], "the two nodes' ranks formed one world"
    assert f"resumed from {checkpoints / f'step-{newest:06d}'} (step {newest})" in logs[0]
    assert ckpt.read_meta(out / "final")["step"] == STEPS
