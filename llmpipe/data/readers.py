"""Readers for the ingest stage: one small generator per format, each yielding `Record`s or `ReadReject`s.

A reader gets an open binary stream (a local file, a gzip stream or an archive member), so the same
code reads a file on disk and a member of a tar or zip. Nothing a reader meets in the data stops it:
- bytes that are not UTF-8 are decoded with `surrogateescape`, so each bad byte is known exactly;
  `_document` then replaces them with U+FFFD (counted in meta `decode_replaced`) or quarantines the
  document (`decode_error`), per the `decode_errors` policy; the reader goes on with the next line.
- sizes are bounded while reading: a document is read in chunks and a line with `readline(limit)`,
  so a 50 GB line costs `4 * max_line_chars` bytes of memory before it is rejected as `too_long`.
- empty and binary files, malformed JSON/CSV lines and records without the text field become rejects
  with a reason, a detail and their position (line or row), never exceptions.

Every record's `source` is the name of its source in params (what per-source accounting counts by,
in this stage and the later ones), and `meta["origin"]` says where exactly it came from: `<path>` for a
whole-file document, `<path>:<line>` for JSONL/CSV (1-based line), `<path>#<row>` for Parquet and HF
rows (0-based); an archive member is `<archive path>:<member>` in place of `<path>`, a HF dataset
`hf:<dataset>[/<config>]:<split>`. Paths are relative to the project root.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import itertools
import json
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from llmpipe.data.accounting import QUARANTINE_TEXT_LIMIT, Record, content_id

FORMATS = ("txt", "md", "html", "jsonl", "csv", "parquet")
# File name suffix -> format; a further `.gz` suffix means gzip-compressed (not for parquet).
SUFFIXES = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html",
            ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}

SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB means binary (git's rule)
CHUNK_BYTES = 1 << 20
FIELD_CHARS = 1024  # other fields of a row longer than this are not copied into meta
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    delimiter: str = ","
    decode_errors: str = "replace"  # or "quarantine"
    max_doc_chars: int = 10_000_000
    max_line_chars: int = 20_000_000


@dataclass
class ReadReject:
    """A document (or a file, a line, a row) that reading turned into a quarantine row, not a record.
    Not a clean step's verdict (`llmpipe.data.steps.Reject`, a reason for a record that was read)."""

    record: Record  # what is known of the rejected document (maybe no text), for the quarantine row
    reason: str
    detail: str = ""
    length: int = 0  # its length in characters, where known (for the length histogram)


@dataclass(frozen=True)
class Where:
    """What a reader stamps on its records: `source`, the source's name in params (the key of per-source
    accounting in every data stage), and the start of meta, whose `origin` each reader completes."""

    source: str
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)

    def with_meta(self, **extra: Any) -> Where:
        return Where(self.source, self.origin, {**self.meta, **extra})


def _record(where: Where, text: str, suffix: str, meta: dict[str, Any], rid: str | None = None) -> Record:
    return Record(rid or content_id(text), where.source, text, {**meta, "origin": where.origin + suffix})


def detect_format(name: str) -> tuple[str | None, bool]:
    """('jsonl', True) for 'x.jsonl.gz'; (None, ...) when the suffix is not one we read."""
    lower = name.lower()
    gz = lower.endswith(".gz")
    if gz:
        lower = lower[:-3]
    dot = lower.rfind(".")
    fmt = SUFFIXES.get(lower[dot:]) if dot >= 0 else None
    return (None if fmt == "parquet" and gz else fmt), gz


# -- building records and rejects ------------------------------------------------------------------

def replace_undecodable(text: str) -> str:
    """Bytes that were not UTF-8 (surrogates after surrogateescape) -> U+FFFD, so the text can be stored."""
    return text if text.isascii() else _UNDECODABLE.sub("\ufffd", text)


def reject(where: Where, reason: str, detail: str, text: str = "", length: int = 0, suffix: str = "",
           **pos: Any) -> ReadReject:
    text, detail = replace_undecodable(text[:QUARANTINE_TEXT_LIMIT]), replace_undecodable(detail)
    # A file-level reject has no text: its origin identifies it instead.
    rid = content_id(text) if text else content_id(where.origin + suffix)
    return ReadReject(_record(where, text, suffix, {**where.meta, **pos}, rid), reason, detail, length)


def _document(where: Where, text: str, opts: ReadOptions, suffix: str = "", empty_reason: str = "empty_text",
              fields: dict[str, Any] | None = None, **pos: Any) -> Record | ReadReject:
    """The last step of every reader: decode policy, emptiness and size checks, then a Record."""
    bad = 0
    if not text.isascii():
        text, bad = _UNDECODABLE.subn("\ufffd", text)
    meta = {**where.meta, **pos}
    if fields:
        meta["fields"] = fields
    if bad:
        meta["decode_replaced"] = bad
    if bad and opts.decode_errors == "quarantine":
        return ReadReject(_record(where, text[:QUARANTINE_TEXT_LIMIT], suffix, meta),
                      "decode_error", f"{bad} bytes are not valid UTF-8", len(text))
    if not text.strip():
        return reject(where, empty_reason, "no text" if not text else "only whitespace", text, len(text), suffix,
                      **pos)
    if len(text) > opts.max_doc_chars:
        return reject(where, "too_long", f"{len(text):,} characters > max_doc_chars {opts.max_doc_chars:,}",
                      text, len(text), suffix, **pos)
    return _record(where, text, suffix, meta)


def _scalars(row: dict[str, Any], skip: str) -> dict[str, Any]:
    """The other short scalar fields of a row (url, license, ...), kept in meta['fields'] for provenance;
    long strings (a raw HTML copy, say) would only double the storage."""
    return {k: replace_undecodable(v) if isinstance(v, str) else v for k, v in row.items()
            if k != skip and isinstance(v, (str, int, float, bool)) and replace_undecodable(k) == k
            and not (isinstance(v, str) and len(v) > FIELD_CHARS)}


def _text_of(obj: dict[str, Any], where: Where, opts: ReadOptions, suffix: str, **pos: Any) -> Record | ReadReject:
    """A row (JSON object, CSV row, Parquet/HF example) -> its document, or why it has none.

    A row without the field is `missing_text_field` (a wrong `text_field` setting shows up here);
    a field that is there but null is `empty_text`, like "" (a Parquet null, `{"text": null}`)."""
    if opts.text_field not in obj:
        present = [k for k, v in obj.items() if v is not None]
        shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
        return reject(where, "missing_text_field", f"no '{opts.text_field}' field; fields: {shown or '(none)'}",
                      suffix=suffix, **pos)
    value = obj[opts.text_field]
    if value is None:
        return reject(where, "empty_text", f"'{opts.text_field}' is null", suffix=suffix, **pos)
    if not isinstance(value, str):
        return reject(where, "bad_text_field", f"'{opts.text_field}' is {type(value).__name__}, not a string",
                      suffix=suffix, **pos)
    return _document(where, value, opts, suffix, fields=_scalars(obj, opts.text_field), **pos)


# -- whole-file documents: txt, md, html ------------------------------------------------------------

def read_document(fh: IO[bytes], where: Where, opts: ReadOptions) -> Iterator[Record | ReadReject]:
    """The whole stream is one document (HTML stays raw: the clean stage extracts its text)."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    parts: list[str] = []
    n_chars = 0
    while chunk := fh.read(CHUNK_BYTES):
        part = decoder.decode(chunk)
        parts.append(part)
        n_chars += len(part)
        if n_chars > opts.max_doc_chars:  # stop reading: the head is all the quarantine keeps
            head = "".join(parts)[:QUARANTINE_TEXT_LIMIT]
            yield reject(where, "too_long", f"more than max_doc_chars {opts.max_doc_chars:,} characters",
                         head, n_chars)
            return
    text = "".join(parts) + decoder.decode(b"", final=True)
    encoding = "utf-8"
    if text.startswith("\ufeff"):
        text, encoding = text[1:], "utf-8-sig"
    yield _document(where.with_meta(encoding=encoding), text, opts, empty_reason="empty_file")


# -- line-based formats: jsonl, csv -----------------------------------------------------------------

def _bounded_lines(fh: IO[bytes], max_chars: int, max_bytes: int | None = None) -> Iterator[tuple[str | None, bytes]]:
    """Yield (decoded line, raw head) per physical line; (None, head) for a line over `max_chars`.

    A character is at most 4 UTF-8 bytes, so a read of 4 * (max_chars + 1) bytes without a newline
    holds more than max_chars characters: the rest of that line is skipped, never held in memory.
    `max_bytes` ends the read at the first line starting at or after that many bytes (a byte range).
    """
    limit = 4 * (max_chars + 1)
    consumed = 0
    while max_bytes is None or consumed < max_bytes:
        raw = fh.readline(limit)
        if not raw:
            return
        consumed += len(raw)
        if len(raw) == limit and not raw.endswith(b"\n"):
            while (rest := fh.readline(CHUNK_BYTES)) and not rest.endswith(b"\n"):
                consumed += len(rest)
            consumed += len(rest)
            yield None, raw[:4096]
            continue
        line = raw.decode("utf-8", "surrogateescape")
        yield (None if len(line) > max_chars else line), raw[:4096]


def _too_long_line(where: Where, head: bytes, line_no: int, opts: ReadOptions) -> ReadReject:
    return reject(where, "too_long", f"line {line_no} is longer than max_line_chars {opts.max_line_chars:,}",
                  head.decode("utf-8", "replace"), opts.max_line_chars + 1, f":{line_no}", line=line_no)


def read_jsonl(fh: IO[bytes], where: Where, opts: ReadOptions, first_line: int = 1,
               max_bytes: int | None = None) -> Iterator[Record | ReadReject]:
    """One JSON object per line, text in `opts.text_field`; blank lines are not records."""
    for line_no, (line, head) in enumerate(_bounded_lines(fh, opts.max_line_chars, max_bytes), first_line):
        if line is None:
            yield _too_long_line(where, head, line_no, opts)
            continue
        if line_no == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        suffix = f":{line_no}"
        clean, n_bad = (line, 0) if line.isascii() else _UNDECODABLE.subn("\ufffd", line)
        if n_bad and opts.decode_errors == "quarantine":
            yield reject(where, "decode_error", f"line {line_no}: {n_bad} bytes are not valid UTF-8", clean,
                         len(clean), suffix, line=line_no, decode_replaced=n_bad)
            continue
        try:
            obj = json.loads(line)  # surrogates survive into the strings, so _document counts them
        except json.JSONDecodeError as exc:
            yield reject(where, "malformed_json", f"line {line_no}: {exc.msg} at column {exc.colno}", clean,
                         len(clean), suffix, line=line_no)
            continue
        if not isinstance(obj, dict):
            yield reject(where, "malformed_json", f"line {line_no}: expected a JSON object, got "
                         f"{type(obj).__name__}", clean, len(clean), suffix, line=line_no)
            continue
        yield _text_of(obj, where, opts, suffix, line=line_no)


def read_csv(fh: IO[bytes], where: Where, opts: ReadOptions, delimiter: str | None = None) -> Iterator[Record | ReadReject]:
    """A CSV with a header row; the document is the column named `opts.text_field`."""
    # The csv module caps a field at 128 KiB by default; our own cap is max_doc_chars (process-wide setting).
    csv.field_size_limit(max(opts.max_doc_chars, opts.max_line_chars) + 1)
    too_long: list[tuple[int, bytes]] = []

    def lines() -> Iterator[str]:
        for n, (line, head) in enumerate(_bounded_lines(fh, opts.max_line_chars), 1):
            if line is None:
                too_long.append((n, head))
                yield "\n"  # an empty row keeps the reader's line numbers in step
            else:
                yield line

    reader = csv.reader(lines(), delimiter=delimiter or opts.delimiter)
    header: list[str] | None = None
    last_line = 0
    while True:
        try:
            row = next(reader, None)
        except csv.Error as exc:
            reason = "too_long" if "field larger than field limit" in str(exc) else "malformed_csv"
            start, last_line = last_line + 1, reader.line_num
            yield reject(where, reason, f"line {start}: {exc}", suffix=f":{start}", line=start)
            continue
        while too_long:
            n, head = too_long.pop(0)
            yield _too_long_line(where, head, n, opts)
        if row is None:
            return
        start, last_line = last_line + 1, reader.line_num
        if not row:
            continue
        if header is None:
            header = [replace_undecodable(name).removeprefix("\ufeff") for name in row]
            continue
        yield _text_of(dict(zip(header, row)), where, opts, f":{start}", line=start)


# -- Parquet ------------------------------------------------------------------------------------------

def read_parquet(fh: Any, where: Where, opts: ReadOptions,
                 row_groups: Iterable[int] | None = None) -> Iterator[Record | ReadReject]:
    """Rows of a Parquet file (path or seekable stream), optionally only some row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fh)
    groups = list(range(pf.num_row_groups) if row_groups is None else row_groups)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(groups[0])) if groups else 0
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups):
        columns = {}
        for name, column in zip(batch.schema.names, batch.columns):
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                # Via bytes, so a value that is not UTF-8 is handled like everywhere else, not raised.
                column = column.cast(pa.large_binary())
                columns[name] = [None if v is None else v.decode("utf-8", "surrogateescape")
                                 for v in column.to_pylist()]
            elif name == opts.text_field or pa.types.is_primitive(column.type):
                columns[name] = column.to_pylist()
        for i in range(batch.num_rows):
            yield _text_of({k: v[i] for k, v in columns.items()}, where, opts, f"#{row}", row=row)
            row += 1


# -- dispatch -------------------------------------------------------------------------------------------

READ_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile, ValueError, UnicodeError)


def read_stream(fh: IO[bytes], fmt: str, where: Where, opts: ReadOptions, *, gz: bool = False,
                first_line: int = 1, max_bytes: int | None = None, row_groups: Iterable[int] | None = None,
                whole_file: bool = True) -> Iterator[Record | ReadReject]:
    """Read one file or member (or a byte range / row groups of one) in format `fmt`.

    Whole files that are empty or binary become one reject; an error mid-file (truncated gzip,
    corrupt Parquet) becomes a `read_error` reject after the records read before it.
    """
    where = where.with_meta(format=fmt)
    try:
        if gz:
            fh = gzip.GzipFile(fileobj=fh, mode="rb")
        head = fh.peek(SNIFF_BYTES)[:SNIFF_BYTES] if whole_file else b"x"
        if not head:
            yield reject(where, "empty_file", "0 bytes")
            return
        if fmt == "parquet":
            readers = read_parquet(fh, where, opts, row_groups)
        else:
            if b"\0" in head:
                yield reject(where, "binary_file", "NUL bytes in the first 8 KiB (binary, or UTF-16/32 text: "
                             "convert it to UTF-8)")
                return
            if fmt == "jsonl":
                readers = read_jsonl(fh, where, opts, first_line, max_bytes)
            elif fmt == "csv":
                tsv = where.origin.lower().endswith((".tsv", ".tsv.gz"))
                readers = read_csv(fh, where, opts, "\t" if tsv else None)
            else:
                readers = read_document(fh, where, opts)
        n = 0
        for item in readers:
            n += 1
            yield item
        if n == 0 and whole_file:
            yield reject(where, "empty_file", "no records")
    except READ_ERRORS as exc:
        yield reject(where, "read_error", f"{type(exc).__name__}: {exc}")


def iter_archive(path: str, members: list[str]) -> Iterator[tuple[str, IO[bytes] | None]]:
    """(name, stream) for each wanted member of a tar or zip archive, in archive order; (name, None)
    for a wanted member that is not there. Tar archives are read front to back, once."""
    wanted = set(members)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for name in members:
                if name in names:
                    with zf.open(name) as fh:
                        yield name, fh
                else:
                    yield name, None
        return
    found = set()
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                found.add(member.name)
                with tar.extractfile(member) as fh:
                    yield member.name, fh
                if len(found) == len(wanted):
                    break
    for name in members:
        if name not in found:
            yield name, None


def list_archive(path: str) -> list[tuple[str, int]]:
    """(member name, size in bytes) of the regular files of a tar or zip archive, in archive order."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return [(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir()]
    with tarfile.open(path, "r:*") as tar:
        return [(m.name, m.size) for m in tar if m.isfile()]


# -- Hugging Face datasets --------------------------------------------------------------------------

def read_hf(dataset: str, config: str | None, split: str, limit: int, where: Where, opts: ReadOptions, *,
            data_files: list[str] | None = None, revision: str | None = None) -> Iterator[Record | ReadReject]:
    """The first `limit` examples of a dataset, streamed: a hub name ("HuggingFaceFW/fineweb-edu"), or a
    packaged builder ("json", "parquet", "csv", "text") with local `data_files` (same code path)."""
    import datasets

    kwargs: dict[str, Any] = {"data_files": data_files} if data_files else {}
    if revision:
        kwargs["revision"] = revision
    stream = datasets.load_dataset(dataset, config, split=split, streaming=True, **kwargs)
    try:
        for row, example in enumerate(itertools.islice(stream, limit)):
            yield _text_of(example, where, opts, f"#{row}", row=row)
    except Exception as exc:  # the builder failed on a local file: bad input, accounted for like any other
        if not data_files:
            raise  # a hub stream broke (network?): fail the shard, so a rerun (or a retry) reads it again
        yield reject(where, "read_error", f"{type(exc).__name__}: {exc}")
