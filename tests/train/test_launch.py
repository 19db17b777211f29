"""llmpipe.train.launch: torchrun from a stage, rank 0's result and errors, the metrics log forwarded
while the ranks run, and a SIGTERM of the stage passed on to them (real processes, 2 CPU ranks)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmpipe.errors import UserError
from llmpipe.train.launch import MetricsForwarder, launch_torchrun

ROOT = Path(__file__).resolve().parents[2]
WORKER = "tests.train.launch_worker"


class RecordingTracker:
    run_id = None

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, metrics))


def test_the_forwarder_sends_each_complete_line_once_after_dropping_the_steps_a_resume_repeats(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "train/loss": float(s)}) + "\n" for s in range(1, 7)))
    tracker = RecordingTracker()
    forward = MetricsForwarder(log, tracker, resume_step=4)  # steps 5 and 6 will be trained again
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert forward() == 0 and tracker.logged == []  # what was there before the launch is not resent
    with open(log, "a") as fh:
        fh.write(json.dumps({"step": 5, "train/loss": 0.5}) + "\n" + '{"step": 6, "train/lo')  # 6 is mid-write
    assert forward() == 1 and tracker.logged == [(5, {"train/loss": 0.5})]
    with open(log, "a") as fh:
        fh.write('ss": 0.25}\n')
    assert forward() == 1 and forward() == 0
    assert tracker.logged == [(5, {"train/loss": 0.5}), (6, {"train/loss": 0.25})]


def launch(tmp_path: Path, mode: str, poll=lambda: None) -> dict:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"mode": mode, "out": str(tmp_path)}))
    return launch_torchrun(WORKER, config, 2, cwd=tmp_path, poll=poll, poll_every_s=0.2)


@pytest.fixture
def worker_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the ranks import the test worker from this checkout
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.slow
def test_rank0s_metrics_come_back_and_its_log_is_forwarded_while_the_ranks_run(tmp_path, worker_env):
    tracker = RecordingTracker()
    forward = MetricsForwarder(tmp_path / "metrics.jsonl", tracker, resume_step=0)
    seen_during_run: list[int] = []
    metrics = launch(tmp_path, "log", poll=lambda: seen_during_run.append(forward()))
    assert metrics == {"steps": 3.0, "rank": 0.0}
    assert [step for step, _ in tracker.logged] == [1, 2, 3]
    assert sum(1 for n in seen_during_run[:-1] if n) >= 2  # lines arrived in several polls, not at the end


@pytest.mark.slow
def test_the_ranks_user_error_is_the_stages_user_error_and_a_crashed_rank_a_failed_launch(tmp_path, worker_env):
    for mode in ("user_error", "user_error_rank0_late"):  # whichever rank gets there first reports it
        with pytest.raises(UserError, match=r"pretrain.lr: checkpoints 0.002 != params.yaml 0.001"):
            launch(tmp_path, mode)
    with pytest.raises(RuntimeError, match="torchrun exited with status 1"):  # though rank 0 wrote its result
        launch(tmp_path, "crash")


# The stage's process: like a tracked stage, SIGTERM raises in the main thread (tracking.Terminated there).
STAGE = """
import signal, sys
from pathlib import Path
from llmpipe.train.launch import launch_torchrun
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
launch_torchrun("tests.train.launch_worker", Path(sys.argv[1]), 2, cwd=Path(sys.argv[1]).parent, poll_every_s=0.2)
"""


@pytest.mark.slow
def test_a_sigterm_of_the_stage_reaches_every_rank_and_the_stage_waits_for_them(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"mode": "until_sigterm", "out": str(tmp_path)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    stage = subprocess.Popen([sys.executable, "-c", STAGE, str(config)], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"rank{r}-ready").exists() for r in range(2)):
            assert stage.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.2)
        os.kill(stage.pid, signal.SIGTERM)  # the stage only, as `kill` or a scheduler would stop it
        assert stage.wait(timeout=60) == 143
        assert (tmp_path / "rank0-saved").exists() and (tmp_path / "rank1-saved").exists()
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
