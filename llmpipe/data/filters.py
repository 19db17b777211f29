"""Gopher/C4-style quality filters (Rae et al. 2021, "Scaling Language Models", appendix A), per chunk.

Words are whitespace-separated tokens (punctuation attached), lines are non-blank lines, paragraphs
are separated by a blank line. The filters expect normalized text (`normalize.normalize_text`: single
spaces, stripped lines, single blank lines), which is what the clean pipeline gives them. Each check
has its own reject reason (`quality.<check>`) and a detail with the measured value, so a threshold
can be tuned from the quarantine alone. Every measurement is a str method or one precompiled regex
over the text: no per-character Python loops.
"""

from __future__ import annotations

import re
from collections import Counter

from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.data.accounting import Record
from llmpipe.data.steps import Reject

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_STOP_WORD = re.compile(r"\b(?:" + "|".join(STOP_WORDS) + r")\b", re.I)
# A token with no letter: only digits, underscores, punctuation or symbols ("1.2", "--", "***").
_NON_ALPHA_TOKEN = re.compile(r"(?<!\S)(?:[\d_]|[^\w\s])+(?!\S)")
# ASCII fast path of the same count: letters -> "a", whitespace -> " ", the rest -> "#"; then count
# " #...#" runs, a literal-prefix pattern that `re` scans at memchr speed.
_LETTER_CLASSES = bytes(ord("a") if chr(b).isalpha() else ord(" ") if chr(b).isspace() else ord("#")
                        for b in range(128)) + b"a" * 128
_NON_ALPHA_RUN = re.compile(rb" #+(?= )")
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|\u2026)$", re.M)


def count_non_alpha_words(text: str) -> int:
    if text.isascii():
        return len(_NON_ALPHA_RUN.findall(b" " + text.encode().translate(_LETTER_CLASSES) + b" "))
    return len(_NON_ALPHA_TOKEN.findall(text))


class QualityConfig(StageConfig):
    """Thresholds of the quality filters. The defaults are Gopher's except where the demo corpus (plays,
    verse) needs room; a chunk is rejected by the first check it fails."""

    min_words: int = Field(50, ge=0, description="fewer words -> quality.too_few_words")
    max_words: int = Field(100_000, ge=1, description="more words -> quality.too_many_words")
    min_mean_word_length: float = Field(3.0, ge=0, description="-> quality.short_words")
    max_mean_word_length: float = Field(10.0, gt=0, description="-> quality.long_words")
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="(# + ellipses) per word -> quality.symbols")
    min_alpha_words_fraction: float = Field(0.8, ge=0, le=1, description="words with a letter -> quality.non_alpha")
    min_stop_words: int = Field(2, ge=0, description="occurrences of the, be, to, of, and, that, have, with")
    max_ellipsis_lines_fraction: float = Field(0.3, ge=0, le=1, description="-> quality.ellipsis_lines")
    # Gopher: 0.3 and 0.2. Plays repeat their speaker lines ("HAMLET.") in 40% of the lines of a quick
    # dialogue, and songs have refrains; junk repeats whole long lines, which the char fraction catches.
    max_dup_line_fraction: float = Field(0.5, ge=0, le=1, description="repeated lines / lines")
    max_dup_line_char_fraction: float = Field(0.25, ge=0, le=1, description="chars in repeated lines / chars")
    max_dup_paragraph_fraction: float = Field(0.3, ge=0, le=1, description="repeated paragraphs / paragraphs")
    max_dup_paragraph_char_fraction: float = Field(0.2, ge=0, le=1, description="chars in repeated paragraphs / chars")


class GopherQuality:
    """Word-count, word-length, symbol, alphabetic, stop-word and ellipsis checks."""

    name = "quality"

    def __init__(self, cfg: QualityConfig) -> None:
        self.cfg = cfg
        self.stats: Counter = Counter()

    def __call__(self, record: Record) -> Record | Reject:
        c, text = self.cfg, record.text
        self.stats["checked"] += 1
        # Normalized text: words are separated by exactly one " ", "\n" or "\n\n" (str.count is C-speed).
        newlines, blank_lines = text.count("\n"), text.count("\n\n")
        separators = text.count(" ") + newlines - blank_lines
        n = separators + 1 if text else 0
        if n < c.min_words:
            return Reject("quality.too_few_words", f"{n} words < min_words {c.min_words}")
        if n > c.max_words:
            return Reject("quality.too_many_words", f"{n} words > max_words {c.max_words}")
        mean_len = (len(text) - separators - blank_lines) / n
        if mean_len < c.min_mean_word_length:
            return Reject("quality.short_words", f"mean word length {mean_len:.2f} < {c.min_mean_word_length}")
        if mean_len > c.max_mean_word_length:
            return Reject("quality.long_words", f"mean word length {mean_len:.2f} > {c.max_mean_word_length}")
        symbols = (text.count("#") + text.count("...") + text.count("\u2026")) / n
        if symbols > c.max_symbol_word_ratio:
            return Reject("quality.symbols", f"{symbols:.3f} #/ellipses per word > {c.max_symbol_word_ratio}")
        alpha = 1 - count_non_alpha_words(text) / n
        if alpha < c.min_alpha_words_fraction:
            return Reject("quality.non_alpha", f"{alpha:.3f} of words have a letter < {c.min_alpha_words_fraction}")
        if c.min_stop_words:
            stops = 0
            for _ in _STOP_WORD.finditer(text):
                stops += 1
                if stops >= c.min_stop_words:
                    break
            if stops < c.min_stop_words:
                return Reject("quality.few_stop_words", f"{stops} stop words < min_stop_words {c.min_stop_words}")
        lines = newlines + 1 - blank_lines
        ellipsis = len(_ELLIPSIS_LINE.findall(text)) / lines if "..." in text or "\u2026" in text else 0.0
        if ellipsis > c.max_ellipsis_lines_fraction:
            return Reject("quality.ellipsis_lines", f"{ellipsis:.3f} of lines end in ... > {c.max_ellipsis_lines_fraction}")
        return record


def duplicates(elements: list[str]) -> tuple[int, int]:
    """(elements that repeat an earlier one, their characters): Gopher's repetition measure."""
    unique = set(elements)
    return len(elements) - len(unique), sum(map(len, elements)) - sum(map(len, unique))


class GopherRepetition:
    """Duplicate-line and duplicate-paragraph fractions, by count and by characters."""

    name = "repetition"

    def __init__(self, cfg: QualityConfig) -> None:
        self.cfg = cfg
        self.stats: Counter = Counter()

    def __call__(self, record: Record) -> Record | Reject:
        c, text = self.cfg, record.text
        self.stats["checked"] += 1
        chars = max(len(text), 1)
        paragraphs = text.split("\n\n")  # normalized: a blank line is exactly "\n\n"
        dup, dup_chars = duplicates(paragraphs)
        if dup / len(paragraphs) > c.max_dup_paragraph_fraction:
            return Reject("quality.dup_paragraphs", f"{dup}/{len(paragraphs)} paragraphs repeated")
        if dup_chars / chars > c.max_dup_paragraph_char_fraction:
            return Reject("quality.dup_paragraph_chars", f"{dup_chars}/{chars} chars in repeated paragraphs")
        lines = text.replace("\n\n", "\n").split("\n")  # normalized: no other blank lines
        dup, dup_chars = duplicates(lines)
        if dup / max(len(lines), 1) > c.max_dup_line_fraction:
            return Reject("quality.dup_lines", f"{dup}/{len(lines)} lines repeated")
        if dup_chars / chars > c.max_dup_line_char_fraction:
            return Reject("quality.dup_line_chars", f"{dup_chars}/{chars} chars in repeated lines")
        return record
