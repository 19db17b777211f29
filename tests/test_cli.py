"""The `llmpipe` command as a user meets it: help texts and clear errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmpipe.cli import main
from tests.helpers import ROOT, status_section
from tests.test_tracking import hold_run, kill_9


def test_help_lists_every_command():
    out = CliRunner().invoke(main, ["--help"]).output
    for command in ("run", "stage", "status", "fetch-demo", "plan"):
        assert command in out


def test_stage_help_explains_each_stage():
    out = CliRunner().invoke(main, ["stage", "--help"]).output
    for name in ("ingest", "clean", "dedup", "tokenizer", "pretrain"):
        assert name in out


def test_stage_with_bad_params_names_file_and_key(tmp_path: Path, monkeypatch):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text("dedup:\n  num_perm: 100\n  bnads: 10\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    result = CliRunner().invoke(main, ["stage", "dedup"])
    assert result.exit_code != 0
    assert "params.yaml" in result.output and "dedup.bnads" in result.output and "bands" in result.output


def test_commands_outside_a_project_say_so(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["stage", "ingest"])
    assert result.exit_code != 0 and "no dvc.yaml" in result.output


def test_missing_source_fails_before_any_work(tmp_path: Path, monkeypatch):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    result = CliRunner().invoke(main, ["stage", "ingest"])
    assert result.exit_code != 0
    assert "ingest.sources[0].path" in result.output and "not found" in result.output
    assert not (tmp_path / "data" / "raw").exists()


def test_run_without_sources_says_how_to_get_them(tmp_path: Path, monkeypatch):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data" / "sources").mkdir(parents=True)
    # a source the user tracks with `dvc add` and did not pull into this clone
    (tmp_path / "data" / "sources" / "notes.txt.dvc").write_text(
        "outs:\n- md5: 3cc70be7fd85b4e1521f52782ddd4fdf\n  size: 5\n  hash: md5\n  path: notes.txt\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    monkeypatch.setenv("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")  # fails before Prefect is needed
    result = CliRunner().invoke(main, ["run", "--until", "ingest"])
    assert result.exit_code != 0
    assert "source data missing" in result.output and "notes.txt" in result.output and "dvc pull" in result.output


# -- one way to fail --------------------------------------------------------------------------------

LLMPIPE = str(Path(sys.executable).parent / "llmpipe")


def _project(root: Path) -> Path:
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    return root


# One user error per command: (arguments, environment, in a project?, what the message must name).
USER_ERRORS = {
    "run": (["run"], {}, False, "no dvc.yaml in"),
    "run --until": (["run", "--until", "clean", "--force", "pretrain"], {}, True, "--force pretrain: not among"),
    "stage": (["stage", "ingest"], {}, False, "no dvc.yaml in"),
    "stage (setting)": (["stage", "ingest"], {"LLMPIPE_WORKERS": "two"}, True, "LLMPIPE_WORKERS=two"),
    "status": (["status"], {}, False, "no dvc.yaml in"),
    "fetch-demo": (["fetch-demo"], {}, False, "no dvc.yaml in"),
    "plan": (["plan", "--gpu", "TPU"], {}, False, "unknown GPU 'TPU'"),
    "plan --tokens": (["plan", "--tokens", "lots"], {}, False, "cannot read token count 'lots'"),
    "env": (["env"], {"LLMPIPE_TRACKING": "maybe"}, False, "LLMPIPE_TRACKING=maybe: not a switch"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_every_command_reports_a_user_error_as_one_error_line_and_exit_1(case: str, tmp_path: Path, monkeypatch):
    args, environ, in_project, expected = USER_ERRORS[case]
    if in_project:
        _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # handled, not escaped as an exception
    assert result.output.startswith("Error: ") and expected in result.output, result.output


def _cli(args: list[str], cwd: Path, **environ: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLMPIPE_DEBUG"}
    return subprocess.run([LLMPIPE, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**env, "LLMPIPE_TRACKING": "off", **environ})


def test_a_user_error_prints_no_traceback_and_debug_shows_it(tmp_path: Path):
    plain = _cli(["stage", "ingest"], tmp_path)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("Error: no dvc.yaml in"), plain.stderr
    for debug in (_cli(["--debug", "stage", "ingest"], tmp_path), _cli(["stage", "ingest"], tmp_path, LLMPIPE_DEBUG="on")):
        assert debug.returncode == 1
        assert "Traceback (most recent call last)" in debug.stderr and "UserError: no dvc.yaml in" in debug.stderr


BROKEN_STAGE = '''
from llmpipe.config import StageConfig

class BrokenConfig(StageConfig):
    pass

def run(cfg, ctx):
    return {"ratio": 1 / 0}  # a bug, not something the user can fix
'''

REGISTER_AND_RUN = '''
import sys
sys.path.insert(0, sys.argv[1])
from llmpipe.stages import STAGES, StageSpec
STAGES["broken"] = StageSpec("broken", "broken_stage:BrokenConfig", "broken_stage:run", "a stage with a bug")
from llmpipe.cli import main
main(sys.argv[2:])
'''


def test_a_bug_keeps_its_traceback(tmp_path: Path):
    (tmp_path / "broken_stage.py").write_text(BROKEN_STAGE)
    (tmp_path / "dvc.yaml").write_text("stages:\n  broken:\n    cmd: llmpipe stage broken\n")
    (tmp_path / "params.yaml").write_text("broken: {}\n")
    proc = subprocess.run([sys.executable, "-c", REGISTER_AND_RUN, str(tmp_path), "stage", "broken"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "LLMPIPE_TRACKING": "off"})
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "ZeroDivisionError" in proc.stderr
    assert "Error: " not in proc.stderr.splitlines()[0]


def test_help_names_the_settings_and_env_shows_their_values(monkeypatch):
    out = CliRunner().invoke(main, ["--help"]).output
    assert "LLMPIPE_WORKERS" in out and "llmpipe env" in out
    monkeypatch.setenv("LLMPIPE_WORKERS", "3")
    out = CliRunner().invoke(main, ["env"]).output
    assert "LLMPIPE_WORKERS=3\n" in out and "LLMPIPE_EXPERIMENT=(default)\n" in out


def test_status_ends_the_run_of_a_killed_process_as_killed(tmp_path: Path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages:\n  clean:\n    cmd: 'true'\n")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMPIPE_TRACKING", "on")
    holder, run_id = hold_run(tmp_path, "clean")
    kill_9(holder)
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 0, result.output
    assert f"ended as KILLED: clean ({run_id[:8]}): process {holder.pid} on " in result.output
    [row] = status_section(result.output, "stages")[1:]
    assert "clean" in row and "KILLED" in row
    from llmpipe.tracking import configure_mlflow

    assert configure_mlflow(tmp_path).MlflowClient().get_run(run_id).info.status == "KILLED"
