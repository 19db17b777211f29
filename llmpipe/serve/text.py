"""Streaming text for the generation engine: ids to text deltas, and stop strings.

`IncrementalDetokenizer` turns token ids, one at a time, into text deltas that join to exactly
`tokenizer.decode(ids)`. With byte fallback a rare character arrives as several byte pieces
(<0xE2><0x82><0xAC> for "€"); decoding them one by one would print U+FFFD, so the pieces of an
unfinished character are held back until its last byte arrives. Each step decodes only a short
window (the previous step's tokens and the new ones), so streaming costs O(1) per token, not O(n).

`StopMatcher` watches the streamed text for stop strings, which may arrive split across tokens
("\\n", "\\nUS", "ER:"): it holds back any tail that could still become a stop string, so no delta
ever shows part of a stop, and reports the text before the first stop once one is complete.

Standard library only: the tokenizer is passed in (anything with `decode`, `is_byte`, `id_to_piece`).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from llmpipe.errors import UserError


class Detokenizable(Protocol):
    def decode(self, ids: list[int]) -> str: ...
    def is_byte(self, i: int) -> bool: ...
    def id_to_piece(self, i: int) -> str: ...


def utf8_length(lead: int) -> int:
    """Bytes in the UTF-8 sequence a byte starts: 1 for ASCII, 2-4 for a lead byte, 0 for a
    continuation byte or a byte that can never start a sequence."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def incomplete_tail(tail: Sequence[int]) -> int:
    """How many of the last bytes form the start of a UTF-8 character still missing bytes (0 if none).

    Invalid bytes are not held: they will never complete, and the decoder shows them as U+FFFD."""
    for back in range(1, min(len(tail), 3) + 1):  # a 4-byte character is unfinished with at most 3
        byte = tail[-back]
        if 0x80 <= byte <= 0xBF:  # a continuation byte: the lead is further back
            continue
        return back if utf8_length(byte) > back else 0
    return 0


class IncrementalDetokenizer:
    """push(id) -> the new text, always whole characters; flush() at the end for anything held."""

    def __init__(self, tokenizer: Detokenizable):
        self.tok = tokenizer
        self.ids: list[int] = []
        # text is emitted up to ids[:read]; ids[prefix:read] is the context re-decoded each step, so a
        # tokenizer that treats a sequence's first piece specially (a leading space) cannot shift it
        self._prefix = 0
        self._read = 0
        self._tail: list[int] = []  # byte values of the trailing byte pieces (at most 4 kept)

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self.ids.append(token_id)
        self._tail = self._tail[-3:] + [self._byte(token_id)] if self.tok.is_byte(token_id) else []
        return self._emit(len(self.ids) - incomplete_tail(self._tail))

    def flush(self) -> str:
        """The text still held back (an unfinished character, decoded as U+FFFD); call once at the end."""
        return self._emit(len(self.ids))

    def _emit(self, end: int) -> str:
        if end <= self._read:
            return ""
        before = self.tok.decode(self.ids[self._prefix:self._read])
        delta = self.tok.decode(self.ids[self._prefix:end])[len(before):]
        self._prefix, self._read = self._read, end
        return delta

    def _byte(self, token_id: int) -> int:
        return int(self.tok.id_to_piece(token_id)[3:5], 16)  # "<0xE2>" -> 0xE2


class StopMatcher:
    """Feed streamed text with push(); it returns what is safe to show. Once a stop string is
    complete, `stopped` is True, `stop` names it and push has returned the text before it."""

    def __init__(self, stops: Sequence[str]):
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise UserError(f"stop string {stop!r} is invalid: every stop string must be a non-empty string")
        self.stops = list(stops)
        self._held = ""
        self.stopped = False
        self.stop: str | None = None

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self._held + delta
        found = [(text.find(s), s) for s in self.stops if s in text]
        if found:
            at, self.stop = min(found, key=lambda f: f[0])  # the earliest stop wins
            self.stopped, self._held = True, ""
            return text[:at]
        keep = self._possible_stop_start(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back text when generation ends without a stop (max tokens, end of sequence)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _possible_stop_start(self, text: str) -> int:
        """Length of the longest tail of `text` that is the beginning of some stop string."""
        longest = max((len(s) for s in self.stops), default=1)
        for n in range(min(len(text), longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


__all__ = ["IncrementalDetokenizer", "StopMatcher", "incomplete_tail", "utf8_length"]
