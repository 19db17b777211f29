"""`llmpipe up` / `llmpipe down` with the real servers: anonymous requests refused, credentials accepted,
secrets private and never logged, loopback only, idempotent, and a down that leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import stat
import time
import urllib.error
import urllib.request

import psutil
import pytest

from llmpipe.ops import services, stack as ops_stack
from tests.ops.stack_fixture import free_ports, require_stack_tools, stack_dir, stop_stack

pytestmark = pytest.mark.stack


def http_status(url: str, authorization: str | None = None, data: bytes | None = None) -> int:
    headers = {"Authorization": authorization} if authorization else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, headers=headers, data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def stack_processes(directory) -> list[psutil.Process]:
    """Every live process of the stack: each service's process group and the postmaster's children."""
    state = json.loads((directory / ops_stack.STATE).read_text())
    procs: dict[int, psutil.Process] = {}
    for record in state["services"].values():
        leader = services.find(record)
        assert leader is not None, f"a recorded service is not running: {record}"
        for proc in [leader, *leader.children(recursive=True), *services.group_members(leader.pid)]:
            procs[proc.pid] = proc
    return list(procs.values())


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def changed_keys(new: dict[str, str], old: dict[str, str]) -> list[str]:
    """Names only: a failure report must not print the values."""
    return sorted(key for key in new.keys() | old.keys() if new.get(key) != old.get(key))


def secret_values(env: dict[str, str], server: dict[str, str]) -> list[str]:
    keys = ["MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"]
    return ([env[key] for key in keys] + [env["PREFECT_API_AUTH_STRING"].split(":", 1)[1]]
            + [server[key] for key in ops_stack.SERVER_KEYS])


# --- authentication: refused without credentials, accepted with them ---------------------------

def test_mlflow_refuses_anonymous_and_accepts_the_generated_user(stack):
    url = f"{stack.urls['mlflow']}/api/2.0/mlflow/experiments/search?max_results=5"
    assert http_status(url) == 401
    assert http_status(url, services.basic_auth("admin", "not-the-password")) == 401
    auth = services.basic_auth(stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    assert http_status(url, auth) == 200


def test_prefect_refuses_anonymous_and_accepts_the_auth_string(stack):
    url = f"{stack.env['PREFECT_API_URL']}/flows/filter"
    assert http_status(url, data=b"{}") == 401
    assert http_status(url, services.basic_auth("llmpipe", "wrong"), data=b"{}") == 401
    user, password = stack.env["PREFECT_API_AUTH_STRING"].split(":", 1)
    assert http_status(url, services.basic_auth(user, password), data=b"{}") == 200


def test_s3_refuses_anonymous_and_accepts_the_generated_keys(stack):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    anonymous = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError) as refused:
        anonymous.put_object(Bucket="llmpipe-dvc", Key="anonymous.txt", Body=b"x")
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError) as refused:
        anonymous.list_objects_v2(Bucket="llmpipe-dvc")
    assert refused.value.response["Error"]["Code"] == "AccessDenied"

    client = services.s3_client(stack.env)
    client.put_object(Bucket="llmpipe-dvc", Key="test/hello.txt", Body=b"hello")
    assert client.get_object(Bucket="llmpipe-dvc", Key="test/hello.txt")["Body"].read() == b"hello"
    assert {b["Name"] for b in client.list_buckets()["Buckets"]} >= {"mlflow", "llmpipe-dvc"}


def test_postgres_refuses_a_wrong_password_and_holds_the_databases(stack):
    import psycopg2

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=stack.ports.postgres, user=services.PG_USER, password="wrong",
                         dbname="postgres", connect_timeout=10).close()
    conn = psycopg2.connect(host="127.0.0.1", port=stack.ports.postgres, user=services.PG_USER,
                            password=ops_stack.server_secrets(stack.dir)[ops_stack.PG_PASSWORD_KEY], dbname="postgres", connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            assert {"mlflow", "mlflow_auth", "prefect"} <= {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


# --- what a user of the machine would notice ------------------------------------------------------

def test_credentials_are_private_and_never_printed_logged_or_on_a_command_line(stack):
    for name in (ops_stack.CREDENTIALS, ops_stack.SERVER_SECRETS, "mlflow-auth.ini", "s3-identities.json"):
        info = (stack.dir / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o600, name
        assert info.st_uid == os.geteuid(), name
    assert stat.S_IMODE(stack.dir.stat().st_mode) & 0o067 == 0  # no one else may list or write it

    secrets = secret_values(stack.env, ops_stack.server_secrets(stack.dir))
    assert not set(ops_stack.SERVER_KEYS) & set(stack.env)  # a client's environment never holds the servers' own
    assert all(len(value) >= 16 for value in secrets)
    assert stack.output.strip(), "up printed nothing: the capture is broken"
    # `not any(...)`: a failure report must not print the secret it found.
    assert not any(secret in stack.output for secret in secrets), "a secret is in up's output"
    logs = sorted((stack.dir / "logs").glob("*.log"))
    assert {p.stem for p in logs} == set(ops_stack.SERVICES)
    for log in logs:
        text = log.read_text(errors="replace")
        assert not any(secret in text for secret in secrets), f"a secret is in {log}"
    for proc in stack_processes(stack.dir):
        command_line = " ".join(proc.cmdline())
        assert not any(secret in command_line for secret in secrets), f"a secret is on {proc.name()}'s command line"


def test_every_listening_socket_is_on_loopback(stack):
    pids = {proc.pid for proc in stack_processes(stack.dir)}
    listening = [c for c in psutil.net_connections(kind="inet") if c.pid in pids and c.status == psutil.CONN_LISTEN]
    ports = {c.laddr.port for c in listening}
    assert {stack.ports.postgres, stack.ports.s3, stack.ports.mlflow, stack.ports.prefect} <= ports
    assert [c.laddr for c in listening if c.laddr.ip != "127.0.0.1"] == []


def test_up_again_is_a_no_op(stack):
    before = json.loads((stack.dir / ops_stack.STATE).read_text())["services"]
    lines: list[str] = []
    started = time.monotonic()
    urls = ops_stack.up(stack.dir, stack.ports, log=lines.append)
    assert time.monotonic() - started < 10
    assert urls == stack.urls
    assert json.loads((stack.dir / ops_stack.STATE).read_text())["services"] == before
    assert [line for line in lines if "already running" in line] == [f"{name}: already running"
                                                                     for name in ops_stack.SERVICES]
    assert changed_keys(ops_stack.stack_env(stack.dir), stack.env) == []  # the secrets are generated once


@pytest.mark.slow
def test_a_failed_up_names_the_service_and_stops_what_it_started():
    """A second stack with the MLflow port taken: postgres and s3 come up, mlflow cannot bind."""
    import socket

    from llmpipe.errors import UserError

    require_stack_tools()
    directory = stack_dir()
    try:
        ports = free_ports()
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", ports.mlflow))
            squatter.listen()
            lines: list[str] = []
            with pytest.raises(UserError, match=r"^mlflow .*logs/mlflow\.log"):
                ops_stack.up(directory, ports, log=lines.append)
        first = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", " ".join(lines))]
        assert len(first) == 2  # postgres and s3 were up before mlflow failed
        assert [pid for pid in first if alive(pid)] == []
        assert ops_stack.running(directory) == {name: False for name in ops_stack.SERVICES}
    finally:
        stop_stack(directory)


# Last in this module: it takes the session stack down and brings it back for the modules after it.
@pytest.mark.slow
def test_down_leaves_no_process_and_up_restarts_with_the_data(stack):
    client = services.s3_client(stack.env)
    client.put_object(Bucket="llmpipe-dvc", Key="test/kept.txt", Body=b"kept")
    auth = services.basic_auth(stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    create = f"{stack.urls['mlflow']}/api/2.0/mlflow/experiments/create"
    assert http_status(create, auth, data=json.dumps({"name": "kept-across-restart"}).encode()) == 200

    procs = stack_processes(stack.dir)
    assert len(procs) >= 4
    assert ops_stack.down(stack.dir, log=lambda _line: None) == list(reversed(ops_stack.SERVICES))
    left = [p for p in procs if alive(p.pid) and p.is_running()]
    assert left == [], f"left running after down: {[p.name() for p in left]}"
    assert ops_stack.running(stack.dir) == {name: False for name in ops_stack.SERVICES}

    assert ops_stack.up(stack.dir, log=lambda _line: None) == stack.urls  # the recorded ports
    assert changed_keys(ops_stack.stack_env(stack.dir), stack.env) == []
    assert client.get_object(Bucket="llmpipe-dvc", Key="test/kept.txt")["Body"].read() == b"kept"
    search = f"{stack.urls['mlflow']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=kept-across-restart"
    assert http_status(search, auth) == 200
    assert http_status(search) == 401
