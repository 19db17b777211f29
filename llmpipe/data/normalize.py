"""Whole-document transforms of the clean stage: HTML to text, Unicode/whitespace normalization and
Project Gutenberg boilerplate removal. They never reject; they run before a document is chunked.

Normalization keeps the text's shape: newlines stay (verse lives in its line breaks), only runs of
horizontal space collapse, and at most one blank line separates paragraphs (the chunker splits on it).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from llmpipe.data.accounting import Record
from llmpipe.data.steps import with_text

# -- Unicode and whitespace ---------------------------------------------------------------------------

_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")  # everything str.splitlines breaks on
# C0/C1 controls except \t and \n (line breaks are already \n), BOM and zero-width space.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufeff\u200b]")
_SPECIAL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff\u200b]")  # either of the two above
_UNICODE_SPACE = re.compile(r"[\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]")  # horizontal, not ASCII
# Patterns that start with a literal are scanned at memchr speed by `re`; classes and alternations are not,
# so the common path below is str methods and literal-prefix patterns only (the stage's hot loop).
_SPACE_RUN = re.compile(r"  +")
_BLANK_LINES = re.compile(r"\n\n\n+")


def normalize_text(text: str) -> str:
    """NFC; \\r\\n, \\r and Unicode line separators -> \\n; control characters removed (\\t, \\n kept);
    runs of spaces/tabs -> one space; lines stripped at both ends; at most one blank line in a row."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
        text = _UNICODE_SPACE.sub(" ", text)
    if "\r" in text:  # Windows/old-Mac line ends: common, and str.replace is far faster than the regex
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _SPECIAL.search(text):
        text = _CONTROL.sub("", _LINE_BREAKS.sub("\n", text))
    if "\t" in text:
        text = text.replace("\t", " ")
    if "  " in text:
        text = _SPACE_RUN.sub(" ", text)
    # Single spaces only now, so two plain replaces strip every line at both ends.
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


class Normalize:
    name = "normalize"

    def __init__(self) -> None:
        self.stats: Counter = Counter()

    def __call__(self, record: Record) -> Record:
        text = normalize_text(record.text)
        self.stats["docs_changed"] += text != record.text
        return with_text(record, text)


# -- Project Gutenberg boilerplate ---------------------------------------------------------------------

# Header ends with "*** START OF THE/THIS PROJECT GUTENBERG EBOOK <title> ***" or, in 1990s texts,
# with "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*" (the legal small print).
_GUTENBERG_START = re.compile(
    r"^\*+ *(?:START OF (?:THE |THIS )?PROJECT GUTENBERG|END\*? *THE SMALL PRINT)[^\n]*$", re.I | re.M)
# Footer starts with "*** END OF THE PROJECT GUTENBERG EBOOK ..." or the older "End of the Project
# Gutenberg EBook of ...", "End of Project Gutenberg's ...", "End of this Project Gutenberg Etext ...".
_GUTENBERG_END = re.compile(r"^(?:\*+ *)?END OF (?:THE |THIS )?PROJECT GUTENBERG", re.I | re.M)
# The volunteer credit right after the header ("Produced by ...") is boilerplate too: one paragraph.
_PRODUCED_BY = re.compile(
    r"\A\s*(?:Produced by|E-?text prepared by|This e-?(?:text|book) was (?:produced|prepared) by)[^\n]*(?:\n[^\n]+)*",
    re.I)


def strip_gutenberg(text: str) -> tuple[str, bool, bool]:
    """Remove a Project Gutenberg license header and footer: (text, header found, footer found).

    The text between the markers is returned untouched. Texts without markers come back unchanged.
    """
    if "utenberg" not in text and "UTENBERG" not in text:  # fast path: nearly every document
        return text, False, False
    first_start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, first_start.end() if first_start else 0)
    # The body starts after the last start marker before the footer: some texts carry a START line
    # and the small print in the header, and 2000s texts repeat the small-print end in the footer.
    starts = list(_GUTENBERG_START.finditer(text, 0, end.start() if end else len(text)))
    begin = starts[-1].end() if starts else 0
    body = text[begin:end.start() if end else len(text)]
    if starts:
        body = _PRODUCED_BY.sub("", body, count=1)
    return body.strip(), bool(starts), end is not None


class StripGutenberg:
    name = "gutenberg"

    def __init__(self) -> None:
        self.stats: Counter = Counter()

    def __call__(self, record: Record) -> Record:
        text, header, footer = strip_gutenberg(record.text)
        self.stats["headers_removed"] += header
        self.stats["footers_removed"] += footer
        self.stats["chars_removed"] += len(record.text) - len(text)
        return with_text(record, text)


# -- HTML ----------------------------------------------------------------------------------------------

# Private-use sentinels mark block boundaries while HTML whitespace (meaningless) is collapsed.
_PARA, _LINE = "\ue000", "\ue001"
_PARA_TAGS = ("p,div,h1,h2,h3,h4,h5,h6,blockquote,pre,table,ul,ol,dl,section,article,header,footer,"
              "main,nav,aside,figure,form,hr,address")
_LINE_TAGS = "br,li,tr,dt,dd,caption,figcaption"
_DROP_TAGS = ["script", "style", "noscript", "template", "svg", "head", "iframe", "object"]
_HTML_SPACE = re.compile(r"\s+")
_BREAKS = re.compile(r"[ \ue000\ue001]*[\ue000\ue001][ \ue000\ue001]*")
_HTML_SNIFF = re.compile(r"<!doctype\s+html|<html[\s>]|<body[\s>]|<head[\s>]", re.I)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page: scripts/styles/head dropped, entities decoded, blocks -> paragraphs,
    <br>/<li>/<tr> -> line breaks, all other HTML whitespace collapsed (<pre> keeps its lines)."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    tree.strip_tags(_DROP_TAGS)
    for node in tree.css("pre"):
        node.replace_with(_PARA + (node.text(separator="") or "").replace("\n", _LINE) + _PARA)
    for selector, mark in ((_PARA_TAGS, _PARA), (_LINE_TAGS, _LINE)):
        for node in tree.css(selector):
            node.insert_before(mark)
            node.insert_after(mark)
    root = tree.body or tree.root
    text = _HTML_SPACE.sub(" ", root.text(separator="") if root is not None else "")
    return _BREAKS.sub(lambda m: "\n\n" if _PARA in m.group() else "\n", text).strip()


def looks_like_html(record: Record) -> bool:
    """Declared HTML (ingest's meta `format`, or an `origin` path ending in .html/.htm) or a text that
    starts like a page (<!doctype html>, <html>, <head> or <body> in its first 2 KiB)."""
    fmt = str(record.meta.get("format", "")).lower()
    origin = str(record.meta.get("origin", "")).lower()
    return fmt == "html" or origin.endswith((".html", ".htm")) or bool(_HTML_SNIFF.search(record.text, 0, 2048))


class HtmlToText:
    name = "html"

    def __init__(self, mode: str = "auto") -> None:
        self.mode = mode  # auto | always | never
        self.stats: Counter = Counter(docs_converted=0)

    def __call__(self, record: Record) -> Record:
        if self.mode == "never" or (self.mode == "auto" and not looks_like_html(record)):
            return record
        self.stats["docs_converted"] += 1
        return with_text(record, html_to_text(record.text))
