"""Each ingest reader on tiny inputs, and each kind of bad input: nothing crashes, nothing good is lost."""

from __future__ import annotations

import gzip
import io
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpipe.data.accounting import content_id
from llmpipe.data.readers import ReadOptions, ReadReject, Where, detect_format, read_stream


def read(data: bytes, fmt: str, origin: str = "in/x", gz: bool = False, **options):
    fh = io.BufferedReader(io.BytesIO(data))
    return list(read_stream(fh, fmt, Where("src", origin, {"path": origin}), ReadOptions(**options), gz=gz))


def kept(items):
    return [i for i in items if not isinstance(i, ReadReject)]


def rejected(items):
    return [i for i in items if isinstance(i, ReadReject)]


def test_detect_format():
    assert detect_format("a/b.jsonl.gz") == ("jsonl", True)
    assert detect_format("Notes.MD") == ("md", False)
    assert detect_format("page.htm") == ("html", False)
    assert detect_format("t.tsv") == ("csv", False)
    assert detect_format("x.parquet.gz") == (None, True)  # Parquet compresses itself
    assert detect_format("README") == (None, False)


@pytest.mark.parametrize("fmt", ["txt", "md"])
def test_text_file_is_one_document(fmt):
    text = "# Title\n\nSome words.\r\nMore words.\n"
    (rec,) = read(text.encode(), fmt, "notes/a." + fmt)
    assert rec.text == text  # raw: normalization is the clean stage's job
    assert rec.id == content_id(text) and rec.source == "src"
    assert rec.meta == {"path": "notes/a." + fmt, "origin": "notes/a." + fmt, "format": fmt, "encoding": "utf-8"}


def test_html_is_kept_raw():
    page = "<html><body><p>Hello &amp; welcome</p></body></html>"
    (rec,) = read(page.encode(), "html")
    assert rec.text == page and rec.meta["format"] == "html"


def test_bom_is_stripped_and_noted():
    (rec,) = read("\ufeffHello".encode(), "txt")
    assert rec.text == "Hello" and rec.meta["encoding"] == "utf-8-sig"


def test_invalid_byte_in_text_is_replaced_and_counted():
    (rec,) = read(b"good start\n\xff\nline after the bad byte\n", "txt")
    assert rec.text == "good start\n\ufffd\nline after the bad byte\n"
    assert rec.meta["decode_replaced"] == 1


def test_invalid_byte_in_text_can_quarantine_the_document():
    (rej,) = read(b"good start\n\xff\nline after\n", "txt", decode_errors="quarantine")
    assert rej.reason == "decode_error" and "1 bytes" in rej.detail
    assert rej.record.text == "good start\n\ufffd\nline after\n"  # stored in quarantine, storable


def test_jsonl_records_with_line_numbers_and_fields():
    data = b'{"text": "first", "url": "http://a", "n": 3, "tags": ["x"], "html": "%s"}\n\n{"text": "second"}\n' % (
        b"<p>" * 1000)
    first, second = read(data, "jsonl", "d/x.jsonl")
    assert (first.text, second.text) == ("first", "second")
    assert first.meta["origin"] == "d/x.jsonl:1" and second.meta["line"] == 3  # blank line 2 is not a record
    assert first.meta["fields"] == {"url": "http://a", "n": 3}  # short scalars only


def test_jsonl_gz():
    data = gzip.compress(b'{"text": "a"}\n{"text": "b"}\n')
    assert [r.text for r in read(data, "jsonl", "x.jsonl.gz", gz=True)] == ["a", "b"]


def test_jsonl_custom_text_field_and_missing_field_names_fields():
    data = b'{"content": "yes"}\n{"title": "t", "body": "no text field here"}\n{"content": 7}\n'
    items = read(data, "jsonl", text_field="content")
    assert [r.text for r in kept(items)] == ["yes"]
    missing, wrong_type = rejected(items)
    assert missing.reason == "missing_text_field" and missing.record.meta["line"] == 2
    assert "'content'" in missing.detail and "title, body" in missing.detail
    assert wrong_type.reason == "bad_text_field" and "int" in wrong_type.detail


def test_malformed_jsonl_line_is_quarantined_and_reading_goes_on():
    data = b'{"text": "one"}\n{"text": "two",\n[1, 2]\n{"text": "four"}\n'
    items = read(data, "jsonl")
    assert [r.text for r in kept(items)] == ["one", "four"]
    bad, not_object = rejected(items)
    assert bad.reason == "malformed_json" and bad.record.meta["line"] == 2 and "line 2" in bad.detail
    assert bad.record.text == '{"text": "two",\n'
    assert not_object.reason == "malformed_json" and "list" in not_object.detail


@pytest.mark.parametrize("policy", ["replace", "quarantine"])
def test_invalid_byte_in_jsonl_affects_only_its_line(policy):
    data = b'{"text": "before"}\n{"text": "bad \xc3\x28 byte"}\n{"text": "after"}\n'
    items = read(data, "jsonl", decode_errors=policy)
    texts = [r.text for r in kept(items)]
    if policy == "replace":
        assert texts == ["before", "bad \ufffd( byte", "after"]
        assert items[1].meta["decode_replaced"] == 1
    else:
        assert texts == ["before", "after"]
        (rej,) = rejected(items)
        assert rej.reason == "decode_error" and rej.record.meta["line"] == 2


def test_empty_whitespace_and_null_text_are_rejected_as_empty():
    items = rejected(read(b'{"text": ""}\n{"text": " \\n"}\n{"text": null, "url": "u"}\n', "jsonl"))
    assert [r.reason for r in items] == ["empty_text"] * 3
    assert items[2].detail == "'text' is null" and items[2].record.meta["line"] == 3


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_empty_file(fmt):
    (rej,) = read(b"", fmt)
    assert rej.reason == "empty_file" and rej.record.meta["path"] == "in/x"


def test_whitespace_only_files_are_empty():
    assert read(b"  \n\n", "txt")[0].reason == "empty_file"
    assert read(b"\n\n\n", "jsonl")[0].reason == "empty_file"


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv"])
def test_binary_file(fmt):
    (rej,) = read(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), fmt, "img.png")
    assert rej.reason == "binary_file" and rej.record.meta["origin"] == "img.png"


def test_csv_with_named_column_quoted_newlines_and_line_numbers():
    data = b'id,body,lang\n1,"multi\nline text",en\n2,plain,fr\n3,,de\n'
    items = read(data, "csv", "t.csv", text_field="body")
    a, b = kept(items)
    assert a.text == "multi\nline text" and a.meta["line"] == 2 and a.meta["fields"] == {"id": "1", "lang": "en"}
    assert b.text == "plain" and b.meta["origin"] == "t.csv:4"
    assert [r.reason for r in rejected(items)] == ["empty_text"]


def test_csv_without_the_column_names_the_columns():
    items = read(b"a,b\n1,2\n", "csv", text_field="text")
    assert items[0].reason == "missing_text_field" and "a, b" in items[0].detail


def test_tsv_by_suffix():
    (rec,) = read(b"text\tn\nhello\t1\n", "csv", "t.tsv")
    assert rec.text == "hello"


def parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue()


def test_parquet_rows():
    table = pa.table({"text": ["a", None, "c"], "score": [0.5, 0.1, 0.9]})
    items = read(parquet_bytes(table), "parquet", "p.parquet")
    assert [r.text for r in kept(items)] == ["a", "c"]
    assert kept(items)[1].meta["origin"] == "p.parquet#2" and kept(items)[1].meta["fields"] == {"score": 0.9}
    assert [(r.reason, r.record.meta["origin"]) for r in rejected(items)] == [("empty_text", "p.parquet#1")]
    # Without the column (a wrong text_field), every row says which fields it has.
    items = read(parquet_bytes(table), "parquet", "p.parquet", text_field="body")
    assert [r.reason for r in items] == ["missing_text_field"] * 3 and "text, score" in items[0].detail


def test_parquet_with_invalid_utf8_in_a_string_column():
    raw = pa.array([b"ok", b"bad \xff"], pa.binary())
    table = pa.table({"text": pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())})
    assert [r.text for r in read(parquet_bytes(table), "parquet")] == ["ok", "bad \ufffd"]


def test_corrupt_parquet_and_truncated_gzip_become_read_errors():
    (rej,) = read(b"PAR1 this is not parquet", "parquet")
    assert rej.reason == "read_error"
    data = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(2000)))
    items = read(data[: len(data) // 2], "jsonl", gz=True)
    assert len(kept(items)) > 100  # what came before the damage is kept
    assert rejected(items)[-1].reason == "read_error"


def test_too_long_document_is_rejected_without_reading_it_all():
    size = 50 << 20
    tracemalloc.start()
    try:
        (rej,) = read_big(b"x" * (1 << 20), size, "txt", max_doc_chars=1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rej.reason == "too_long" and len(rej.record.text) <= 1 << 20
    assert peak < 20 << 20, f"peak {peak / 2**20:.0f} MiB while rejecting a 50 MB document"


def test_too_long_jsonl_line_uses_bounded_memory_and_next_lines_are_kept():
    tracemalloc.start()
    try:
        items = read_big(b'{"text": "' + b"y" * (1 << 20), 50 << 20, "jsonl", tail=b'"}\n{"text": "next"}\n',
                         max_line_chars=1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.text for r in kept(items)] == ["next"] and kept(items)[0].meta["line"] == 2
    (rej,) = rejected(items)
    assert rej.reason == "too_long" and rej.record.meta["line"] == 1 and "max_line_chars" in rej.detail
    assert peak < 20 << 20, f"peak {peak / 2**20:.0f} MiB while skipping a 50 MB line"


def test_document_over_max_doc_chars_inside_jsonl():
    items = read(json.dumps({"text": "z" * 500}).encode() + b"\n", "jsonl", max_doc_chars=100)
    assert items[0].reason == "too_long" and items[0].length == 500


class _Repeat(io.RawIOBase):
    """A stream of `size` bytes made of one repeated block (+ tail), never held in memory whole."""

    def __init__(self, block: bytes, size: int, tail: bytes):
        self.block, self.size, self.tail, self.pos = block, size, tail, 0

    def readable(self):
        return True

    def readinto(self, buf):
        if self.pos < self.size:
            n = min(len(buf), self.size - self.pos, len(self.block))
            buf[:n] = self.block[:n]
        else:
            rest = self.tail[self.pos - self.size:]
            n = min(len(buf), len(rest))
            buf[:n] = rest[:n]
        self.pos += n
        return n


def read_big(block: bytes, size: int, fmt: str, tail: bytes = b"", **options):
    fh = io.BufferedReader(_Repeat(block, size, tail))
    return list(read_stream(fh, fmt, Where("src", "big"), ReadOptions(**options)))
