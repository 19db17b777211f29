"""The registry on the embedded SQLite store of a throwaway project: registration, the gate, aliases,
rollback, and a promotion killed between its two alias writes. The registered models are trivial pyfuncs
that answer a fixed text, so which version an alias loads is visible in what it says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from llmpipe.cli import main
from llmpipe.errors import UserError
from llmpipe.package.gate import GateSettings, Minimums
from llmpipe.package.registry import (CONTENT_TAG, PROMOTION_TAG, ROLLBACK_TAG, alias_version, promote, register,
                                      retry_locked, rollback, versions_table)
from llmpipe.tracking import configure_mlflow
from tests.helpers import ROOT

NAME = "llmpipe-chat"
BPB = "eval/dpo/llmpipe_bpb/bits_per_byte"
ACC = "eval/dpo/llmpipe_chat_reply/acc"
CONTAM = "decontamination/llmpipe_bpb/fraction"
GATE = GateSettings(max_bpb_regression=0.01, max_accuracy_drop=0.02, max_contamination=0.5,
                    minimums=Minimums(bpb_max=3.0, acc_min={"llmpipe_chat_reply": 0.3}))
PARAMS = {"package": {"registered_model": NAME}, "promote": GATE.model_dump()}


class Reply(mlflow.pyfunc.PythonModel):
    """Answers every row with the same text: enough to tell versions apart after a load."""

    def __init__(self, text: str):
        self.text = text

    def predict(self, context, model_input, params=None):
        return [self.text] * len(model_input)


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(json.dumps(PARAMS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def client(project: Path):
    return configure_mlflow(project).MlflowClient()


def log_reply(text: str) -> str:
    with mlflow.start_run():
        return mlflow.pyfunc.log_model(name="model", python_model=Reply(text), pip_requirements=[]).model_uri


def add_version(client, text: str, bpb: float, acc: float, contam: float = 0.0) -> int:
    version, created = register(client, log_reply(text), NAME, f"sha-{text}", {BPB: bpb, ACC: acc, CONTAM: contam},
                                {"llmpipe.git_commit": "abc123"})
    assert created
    return version


def answer(uri: str) -> str:
    return mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": ["hi"]}))[0]


def test_register_tags_the_version_and_is_idempotent(client):
    uri = log_reply("v1")
    metrics = {BPB: 2.5, ACC: 0.4}
    assert register(client, uri, NAME, "sha-a", metrics, {"llmpipe.git_commit": "abc123"}) == (1, True)
    assert register(client, log_reply("v1 again"), NAME, "sha-a", metrics, {}) == (1, False)
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1
    tags = client.get_model_version(NAME, "1").tags
    assert tags[CONTENT_TAG] == "sha-a" and tags["llmpipe.git_commit"] == "abc123"
    assert float(tags[f"metric.{BPB}"]) == 2.5
    assert answer(f"models:/{NAME}/1") == "v1"
    assert register(client, log_reply("v2"), NAME, "sha-b", metrics, {}) == (2, True)


def test_first_version_is_promoted_only_above_the_minimums(client):
    low = add_version(client, "low", bpb=3.5, acc=0.5)
    refused = promote(client, NAME, low, GATE)
    assert refused.outcome == "refused" and alias_version(client, NAME, "production") is None
    good = add_version(client, "good", bpb=2.5, acc=0.5)
    assert promote(client, NAME, None, GATE).outcome == "promoted"
    assert alias_version(client, NAME, "production") == good
    assert alias_version(client, NAME, "previous") is None
    assert answer(f"models:/{NAME}@production") == "good"


def test_pass_moves_production_and_previous_and_records_the_decision(client):
    v1 = add_version(client, "v1", bpb=2.0, acc=0.5)
    promote(client, NAME, v1, GATE)
    v2 = add_version(client, "v2", bpb=2.01, acc=0.49)
    decision = promote(client, NAME, v2, GATE)
    assert (decision.outcome, decision.production_before, decision.production_after) == ("promoted", v1, v2)
    assert (alias_version(client, NAME, "production"), alias_version(client, NAME, "previous")) == (v2, v1)
    record = json.loads(client.get_model_version(NAME, str(v2)).tags[PROMOTION_TAG])
    assert record["outcome"] == "promoted" and record["production_before"] == v1
    bpb_rule = next(r for r in record["rules"] if r["name"].startswith(BPB))
    assert (bpb_rule["candidate"], bpb_rule["reference"]) == (2.01, 2.0)


def test_cli_refuses_a_regression_prints_both_values_and_leaves_aliases(client):
    v1 = add_version(client, "v1", bpb=2.0, acc=0.5)
    assert CliRunner().invoke(main, ["promote"]).exit_code == 0
    v2 = add_version(client, "v2", bpb=2.5, acc=0.5)
    result = CliRunner().invoke(main, ["promote", "--version", str(v2)])
    assert result.exit_code == 1
    assert "refused" in result.output and f"FAIL {BPB}" in result.output
    assert "candidate 2.5" in result.output and "production 2" in result.output
    assert ACC not in result.output  # only the failing rules are printed
    assert alias_version(client, NAME, "production") == v1 and alias_version(client, NAME, "previous") is None
    record = json.loads(client.get_model_version(NAME, str(v2)).tags[PROMOTION_TAG])
    assert record["outcome"] == "refused"
    assert answer(f"models:/{NAME}@production") == "v1"


def test_rollback_swaps_production_and_previous(client):
    v1 = add_version(client, "v1", bpb=2.0, acc=0.5)
    promote(client, NAME, v1, GATE)
    v2 = add_version(client, "v2", bpb=1.9, acc=0.6)
    promote(client, NAME, v2, GATE)
    result = CliRunner().invoke(main, ["rollback"])
    assert result.exit_code == 0, result.output
    assert (alias_version(client, NAME, "production"), alias_version(client, NAME, "previous")) == (v1, v2)
    assert answer(f"models:/{NAME}@production") == "v1"
    record = json.loads(client.get_model_version(NAME, str(v2)).tags[ROLLBACK_TAG])
    assert (record["outcome"], record["production_before"], record["production_after"]) == ("rolled back", v2, v1)


def test_rollback_without_previous_is_a_user_error(client):
    promote(client, NAME, add_version(client, "v1", bpb=2.0, acc=0.5), GATE)
    with pytest.raises(UserError, match="no version to roll back to"):
        rollback(client, NAME)
    with pytest.raises(UserError, match="has no version 7"):
        promote(client, NAME, 7, GATE)


def test_models_lists_versions_with_aliases_metrics_and_lineage(client):
    v1 = add_version(client, "v1", bpb=2.0, acc=0.5)
    promote(client, NAME, v1, GATE)
    add_version(client, "v2", bpb=1.9, acc=0.6)
    rows = versions_table(client, NAME)
    assert [r["version"] for r in rows] == [2, 1] and rows[1]["aliases"] == "production"
    assert rows[0]["metrics"][BPB] == "1.9" and rows[0]["lineage"]["llmpipe.git_commit"] == "abc123"
    out = CliRunner().invoke(main, ["models"]).output
    assert "production" in out and f"{BPB} = 1.9" in out and "abc123" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out


def test_registry_writes_wait_out_a_locked_database_but_not_other_errors():
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "written"

    assert retry_locked(locked_twice, wait_s=0) == "written" and len(calls) == 3
    with pytest.raises(RuntimeError, match="no such table"):
        retry_locked(lambda: (_ for _ in ()).throw(RuntimeError("no such table")), wait_s=0)


KILL_AFTER_FIRST_ALIAS = textwrap.dedent("""
    import os, signal
    from mlflow.tracking.client import MlflowClient

    _set = MlflowClient.set_registered_model_alias

    def _set_then_die(self, *args, **kwargs):
        _set(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies between the two alias writes

    MlflowClient.set_registered_model_alias = _set_then_die
""")


@pytest.mark.slow
def test_promotion_killed_between_alias_moves_leaves_production_on_the_old_version(client, project, tmp_path_factory):
    v1 = add_version(client, "v1", bpb=2.0, acc=0.5)
    promote(client, NAME, v1, GATE)
    v2 = add_version(client, "v2", bpb=1.9, acc=0.6)
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(KILL_AFTER_FIRST_ALIAS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), "LLMPIPE_PROJECT": str(project)}
    proc = subprocess.run([sys.executable, "-m", "llmpipe.cli", "promote", "--version", str(v2)], env=env,
                          cwd=project, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert alias_version(client, NAME, "previous") == v1  # the first write happened
    assert alias_version(client, NAME, "production") == v1
    assert answer(f"models:/{NAME}@production") == "v1"
    assert PROMOTION_TAG not in client.get_model_version(NAME, str(v2)).tags
