"""The server stack for tests: one `llmpipe up` per session, in a throwaway directory at free ports.

tests/conftest.py imports the fixture, so every test directory shares the one session stack (a second
conftest defining it would start a second stack). Use the session fixture `stack` (mark the test
`@pytest.mark.stack`). It yields a `StackHandle`:
    .dir     the stack directory (credentials.env, stack.json, logs/)
    .env     the client environment from credentials.env (MLFLOW_TRACKING_URI/USERNAME/PASSWORD,
             PREFECT_API_URL, PREFECT_API_AUTH_STRING, AWS_*, MLFLOW_S3_ENDPOINT_URL, LLMPIPE_DVC_REMOTE_URL)
    .urls    service_urls(): mlflow, prefect (UI), prefect_api, s3, postgres (no secrets)
    .ports   the Ports it runs on
    .output  everything `up` printed, child processes' stray output included
Apply `.env` with monkeypatch.setenv (or pass it to a subprocess); never print it.
When PostgreSQL (initdb) or weed is missing the stack tests fail under CI and are skipped elsewhere.
With LLMPIPE_TEST_STACK_DIR set (.ci/run sets it), the stack lives in that directory, so whoever
set it can stop it even when pytest itself is killed. tests/conftest.py runs the stack tests last:
the servers run only while they are needed, not beside the rest of the suite on two cores.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmpipe.errors import UserError
from llmpipe.ops import services, stack as ops_stack


@dataclass
class StackHandle:
    dir: Path
    env: dict[str, str]
    urls: dict[str, str]
    ports: ops_stack.Ports
    output: str


def require_stack_tools() -> None:
    """Skip (fail under CI) when the stack's binaries are not installed."""
    try:
        services.postgres_tool("initdb")
        services.postgres_tool("pg_ctl")
        services.tool("weed")
    except UserError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the stack tests: {err}")
        pytest.skip(f"server stack not installable here: {err}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(avoid: ops_stack.Ports | None = None) -> ops_stack.Ports:
    """A port offset whose every port (weed's gRPC ones included) is free, below the ephemeral range."""
    taken = set(avoid.all()) if avoid else set()
    for base in random.sample(range(-4000, 3000, 7), 200):
        ports = ops_stack.Ports.offset(base)
        if not taken & set(ports.all()) and all(map(_port_free, ports.all())):
            return ports
    raise RuntimeError("no free port range for the test stack")


@contextlib.contextmanager
def captured_output():
    """Everything written to stdout/stderr meanwhile, at the Python and the file-descriptor level."""
    text = io.StringIO()
    with tempfile.TemporaryFile() as raw:
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(raw.fileno(), 1), os.dup2(raw.fileno(), 2)
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield text
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            raw.seek(0)
            text.write(raw.read().decode(errors="replace"))


def stack_dir() -> Path:
    # Under /tmp itself, not pytest's 0700 tmp tree: as root the server runs as `postgres`, which must
    # traverse every parent of the stack directory.
    return Path(tempfile.mkdtemp(prefix="llmpipe-stack-"))


def start_stack(directory: Path, ports: ops_stack.Ports | None) -> StackHandle:
    """`up` in `directory` (None: on the ports it already runs on) and the handle to it."""
    with captured_output() as out:
        urls = ops_stack.up(directory, ports)
    return StackHandle(directory, ops_stack.stack_env(directory), urls, ops_stack.ports(directory), out.getvalue())


def stop_stack(directory: Path) -> None:
    try:
        ops_stack.down(directory, log=lambda _line: None)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def stack():
    require_stack_tools()
    given = os.environ.get("LLMPIPE_TEST_STACK_DIR")
    directory = Path(given) if given else stack_dir()  # .ci/run's: it stops the stack there on any exit
    try:
        yield start_stack(directory, free_ports())
    finally:
        stop_stack(directory)  # also after a failed `up`, which stops what it started itself
