"""Every environment variable llmpipe reads, with its meaning and default: the one list.

Code reads these through the getters below, never through `os.environ` directly, so this table is
complete (tests/test_env.py checks every `LLMPIPE_*` name in the code against it, and the README's
settings table against `markdown_table()`); `llmpipe env` prints it with the current values.
A value that cannot be read is a UserError naming the variable and what it accepts.

Standard library only: anything in llmpipe may import it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from llmpipe.errors import UserError


@dataclass(frozen=True)
class Setting:
    name: str
    default: str  # as shown to users; "" = unset
    meaning: str
    read_by: str  # who reads it: llmpipe, llmpipe run (sets it for its stages), scripts/install.sh, tests, ...

    def raw(self) -> str | None:
        """The value as set, None when unset or empty (an empty value means the default)."""
        return os.environ.get(self.name) or None


PROJECT = Setting("LLMPIPE_PROJECT", "", "project root (the directory holding dvc.yaml); unset: the first "
                  "directory from the working directory upwards that holds one", "llmpipe")
WORKERS = Setting("LLMPIPE_WORKERS", "0", "worker processes of the data stages (ingest, clean, dedup, tokenizer "
                  "encoding); 0: one per CPU core", "llmpipe")
TRACKING = Setting("LLMPIPE_TRACKING", "on", "MLflow tracking: on, or off (no runs are recorded)", "llmpipe")
TRACKING_URI = Setting("MLFLOW_TRACKING_URI", "", "MLflow server to record runs in; unset: the SQLite store "
                       "mlruns/mlflow.db in the project", "llmpipe")
EXPERIMENT = Setting("LLMPIPE_EXPERIMENT", "llmpipe", "MLflow experiment that runs are recorded under", "llmpipe")
DEBUG = Setting("LLMPIPE_DEBUG", "off", "on: show the traceback of user errors too (what `llmpipe --debug` "
                "sets, also for the stages it starts)", "llmpipe")
PARENT_RUN_ID = Setting("LLMPIPE_PARENT_RUN_ID", "", "MLflow run to nest a stage's run under; `llmpipe run` sets "
                        "it for each stage to its pipeline run", "llmpipe run (for its stages)")
TORCH = Setting("LLMPIPE_TORCH", "torch==2.13.0", "torch requirement installed before llmpipe; e.g. `torch` "
                "on a GPU node for a CUDA build", "scripts/install.sh")
EXTRAS = Setting("LLMPIPE_EXTRAS", "test", "extras of llmpipe to install, comma-separated (test, bench, gpu, ops)",
                 "scripts/install.sh")
TEST_STACK_DIR = Setting("LLMPIPE_TEST_STACK_DIR", "", "a running stack the `stack` tests use (and leave "
                         "running); unset: they start their own at free ports; .ci/run sets it", "tests")
TEST_CACHE = Setting("LLMPIPE_TEST_CACHE", "~/.cache/llmpipe-tests", "where tests keep the demo corpus they "
                     "fetch (unless data/sources/ has it)", "tests")
STACK_DIR = Setting("LLMPIPE_STACK_DIR", "~/.llmpipe/stack", "where `llmpipe up` keeps the server stack's data, "
                    "logs and generated credentials (credentials.env, readable only by you); as root the default "
                    "is /var/lib/llmpipe/stack, which PostgreSQL's own user can reach", "llmpipe up/down/status")
DVC_REMOTE_URL = Setting("LLMPIPE_DVC_REMOTE_URL", "", "the stack's bucket for DVC remotes, written into "
                         "credentials.env by `llmpipe up`: `dvc remote add -d store $LLMPIPE_DVC_REMOTE_URL/<project>`",
                         "you (dvc remote add)")
DASK_SCHEDULER = Setting("LLMPIPE_DASK_SCHEDULER", "", "Dask scheduler address (tcp://host:8786) to run the data "
                         "stages' shards on; its workers must see the project directory; unset: local processes",
                         "llmpipe")
BENCH_CACHE = Setting("LLMPIPE_BENCH_CACHE", "~/.cache/llmpipe-bench", "where benchmarks keep the demo corpus "
                      "they fetch", "benchmarks")

SETTINGS: tuple[Setting, ...] = (PROJECT, WORKERS, TRACKING, TRACKING_URI, EXPERIMENT, DEBUG, PARENT_RUN_ID,
                                 STACK_DIR, DVC_REMOTE_URL, DASK_SCHEDULER, TORCH, EXTRAS, TEST_STACK_DIR,
                                 TEST_CACHE, BENCH_CACHE)

_ON = {"on", "1", "true", "yes"}
_OFF = {"off", "0", "false", "no"}


def _switch(setting: Setting) -> bool:
    value = (setting.raw() or setting.default).lower()
    if value not in _ON | _OFF:
        raise UserError(f"{setting.name}={setting.raw()}: not a switch; set it to on or off (or unset it: "
                        f"{setting.default})")
    return value in _ON


def project_dir() -> Path | None:
    value = PROJECT.raw()
    return Path(value).resolve() if value else None


def workers() -> int:
    """The number of worker processes, validated: a count >= 1 (0 or unset: the CPU count)."""
    value = WORKERS.raw() or WORKERS.default
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise UserError(f"{WORKERS.name}={value}: not a number of worker processes; set it to a whole number "
                        f">= 1, or 0 (or unset it) for one per CPU core")
    return count or (os.cpu_count() or 1)


def stack_dir() -> Path:
    if STACK_DIR.raw():
        return Path(STACK_DIR.raw()).expanduser().resolve()
    # As root PostgreSQL runs as its own user, which may not enter /root.
    return Path("/var/lib/llmpipe/stack") if os.geteuid() == 0 else Path(STACK_DIR.default).expanduser()


def dask_scheduler() -> str | None:
    """The scheduler address, validated: tcp://, tls:// or inproc:// (None: local processes)."""
    value = DASK_SCHEDULER.raw()
    if value and not re.match(r"^(tcp|tls|inproc|ucx)://\S+$", value):
        raise UserError(f"{DASK_SCHEDULER.name}={value}: not a Dask scheduler address; set it to one like "
                        f"tcp://127.0.0.1:8786 (or unset it to run on local processes)")
    return value


def tracking_enabled() -> bool:
    return _switch(TRACKING)


def tracking_uri() -> str | None:
    return TRACKING_URI.raw()


def experiment() -> str:
    return EXPERIMENT.raw() or EXPERIMENT.default


def debug() -> bool:
    return _switch(DEBUG)


def debug_or_off() -> bool:
    """debug(), but False for a bad value: for error reporting and logging, which must not fail themselves
    (`check` reports the bad value)."""
    try:
        return debug()
    except UserError:
        return False


def parent_run_id() -> str | None:
    return PARENT_RUN_ID.raw()


def check() -> None:
    """Read every setting llmpipe itself interprets, so a bad value stops a command before any work."""
    workers()
    dask_scheduler()
    tracking_enabled()
    debug()


def current_values() -> list[tuple[Setting, str]]:
    """Each setting with what is in effect now: the value set, else '(default)'."""
    return [(s, s.raw() if s.raw() is not None else "(default)") for s in SETTINGS]


def markdown_table() -> str:
    """The settings as the README shows them (tests/test_env.py keeps the two identical)."""
    rows = ["| variable | default | meaning | read by |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "unset"
        rows.append(f"| `{s.name}` | {default} | {s.meaning} | {s.read_by} |")
    return "\n".join(rows)


__all__ = ["Setting", "SETTINGS", "check", "current_values", "debug", "debug_or_off", "experiment", "markdown_table",
           "dask_scheduler", "parent_run_id", "project_dir", "stack_dir", "tracking_enabled", "tracking_uri", "workers"]
