"""`llmpipe up` / `llmpipe down`: the server stack on one machine, without Docker.

PostgreSQL (the OS packages) backs an MLflow tracking server with its basic-auth app and a Prefect
server with its API auth string; SeaweedFS (`weed`, from PyPI) is the S3 store for MLflow artifacts
and the DVC remote, with generated keys. Everything listens on 127.0.0.1 only and lives under one
directory:

    stack_dir/credentials.env   the client environment, its secrets included (0600; the only copy)
    stack_dir/server.env        the servers' own secrets, which no client needs (0600)
    stack_dir/stack.json        ports and process ids (no secrets)
    stack_dir/logs/<name>.log   one log per service (never a secret: those stay in env, stdin, 0600 files)
    stack_dir/postgres, s3, prefect-home, mlflow-auth.ini, s3-identities.json

`up` is idempotent (running services are left alone) and on a failure stops what it started.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from llmpipe.errors import UserError
from llmpipe.ops import services as svc

SERVICES = ("postgres", "s3", "mlflow", "prefect")  # start order; stopped in reverse
CREDENTIALS = "credentials.env"
SERVER_SECRETS = "server.env"
STATE = "stack.json"
PG_PASSWORD_KEY = "POSTGRES_PASSWORD"
FLASK_KEY = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # signs the basic-auth app's CSRF tokens (MLflow's own name)
SERVER_KEYS = (PG_PASSWORD_KEY, FLASK_KEY)
MLFLOW_ADMIN = "admin"
PREFECT_USER = "llmpipe"


@dataclass(frozen=True)
class Ports:
    postgres: int = 15432
    s3: int = 18333
    weed_master: int = 19333
    weed_volume: int = 18080
    weed_filer: int = 18888
    mlflow: int = 15000
    prefect: int = 14200

    @classmethod
    def offset(cls, base: int) -> Ports:
        """Every default port plus `base` (two stacks on one machine; tests use a free base)."""
        return cls(**{f.name: f.default + base for f in dataclasses.fields(cls)})

    def all(self) -> list[int]:
        """Every port the stack listens on: weed's gRPC ports are its HTTP ports + 10000."""
        weed = [self.s3, self.weed_master, self.weed_volume, self.weed_filer]
        return [self.postgres, self.mlflow, self.prefect, *weed, *(p + 10000 for p in weed)]


# ---- the directory, state and credentials ----------------------------------------------------

def _prepare_dir(stack_dir: Path) -> None:
    (stack_dir / "logs").mkdir(parents=True, exist_ok=True)
    owner = svc.postgres_owner()
    if owner is None:
        stack_dir.chmod(0o700)
        return
    # As root the server runs as `postgres`, which must traverse the directory (never list it):
    # root:postgres 0710; every secret inside stays root-only (0600).
    os.chown(stack_dir, 0, owner[1])
    stack_dir.chmod(0o710)
    (stack_dir / "logs").chmod(0o700)
    probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(stack_dir)], capture_output=True)
    if probe.returncode != 0:
        raise UserError(f"the `postgres` OS user cannot reach {stack_dir} (a parent directory is closed to it); "
                        f"set LLMPIPE_STACK_DIR to a directory under one it can traverse, e.g. /var/lib/llmpipe-stack")


def _write_private(path: Path, text: str) -> None:
    """Write a secret-bearing file that is 0600 from its first byte, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def _load_state(stack_dir: Path) -> dict:
    path = stack_dir / STATE
    return json.loads(path.read_text()) if path.exists() else {"ports": None, "services": {}}


def _save_state(stack_dir: Path, state: dict) -> None:
    tmp = stack_dir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, stack_dir / STATE)


def _client_env(ports: Ports, keys: dict[str, str]) -> dict[str, str]:
    """What a client (llmpipe run, dvc, prefect worker) needs: credentials.env's content."""
    s3 = f"http://127.0.0.1:{ports.s3}"
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports.mlflow}",
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": keys["MLFLOW_TRACKING_PASSWORD"],
        "PREFECT_API_URL": f"http://127.0.0.1:{ports.prefect}/api",
        "PREFECT_API_AUTH_STRING": keys["PREFECT_API_AUTH_STRING"],
        "AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ENDPOINT_URL": s3,  # boto3 >= 1.28 (dvc-s3, plain clients) read the endpoint from here
        "LLMPIPE_DVC_REMOTE_URL": "s3://llmpipe-dvc",
    }


def _credentials(stack_dir: Path, ports: Ports) -> dict[str, str]:
    """The secrets are generated once; the URLs follow the ports of this start."""
    path, server_path = stack_dir / CREDENTIALS, stack_dir / SERVER_SECRETS
    old = {**(_read_env_file(path) if path.exists() else {}),
           **(_read_env_file(server_path) if server_path.exists() else {})}
    keys = {
        "MLFLOW_TRACKING_PASSWORD": old.get("MLFLOW_TRACKING_PASSWORD") or secrets.token_urlsafe(24),
        "PREFECT_API_AUTH_STRING": old.get("PREFECT_API_AUTH_STRING")
        or f"{PREFECT_USER}:{secrets.token_urlsafe(24)}",
        "AWS_ACCESS_KEY_ID": old.get("AWS_ACCESS_KEY_ID") or secrets.token_hex(10).upper(),
        "AWS_SECRET_ACCESS_KEY": old.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(30),
        PG_PASSWORD_KEY: old.get(PG_PASSWORD_KEY) or secrets.token_urlsafe(24),
        FLASK_KEY: old.get(FLASK_KEY) or secrets.token_urlsafe(32),
    }
    env = _client_env(ports, keys)
    header = "# llmpipe server stack: `set -a; . ./credentials.env; set +a` exports it. Keep it private.\n"
    _write_private(path, header + "".join(f"{k}={v}\n" for k, v in env.items()))
    # Kept so a restart finds them; apart from the client file, so no client's environment holds them.
    server = {k: keys[k] for k in SERVER_KEYS}
    _write_private(server_path, "# the stack's servers' own secrets: no client needs them\n"
                   + "".join(f"{k}={v}\n" for k, v in server.items()))
    return {**env, **server}


def _ports_for(state: dict, requested: Ports | None) -> Ports:
    recorded = Ports(**state["ports"]) if state.get("ports") else None
    if requested and recorded and requested != recorded and any(svc.find(r) for r in state["services"].values()):
        raise UserError(f"the stack runs on other ports ({recorded}); run `llmpipe down` first to move it")
    return requested or recorded or Ports()


# ---- one function per service: start it, return its process ----------------------------------

def _server_env(extra: dict[str, str]) -> dict[str, str]:
    # A caller's own MLFLOW_/PREFECT_/AWS_ settings (a test server, a cloud profile) must not leak in.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    return {**base, **extra}


def _start_postgres(stack_dir: Path, ports: Ports, env: dict[str, str], log_file: Path):
    data = stack_dir / "postgres"
    owner = svc.postgres_owner()
    with open(log_file, "ab") as log:
        if not (data / "PG_VERSION").exists():
            data.mkdir(mode=0o700, exist_ok=True)
            if owner:
                os.chown(data, *owner)
            # A 0600 file of the server's user, gone right after: never on a command line.
            pwfile = stack_dir / "postgres-init.pw"
            _write_private(pwfile, env[PG_PASSWORD_KEY])
            if owner:
                os.chown(pwfile, *owner)
            try:
                subprocess.run(svc.as_postgres_user([svc.postgres_tool("initdb"), "-D", str(data), "-U", svc.PG_USER,
                                                     "-A", "scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"]),
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=True)
            finally:
                pwfile.unlink()
        # No unix socket (nothing outside stack_dir); TCP on loopback only. The postmaster inherits
        # pg_ctl's output, so it logs into our file even when it runs as another user.
        options = f"-c listen_addresses=127.0.0.1 -p {ports.postgres} -c unix_socket_directories=''"
        subprocess.run(svc.as_postgres_user([svc.postgres_tool("pg_ctl"), "start", "-w", "-t", "90", "-D", str(data),
                                             "-o", options]),
                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=True,
                       start_new_session=True)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return psutil.Process(pid)


def _pg_url(driver: str, ports: Ports, env: dict[str, str], db: str) -> str:
    return f"postgresql+{driver}://{svc.PG_USER}:{env[PG_PASSWORD_KEY]}@127.0.0.1:{ports.postgres}/{db}"


def _start_s3(stack_dir: Path, ports: Ports, env: dict[str, str], log_file: Path):
    identities = {"identities": [{"name": "llmpipe",
                                  "credentials": [{"accessKey": env["AWS_ACCESS_KEY_ID"],
                                                   "secretKey": env["AWS_SECRET_ACCESS_KEY"]}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    config = stack_dir / "s3-identities.json"
    _write_private(config, json.dumps(identities))
    (stack_dir / "s3").mkdir(exist_ok=True)
    (stack_dir / "run").mkdir(mode=0o700, exist_ok=True)
    argv = [svc.tool("weed"), "server", f"-dir={stack_dir / 's3'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports.weed_master}", f"-volume.port={ports.weed_volume}",
            "-filer", f"-filer.port={ports.weed_filer}", f"-filer.localSocket={stack_dir / 'run' / 'filer.sock'}",
            "-s3", f"-s3.port={ports.s3}", f"-s3.config={config}", f"-s3.localSocket={stack_dir / 'run' / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # The default volume limit makes uploads fail on a fresh single-node store.
            "-volume.max=100", "-master.telemetry=false"]
    return svc.spawn(argv, _server_env({}), log_file, cwd=stack_dir)


def _start_mlflow(stack_dir: Path, ports: Ports, env: dict[str, str], log_file: Path):
    ini = stack_dir / "mlflow-auth.ini"
    _write_private(ini, "[mlflow]\ndefault_permission = READ\n"
                        f"database_uri = {_pg_url('psycopg2', ports, env, 'mlflow_auth')}\n"
                        f"admin_username = {MLFLOW_ADMIN}\nadmin_password = {env['MLFLOW_TRACKING_PASSWORD']}\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    server_env = _server_env({
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": env[FLASK_KEY],
        # Through the environment, not argv: the URI carries the database password.
        "MLFLOW_BACKEND_STORE_URI": _pg_url("psycopg2", ports, env, "mlflow"),
        **{k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                               "MLFLOW_S3_ENDPOINT_URL")}})
    argv = [svc.tool("mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports.mlflow), "--workers", "1",
            "--artifacts-destination", "s3://mlflow", "--app-name", "basic-auth"]
    return svc.spawn(argv, server_env, log_file, cwd=stack_dir)


def _start_prefect(stack_dir: Path, ports: Ports, env: dict[str, str], log_file: Path):
    home = stack_dir / "prefect-home"
    home.mkdir(mode=0o700, exist_ok=True)
    server_env = _server_env({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": _pg_url("asyncpg", ports, env, "prefect"),
        "PREFECT_SERVER_API_AUTH_STRING": env["PREFECT_API_AUTH_STRING"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": env["PREFECT_API_URL"],
        "PREFECT_API_AUTH_STRING": env["PREFECT_API_AUTH_STRING"],  # the server's own services call its API
    })
    argv = [svc.tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports.prefect)]
    return svc.spawn(argv, server_env, log_file, cwd=stack_dir)


_STARTERS = {"postgres": _start_postgres, "s3": _start_s3, "mlflow": _start_mlflow, "prefect": _start_prefect}


def _probe(name: str, ports: Ports, env: dict[str, str]):
    if name == "postgres":
        return svc.postgres_probe(ports.postgres, env[PG_PASSWORD_KEY])
    if name == "s3":
        return svc.s3_probe(env)
    if name == "mlflow":
        return svc.http_probe(f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1",
                              svc.basic_auth(MLFLOW_ADMIN, env["MLFLOW_TRACKING_PASSWORD"]))
    user, password = env["PREFECT_API_AUTH_STRING"].split(":", 1)
    return svc.http_probe(f"{env['PREFECT_API_URL']}/health", svc.basic_auth(user, password))


# ---- the public API ----------------------------------------------------------------------------

def _start_one(stack_dir: Path, name: str, ports: Ports, env: dict[str, str], state: dict, log) -> None:
    log_file = stack_dir / "logs" / f"{name}.log"
    try:
        proc = _STARTERS[name](stack_dir, ports, env, log_file)
    except subprocess.CalledProcessError:
        raise UserError(f"{name} failed to start; see its log {log_file}") from None
    state["services"][name] = svc.identity(proc)
    _save_state(stack_dir, state)
    svc.wait_ready(name, proc, _probe(name, ports, env), log_file)
    if name == "postgres":
        svc.create_databases(ports.postgres, env[PG_PASSWORD_KEY], ("mlflow", "mlflow_auth", "prefect"))
    log(f"{name}: ready on 127.0.0.1 (pid {proc.pid}), log {log_file}")


def up(stack_dir: Path, ports: Ports | None = None, log=print) -> dict[str, str]:
    """Start every service not already running; on a failure stop what this call started."""
    stack_dir = Path(stack_dir)
    _prepare_dir(stack_dir)
    state = _load_state(stack_dir)
    ports = _ports_for(state, ports)
    state["ports"] = dataclasses.asdict(ports)
    env = _credentials(stack_dir, ports)
    started: list[str] = []
    try:
        for name in SERVICES:
            if svc.find(state["services"].get(name)):
                log(f"{name}: already running")
                continue
            started.append(name)
            _start_one(stack_dir, name, ports, env, state, log)
    except BaseException:
        for name in reversed(started):
            _stop_one(stack_dir, name, state)
        raise
    log(f"credentials: {stack_dir / CREDENTIALS} (readable only by you); export them with "
        f"`set -a; . {stack_dir / CREDENTIALS}; set +a`")
    return service_urls(stack_dir)


def _stop_one(stack_dir: Path, name: str, state: dict) -> bool:
    proc = svc.find(state["services"].get(name))
    if proc is not None and name == "postgres":
        subprocess.run(svc.as_postgres_user([svc.postgres_tool("pg_ctl"), "stop", "-m", "fast", "-w", "-t", "15",
                                             "-D", str(stack_dir / "postgres")]),
                       stdin=subprocess.DEVNULL, capture_output=True)
        if svc.find(state["services"][name]):
            proc.kill()
    elif proc is not None:
        # the leader's pid is its group id (start_new_session)
        svc.stop_group(proc.pid, svc.WEED_GRACE_S if name == "s3" else svc.STOP_GRACE_S)
    state["services"].pop(name, None)
    _save_state(stack_dir, state)
    return proc is not None


def down(stack_dir: Path, log=print) -> list[str]:
    """Stop every service of the stack (newest first); returns the names that were running."""
    stack_dir = Path(stack_dir)
    if not (stack_dir / STATE).exists():
        log(f"no stack in {stack_dir}")
        return []
    state = _load_state(stack_dir)
    stopped = [name for name in reversed(SERVICES) if _stop_one(stack_dir, name, state)]
    for name in stopped:
        log(f"{name}: stopped")
    return stopped


def stack_env(stack_dir: Path) -> dict[str, str]:
    """The client environment (secrets included) from credentials.env."""
    path = Path(stack_dir) / CREDENTIALS
    if not path.exists():
        raise UserError(f"{path} does not exist; start the stack with `llmpipe up` first")
    return _read_env_file(path)


def server_secrets(stack_dir: Path) -> dict[str, str]:
    """The servers' own secrets (the PostgreSQL password, MLflow's signing key): for administration."""
    return _read_env_file(Path(stack_dir) / SERVER_SECRETS)


def ports(stack_dir: Path) -> Ports:
    """The ports the stack in `stack_dir` was last started on."""
    return _ports_for(_load_state(Path(stack_dir)), None)


def service_urls(stack_dir: Path) -> dict[str, str]:
    """Where each service answers (no secrets)."""
    ports = _ports_for(_load_state(Path(stack_dir)), None)
    return {"mlflow": f"http://127.0.0.1:{ports.mlflow}", "prefect": f"http://127.0.0.1:{ports.prefect}",
            "prefect_api": f"http://127.0.0.1:{ports.prefect}/api", "s3": f"http://127.0.0.1:{ports.s3}",
            "postgres": f"127.0.0.1:{ports.postgres}"}


def running(stack_dir: Path) -> dict[str, bool]:
    state = _load_state(Path(stack_dir))
    return {name: svc.find(state["services"].get(name)) is not None for name in SERVICES}
