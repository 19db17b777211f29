"""llmpipe/env.py is the one list of settings: every LLMPIPE_* name anywhere in the code is on it, the code
reads them only through it, the README shows exactly its table, and bad values name the variable."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from llmpipe import env
from llmpipe.errors import UserError
from tests.helpers import ROOT

NAME = re.compile(r"\bLLMPIPE_[A-Z][A-Z0-9_]*")
SCANNED = ("llmpipe/", "flows/", "scripts/", "tests/", "benchmarks/", "infra/", "dvc.yaml", "pyproject.toml")


def _project_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", *SCANNED], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    return [ROOT / rel for rel in listed if rel and (ROOT / rel).is_file()]


def test_every_llmpipe_variable_in_the_code_is_listed_in_env_py():
    listed = {s.name for s in env.SETTINGS}
    unlisted: dict[str, set[str]] = {}
    for path in _project_files():
        for name in set(NAME.findall(path.read_text(errors="replace"))) - listed:
            unlisted.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert not unlisted, f"add these to llmpipe/env.py (and the README table): {unlisted}"


def test_the_package_reads_settings_only_through_env_py():
    readers = re.compile(r"(environ\.get\(|environ\[|getenv\()\s*[\"']LLMPIPE_")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in _project_files()
                 if path.suffix == ".py" and path.parts[len(ROOT.parts)] in ("llmpipe", "flows")
                 and path != ROOT / "llmpipe" / "env.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if readers.search(line)]
    assert offenders == []


def test_the_readme_settings_table_is_env_py_s():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Settings (environment variables)\n", 1)[1].split("\n## ", 1)[0]
    shown = re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.M)
    assert shown == [s.name for s in env.SETTINGS]
    assert env.markdown_table() in section  # defaults and meanings too, word for word


@pytest.mark.parametrize("value, expected", [(None, os.cpu_count() or 1), ("0", os.cpu_count() or 1), ("3", 3)])
def test_workers_default_to_the_cpu_count(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("LLMPIPE_WORKERS", raising=False)
    else:
        monkeypatch.setenv("LLMPIPE_WORKERS", value)
    assert env.workers() == expected


@pytest.mark.parametrize("value", ["two", "-1", "1.5"])
def test_a_worker_count_that_is_not_one_names_the_variable(value, monkeypatch):
    monkeypatch.setenv("LLMPIPE_WORKERS", value)
    with pytest.raises(UserError, match=f"LLMPIPE_WORKERS={re.escape(value)}: not a number of worker processes"):
        env.workers()


def test_switches_take_on_and_off_and_refuse_anything_else(monkeypatch):
    for value, enabled in [("on", True), ("1", True), ("OFF", False), ("no", False), ("", True)]:
        monkeypatch.setenv("LLMPIPE_TRACKING", value)
        assert env.tracking_enabled() is enabled
    monkeypatch.setenv("LLMPIPE_TRACKING", "sometimes")
    with pytest.raises(UserError, match="LLMPIPE_TRACKING=sometimes: not a switch"):
        env.tracking_enabled()
