"""The ingest stage: read the sources listed in params.yaml into the stage's output, `data/raw`.

Every shard `part-XXXXX.parquet` holds records `{id, source, text, meta}`: `id` is
`content_id(text)`; `source` is the source's `name` in params (the key of per-source accounting here
and in later stages: a bounded set); `meta` says where exactly the document came from: `origin`
(`data/x.jsonl:123`, `data/sources/a.tar.gz:dir/b.txt`, `hf:org/name:train#7`, see readers.py),
`path`, `member`, `line`/`row`, `format`, `encoding`, `decode_replaced` (bytes replaced by U+FFFD),
and the other scalar fields of a JSONL/CSV/Parquet/HF row under `fields`. Rejects go to `quarantine/`.

The sources and the cutting of their work into shard tasks are `llmpipe.data.sources`; this module
reads one shard (`process_task`) and runs the stage: the tasks go to `run_shards`, in parallel and
resumable.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

from pydantic import Field, model_validator

from llmpipe.config import StageConfig
from llmpipe.data.accounting import Counts, RecordShardWriter
from llmpipe.data.readers import (FORMATS, READ_ERRORS, SUFFIXES, ReadOptions, ReadReject, Record, Where, iter_archive,
                                  read_hf, read_stream, reject, replace_undecodable)
from llmpipe.data.report import publish_report
from llmpipe.data.shards import ShardTask, describe_throughput, run_shards, throughput_metrics
from llmpipe.data.sources import DEMO_SOURCE, ArchiveItem, HFItem, Source, plan_tasks, why_unreadable

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

READING = {"decode_errors", "max_doc_chars", "max_line_chars"}  # the settings every shard is read with


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


def _read_item(item, src: Source, opts: ReadOptions, root: Path, counts: Counts) -> Iterator[Record | ReadReject]:
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
        if problem := why_unreadable(root / item.path):
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

def ingest_tasks(cfg: IngestConfig, ctx: StageContext) -> list[ShardTask]:
    """The stage's shard tasks (every source resolved first: a missing path stops it before any work)."""
    return plan_tasks(cfg.sources, ctx.root, ctx.output("raw"), shard_mb=cfg.shard_mb,
                      reading=cfg.model_dump(include=READING), code=ctx.code_fingerprint)


def run(cfg: IngestConfig, ctx: StageContext) -> dict[str, float]:
    out, tasks = ctx.output("raw"), ingest_tasks(cfg, ctx)
    process = functools.partial(process_task, cfg=cfg, root=ctx.root)
    shards = run_shards(tasks, process, out_dir=out, workers=ctx.workers, stage="ingest")
    publish_report(ctx, shards.counts, out, extra=_sources_table(cfg, tasks))
    metrics = {**shards.counts.metrics(), **throughput_metrics(shards)}
    ctx.log.info("ingest: %d of %d records kept; %s", metrics["records_kept"], metrics["records_read"],
                 describe_throughput(metrics))
    return metrics


def _sources_table(cfg: IngestConfig, tasks: list[ShardTask]) -> str:
    rows = [f"| {s.name} | {s.type} | {getattr(s, 'path', None) or s.dataset} | "
            f"{sum(1 for t in tasks if t.inputs[0].source == i)} |" for i, s in enumerate(cfg.sources)]
    return "\n".join(["## Sources", "", "| name | type | from | shards |", "|---|---|---|---:|", *rows])
