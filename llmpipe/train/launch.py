"""Running a training worker under torchrun from a stage, for every training stage (pretrain, sft, dpo).

A stage writes its settings as a plain JSON file and starts `launch_torchrun(module, config_file,
nproc)`; the worker module trains on every rank and ends with `report_result`, so that rank 0's
final metrics, or the user error the ranks agreed on, reach the stage as a return value or a
UserError instead of "torchrun exited with status 1". While it runs, a `MetricsForwarder` sends the
metrics log that rank 0 appends to the stage's tracker, and `system_metrics` samples CPU, GPU and
memory into the same run.

Like the rest of llmpipe.train it imports only torch, numpy and the standard library at module level
(a worker imports `report_result` on a bare GPU node); MLflow is imported inside `system_metrics`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmpipe.errors import UserError
from llmpipe.train.loop import truncate_jsonl

log = logging.getLogger("llmpipe.train")

STOP_GRACE_S = 120  # what the ranks get to finish a step and checkpoint after a SIGTERM


def torchrun_command(module: str, config_file: Path, nproc: int, result_file: Path) -> list[str]:
    """One node, `nproc` processes of `python -m module --config config_file --result result_file`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, "--config", str(config_file), "--result", str(result_file)]


def launch_torchrun(module: str, config_file: Path, nproc: int, *, cwd: Path,
                    poll: Callable[[], Any] = lambda: None, poll_every_s: float = 1.0) -> dict[str, float]:
    """Run `module` under torchrun with `nproc` processes; returns rank 0's final metrics.

    `poll` is called every `poll_every_s` while the ranks run and once after they end (e.g. a
    MetricsForwarder). The worker's result file sits next to `config_file`. A SIGTERM or Ctrl-C of
    the stage is passed on to the ranks, which save a checkpoint before they stop."""
    result_file = config_file.parent / "result.json"
    for old in [result_file, *_error_files(result_file)]:  # a previous run's
        old.unlink(missing_ok=True)
    cmd = torchrun_command(module, config_file, nproc, result_file)
    log.info("launching %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=cwd)
    try:
        while proc.poll() is None:
            time.sleep(poll_every_s)
            poll()
    except BaseException:
        _stop(proc)
        raise
    poll()
    return _outcome(result_file, proc.returncode)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()


def _error_files(result_file: Path) -> list[Path]:
    return sorted(result_file.parent.glob(result_file.name + ".rank*.error"))


def _outcome(result_file: Path, returncode: int) -> dict[str, float]:
    errors = _error_files(result_file)
    if errors:  # a refused resume, a bad setting: the ranks agreed on it (any rank's copy will do)
        raise UserError(json.loads(errors[0].read_text())["error"])
    outcome = json.loads(result_file.read_text()) if result_file.exists() else {}
    if returncode != 0:
        raise RuntimeError(f"torchrun exited with status {returncode}; the ranks' errors are above")
    return outcome


def report_result(result_file: str | Path | None, work: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run a worker's `work`; rank 0 writes its metrics to `result_file`, and every rank that raises a
    UserError writes it next to it (`result.json.rank<R>.error`).

    The other half of `launch_torchrun`, called in the worker: the error is also re-raised, so the
    ranks exit non-zero and torchrun stops. Every rank writes its own copy because the first rank
    to exit makes torchrun kill the others, rank 0 included, before it may have written anything."""
    rank = int(os.environ.get("RANK", 0))
    write = result_file is not None and rank == 0
    try:
        metrics = work()
    except UserError as exc:  # for the stage to report as its own error, not as a failed torchrun
        if result_file is not None:
            _write_result(Path(f"{result_file}.rank{rank}.error"), {"error": str(exc)})
        raise
    if write:
        _write_result(Path(result_file), metrics)
    return metrics


def _write_result(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")  # renamed into place: a killed rank leaves no half file
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class MetricsForwarder:
    """Sends the records a worker appends to a metrics log (one JSON object with a "step" per line) to
    a tracker, as they appear; a line still being written waits for the next call."""

    def __init__(self, log_file: Path, tracker: Any, resume_step: int):
        """`resume_step`: where the worker will resume. It drops the log's later records first (see
        loop.truncate_jsonl); dropping them here, before it starts, means every line after the
        current end is new."""
        self.log_file, self.tracker = Path(log_file), tracker
        truncate_jsonl(self.log_file, resume_step)
        self.offset = self.log_file.stat().st_size if self.log_file.exists() else 0

    def __call__(self) -> int:
        """Forward the complete lines written since the last call; returns how many."""
        if not self.log_file.exists():
            return 0
        with open(self.log_file, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        lines = complete.decode("utf-8").splitlines()
        for line in lines:
            record = json.loads(line)
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        self.offset += len(complete)
        return len(lines)


@contextlib.contextmanager
def system_metrics(tracker: Any, sampling_interval_s: float = 10) -> Iterator[None]:
    """CPU/GPU/memory/disk/network sampled into the tracker's MLflow run while the block runs (psutil;
    pynvml when present); nothing without a run. MLFLOW_SYSTEM_METRICS_* variables override."""
    if not tracker.run_id:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=sampling_interval_s)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
