"""The pipeline against the server stack (`llmpipe up`): MLflow and Prefect servers on PostgreSQL, the
S3 store for MLflow's artifacts and as the DVC remote. What a team sees after moving a project off a
laptop: its runs and registry in the database, its files in the object store, a fresh clone restored
by `dvc pull`, and `llmpipe status` naming the servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.helpers import git_commit_all, status_section

pytestmark = [pytest.mark.slow, pytest.mark.stack]

LLMPIPE = str(Path(sys.executable).parent / "llmpipe")
DVC = str(Path(sys.executable).parent / "dvc")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 1200) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def served(stack, project: Path, tmp_path_factory):
    """A copy of the session's end-to-end project moved onto the stack: `llmpipe run` there, promoted,
    pushed. Its stages are up to date, so the run executes the package stage (forced) against the
    servers: a new registry version, its artifacts, the pipeline's and the stage's runs, a flow run."""
    root = tmp_path_factory.mktemp("served") / "project"
    shutil.copytree(project, root, symlinks=True)
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"  # one project's files in the shared bucket
    experiment = f"llmpipe-{prefix}"
    env = {**os.environ, **stack.env, "LLMPIPE_WORKERS": "2", "LLMPIPE_EXPERIMENT": experiment}
    env.pop("LLMPIPE_PROJECT", None)
    # The remote's URL is committed (no secret in it); the keys come from the environment.
    _run([DVC, "remote", "add", "-d", "store", f"{stack.env['LLMPIPE_DVC_REMOTE_URL']}/{prefix}"], root, env)
    git_commit_all(root, "the DVC remote")
    ran = _run([LLMPIPE, "run", "--force", "package"], root, env)
    _run([LLMPIPE, "promote"], root, env)
    _run([DVC, "push"], root, env)
    git_commit_all(root, "the run's dvc.lock")
    return root, env, prefix, experiment, ran


def _sql(stack, database: str, query: str) -> list[tuple]:
    import psycopg2

    from llmpipe.ops.services import PG_USER
    from llmpipe.ops.stack import PG_PASSWORD_KEY, server_secrets

    with psycopg2.connect(host="127.0.0.1", port=stack.ports.postgres, user=PG_USER, dbname=database,
                          password=server_secrets(stack.dir)[PG_PASSWORD_KEY]) as conn, conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchall()


def _keys(stack, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"],
                      aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _in_git(root: Path, stage: str) -> set[str]:
    """The stage's metrics and plots: `cache: false` outputs, which git carries rather than DVC."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    return {path for kind in ("metrics", "plots") for entry in spec.get(kind, []) for path in entry}


def test_runs_and_the_registry_land_in_postgresql(served, stack):
    root, _, _, experiment, ran = served
    # package forced; another stage runs too where the copied project left it stale (DVC's call)
    executed = [line.split()[0] for line in ran.splitlines() if line.split()[1:2] == ["ran"]]
    assert "package" in executed and "pretrain" not in executed, ran
    rows = _sql(stack, "mlflow", f"select r.name, r.status from runs r join experiments e using (experiment_id) "
                                 f"where e.name = '{experiment}'")
    assert sorted(rows) == sorted([(stage, "FINISHED") for stage in executed] + [("pipeline", "FINISHED")]), rows
    registered = json.loads((root / "models" / "package" / "registered.json").read_text())
    versions = _sql(stack, "mlflow", f"select version from model_versions where name = '{registered['name']}'")
    assert (registered["version"],) in versions
    aliases = _sql(stack, "mlflow", f"select alias, version from registered_model_aliases "
                                    f"where name = '{registered['name']}'")
    assert ("production", registered["version"]) in aliases
    # the pipeline's flow run is on the Prefect server's database, not on a local SQLite file
    flows = _sql(stack, "prefect", "select f.name, fr.state_type from flow_run fr join flow f on f.id = fr.flow_id")
    assert ("llmpipe", "COMPLETED") in flows


def test_mlflow_artifacts_and_dvc_outputs_land_in_the_object_store(served, stack):
    root, _, prefix, experiment, _ = served
    [(experiment_id, location)] = _sql(stack, "mlflow", f"select experiment_id, artifact_location from experiments "
                                                       f"where name = '{experiment}'")
    artifacts = _keys(stack, "mlflow", f"{experiment_id}/")  # the server's --artifacts-destination
    assert any("/artifacts/" in k and k.endswith("MLmodel") for k in artifacts), artifacts[:20]  # the pyfunc model
    assert any(k.endswith("README.md") for k in artifacts)  # the model card
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    outs = [o for stage, spec in lock.items() for o in spec.get("outs", []) if o["path"] not in _in_git(root, stage)]
    bucket = stack.env["LLMPIPE_DVC_REMOTE_URL"].removeprefix("s3://")
    # DVC 3's layout: <prefix>/files/md5/<first 2 hex>/<the other 30>[.dir]
    stored = {"".join(k.split("/")[-2:]).split(".")[0] for k in _keys(stack, bucket, prefix)}
    missing = [o["path"] for o in outs if o["md5"].split(".")[0] not in stored]
    assert len(outs) >= 15 and not missing, f"outputs not in the DVC remote: {missing}"
    assert location.startswith(("mlflow-artifacts:", "s3://")), location  # not a path on this disk


def test_dvc_pull_into_a_fresh_clone_restores_every_output(served, tmp_path: Path):
    root, env, _, _, _ = served
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    assert not (clone / "models" / "pretrain").exists()
    _run([DVC, "pull"], clone, env)
    assert json.loads(_run([DVC, "status", "--json"], clone, env) or "{}") == {}  # nothing stale, nothing missing
    for rel in ("models/pretrain/final/model.safetensors", "data/tokens/train/meta.json", "models/package/registered.json"):
        assert (clone / rel).read_bytes() == (root / rel).read_bytes(), rel


def test_status_names_the_servers_and_the_production_version(served, stack):
    root, env, _, _, _ = served
    out = _run([LLMPIPE, "status"], root, env)
    servers = status_section(out, "servers")
    assert servers[0].startswith(f"MLflow   {stack.env['MLFLOW_TRACKING_URI']}")
    assert stack.env["PREFECT_API_URL"] in servers[1] and "s3://" in servers[3]
    assert any("llmpipe" in row and "Completed" in row for row in status_section(out, "pipeline runs (Prefect)")), out
    registered = json.loads((root / "models" / "package" / "registered.json").read_text())
    assert status_section(out, "registry") == [f"{registered['name']}: production = version {registered['version']}"]
    assert stack.env["MLFLOW_TRACKING_PASSWORD"] not in out
