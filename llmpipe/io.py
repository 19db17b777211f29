"""Project paths, atomic writes, Parquet shards, completion markers and hashing.

The rule every stage follows: nothing partial ever sits at a final path. Files and directories are
written under a temp name in the same directory and renamed into place; a shard counts as done only
when its marker exists, so a rerun after a crash skips finished shards and redoes the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmpipe import env
from llmpipe.errors import UserError

PROJECT_ENV = env.PROJECT.name


def project_root(start: Path | None = None) -> Path:
    """The directory holding dvc.yaml: $LLMPIPE_PROJECT, else the first parent of `start` (cwd) with one."""
    root = env.project_dir()
    if root is not None:
        if not (root / "dvc.yaml").exists():
            raise UserError(f"${PROJECT_ENV}={root} has no dvc.yaml; point it at an llmpipe project")
        return root
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists():
            return candidate
    raise UserError(f"no dvc.yaml in {here} or any parent: run llmpipe inside a project (or set ${PROJECT_ENV})")


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temp path next to `final`; on success it replaces `final` in one rename, on error it is removed.

    Works for a file or a directory (the caller creates whichever it needs at the temp path).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = _temp_sibling(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(path: Path | str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def clean_stale_temps(directory: Path) -> int:
    """Remove `.tmp-*` leftovers of a killed run; returns how many were removed."""
    if not directory.exists():
        return 0
    removed = 0
    for leftover in directory.glob(".tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def remove_temp_leftovers(*finals: Path) -> None:
    """Remove the temp siblings that `atomic_path` left for `finals` in a run killed mid-write (SIGKILL
    leaves no chance to clean up). Unlike clean_stale_temps, only these outputs' own: their parent
    (models/, data/) is shared with other stages' outputs."""
    for final in map(Path, finals):
        for leftover in final.parent.glob(f".tmp-{final.name}-*"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


# -- completion markers ---------------------------------------------------------------------------

def marker_path(output: Path) -> Path:
    return output.with_name(output.name + ".done.json")


def mark_done(output: Path, info: dict[str, Any]) -> None:
    """Record that `output` (file or directory) is complete, with whatever the stage needs to resume."""
    write_json_atomic(marker_path(output), info)


def done_info(output: Path) -> dict[str, Any] | None:
    """The marker's content if `output` is complete, else None."""
    marker = marker_path(output)
    if not marker.exists() or not output.exists():
        return None
    return read_json(marker)


# -- Parquet --------------------------------------------------------------------------------------

def write_parquet_atomic(path: Path | str, table: Any) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def iter_parquet_batches(path: Path | str, batch_size: int = 1024, columns: list[str] | None = None) -> Iterator[Any]:
    """Stream a Parquet file in record batches: memory bounded by the batch, not the file."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)


# -- hashing --------------------------------------------------------------------------------------

def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(data: Any) -> str:
    """A short, stable hash of JSON-able data (key order does not matter): what resume markers and
    params hashes compare."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def hash_tree(path: Path | str) -> str:
    """sha256 over the relative names and contents of every file below `path` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()
