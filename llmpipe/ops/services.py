"""The four services of `llmpipe up`: how each starts, when it is ready, how it stops.

Every service runs in its own process group (`start_new_session`) with its own log file, so a stop
reaches the workers a server forks (uvicorn, weed's master/volume/filer goroutines live in one
process, but prefect and mlflow fork). Secrets never reach a command line (other local users can read
`ps`): they travel in the environment, in stdin, or in 0600 files under the stack directory.
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from llmpipe.errors import UserError

STOP_GRACE_S = 15  # prefect has ignored a SIGTERM for longer than this: then SIGKILL
# weed's own shutdown waits 15 s and never finished before the SIGKILL: waiting for it only costs time.
WEED_GRACE_S = 3
PG_USER = "llmpipe"  # the cluster's superuser (not the OS user it runs as)
BUCKETS = ("mlflow", "llmpipe-dvc")
# Generous: the target machine has two busy cores, and prefect migrates its schema on first start.
READY_TIMEOUT_S = {"postgres": 90, "s3": 120, "mlflow": 240, "prefect": 300}


def tool(name: str) -> str:
    """A console script of this environment (weed, mlflow, prefect), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise UserError(f"`{name}` not found next to {sys.executable} or on PATH; install the ops extra: "
                        f"pip install 'llmpipe[ops]'")
    return found


def postgres_tool(name: str) -> str:
    """initdb / pg_ctl from PATH or the Debian layout (/usr/lib/postgresql/<major>/bin)."""
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                                                    reverse=True)), None)
    if not found:
        raise UserError(f"PostgreSQL's `{name}` not found on PATH or in /usr/lib/postgresql/*/bin; install the "
                        f"server package (apt-get install postgresql) and retry")
    return str(found)


def as_postgres_user(argv: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: then they run as the `postgres` OS user."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


def postgres_owner() -> tuple[int, int] | None:
    """(uid, gid) the cluster's files must belong to when we are root, else None (our own)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise UserError("running as root, PostgreSQL needs the `postgres` OS user (initdb refuses root); "
                        "create it (useradd --system postgres) or run `llmpipe up` as a normal user") from None
    return entry.pw_uid, entry.pw_gid


# ---- processes -------------------------------------------------------------------------------

def spawn(argv: list[str], env: dict[str, str], log_file: Path, cwd: Path) -> psutil.Process:
    """Start a service as the leader of a new process group, output appended to its log."""
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return psutil.Process(proc.pid)


def identity(proc: psutil.Process) -> dict:
    """What tells this process from a later one that reuses its pid."""
    return {"pid": proc.pid, "create_time": proc.create_time()}


def find(record: dict | None) -> psutil.Process | None:
    """The live process a record names, or None (gone, a zombie, or the pid reused)."""
    if not record:
        return None
    try:
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["create_time"]) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of a process group: what a stop must leave empty."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _reap(pid: int) -> None:
    # Our own children (the test session, or `up` failing) would otherwise linger as zombies.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_group(pgid: int, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the group, wait up to `grace_s` for it to empty, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pgid)
            if not group_members(pgid):
                return
            time.sleep(0.2)


def wait_ready(name: str, proc: psutil.Process, probe, log_file: Path) -> None:
    """Poll `probe()` until it returns True; fail early if the service died."""
    deadline = time.monotonic() + READY_TIMEOUT_S[name]
    while time.monotonic() < deadline:
        if probe():
            return
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            raise UserError(f"{name} exited during startup; see its log {log_file}")
        time.sleep(0.5)
    raise UserError(f"{name} was not ready after {READY_TIMEOUT_S[name]} s; see its log {log_file}")


# ---- readiness probes ------------------------------------------------------------------------

def postgres_probe(port: int, password: str):
    import psycopg2

    def probe() -> bool:
        try:
            psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, password=password, dbname="postgres",
                             connect_timeout=3).close()
            return True
        except psycopg2.OperationalError:
            return False
    return probe


def create_databases(port: int, password: str, names: tuple[str, ...]) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, password=password, dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def s3_client(env: dict[str, str]):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))


def s3_probe(env: dict[str, str]):
    """Ready = the buckets exist and a real object round-trips (the port answers before storage is ready)."""
    from botocore.exceptions import BotoCoreError, ClientError

    def probe() -> bool:
        client = s3_client(env)
        try:
            for bucket in BUCKETS:
                try:
                    client.create_bucket(Bucket=bucket)
                except ClientError as err:
                    if err.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            key = ".llmpipe-up-probe"
            client.put_object(Bucket="mlflow", Key=key, Body=b"ready")
            ok = client.get_object(Bucket="mlflow", Key=key)["Body"].read() == b"ready"
            client.delete_object(Bucket="mlflow", Key=key)
            return ok
        except (BotoCoreError, ClientError):
            return False
    return probe


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def http_probe(url: str, authorization: str):
    """Ready = an authenticated GET answers 200 (a 401 would mean the auth setup is wrong, so keep waiting)."""
    def probe() -> bool:
        request = urllib.request.Request(url, headers={"Authorization": authorization})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False
    return probe
