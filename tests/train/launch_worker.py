"""A worker for tests/train/test_launch.py: what a training worker does with llmpipe.train.launch,
without the training. `python -m tests.train.launch_worker --config FILE [--result FILE]`, the config
naming a mode and an output folder."""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from llmpipe.errors import UserError
from llmpipe.train.launch import report_result


def work(cfg: dict) -> dict:
    rank, out, mode = int(os.environ["RANK"]), Path(cfg["out"]), cfg["mode"]
    if mode in ("user_error", "user_error_rank0_late"):  # the ranks agree on it (the broadcast resume check)
        if mode == "user_error_rank0_late" and rank == 0:
            time.sleep(5)  # rank 1 exits first and torchrun kills rank 0 before it can say anything
        raise UserError("pretrain.lr: checkpoints 0.002 != params.yaml 0.001")
    if mode == "crash" and rank == 1:
        raise RuntimeError("rank 1 ran out of memory")
    if mode == "log" and rank == 0:  # a metrics log that grows while the stage polls it
        with open(out / "metrics.jsonl", "a") as fh:
            for step in range(1, 4):
                fh.write(json.dumps({"step": step, "train/loss": 5.0 - step}) + "\n")
                fh.flush()
                time.sleep(1.2)
    if mode == "until_sigterm":
        signal.signal(signal.SIGTERM, lambda *_: stop(out / f"rank{rank}-saved"))
        (out / f"rank{rank}-ready").touch()
        time.sleep(120)
        raise UserError("no SIGTERM came")
    return {"steps": 3.0, "rank": float(rank)}


def stop(marker: Path) -> None:
    time.sleep(2)  # where a trainer finishes its step and saves a checkpoint: the stage must wait for it
    marker.touch()
    sys.exit(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--result")
    args = parser.parse_args()
    report_result(args.result, lambda: work(json.loads(Path(args.config).read_text())))
