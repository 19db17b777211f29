"""PII scrubbing: e-mail addresses, IPv4/IPv6 addresses and phone numbers become typed placeholders.

Scrubbing never rejects a record; it counts replacements per type (`pii.email`, ...) and notes them
in the record's meta. Patterns are deliberately narrow, because literature is full of numbers that
are not PII: "Act 1, Scene 2", "1.2.3", years and year ranges, "3:16", verse/line references. A
phone number needs a leading "+" or the North-American 3-3-4 shape; an IP address must parse.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections import Counter
from typing import Literal

from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.data.accounting import Record

PIIType = Literal["email", "ip_address", "phone"]
PLACEHOLDERS: dict[str, str] = {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "phone": "<PHONE>"}

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}\b")
# IP candidates; `ipaddress` decides. No lookbehind at the start (it would make `re` try every position):
# the character before a candidate is checked in Python, for the few candidates there are.
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?![\w]|\.[0-9])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?![\w:])")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{1,4}:")  # starts with a literal: scanned fast
# Phones in two stages: a character-class-first candidate scan (fast), then the exact shapes inside it.
_PHONE_CANDIDATE = re.compile(r"[+(0-9][0-9 ().+-]{6,}[0-9]")
_PHONE = re.compile(r"""(?<![\w+.-])(?:
      \+[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,4}\)?){2,5}            # international: +44 20 7946 0958
    | (?:\+?1[ .-]?)?\([0-9]{3}\)[ .-]?[0-9]{3}[ .-][0-9]{4}   # (555) 123-4567
    | [0-9]{3}([.-])[0-9]{3}\1[0-9]{4}                        # 555-123-4567, 555.123.4567
    )(?![\w]|[.-][0-9])""", re.X)


def _after_word(m: re.Match, chars: str) -> bool:
    """Whether the match continues a word/number (the char before it is alphanumeric or in `chars`)."""
    i = m.start()
    return i > 0 and (m.string[i - 1].isalnum() or m.string[i - 1] in chars)


def _is_ipv4(m: re.Match) -> bool:
    if _after_word(m, "._") or m.string[max(m.start() - 8, 0):m.start()].lower() == "version ":
        return False  # v1.2.3.4, 10.1.2.3.4, "version 2.0.1.3"
    return _is_ip(m)


def _is_ip(m: re.Match) -> bool:
    try:
        ipaddress.ip_address(m.group())
    except ValueError:
        return False
    return any(ch.isdigit() for ch in m.group())  # "dead:beef::" parses, but is a word pair in prose


def _scrub_phones(text: str, found: Counter) -> str:
    def exact(m: re.Match) -> str:
        if not 8 <= sum(ch.isdigit() for ch in m.group()) <= 15:  # E.164: at most 15 digits
            return m.group()
        found["phone"] += 1
        return PLACEHOLDERS["phone"]

    def candidate(m: re.Match) -> str:
        end = m.end()
        if _after_word(m, "+_.-") or (end < len(m.string) and (m.string[end].isalnum() or m.string[end] == "_")):
            return m.group()  # part of a longer token: a serial, a version, an id
        return _PHONE.sub(exact, m.group())

    return _PHONE_CANDIDATE.sub(candidate, text)


_NOT_DIGITS = bytes(b for b in range(256) if not 48 <= b <= 57)


def _digits(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass").translate(None, _NOT_DIGITS))


# (type, pattern, validator, least ASCII digits a match needs, cheap precheck that nearly every text fails)
_RULES = [
    ("email", _EMAIL, None, 0, lambda t: "@" in t),
    ("ip_address", _IPV6, _is_ip, 1, lambda t: "::" in t or _IPV6_HINT.search(t) is not None),
    ("ip_address", _IPV4, _is_ipv4, 4, None),
]


def scrub_pii(text: str, types: tuple[str, ...] = tuple(PLACEHOLDERS)) -> tuple[str, Counter]:
    """Replace PII of the given types with placeholders; returns (text, replacements per type)."""
    found: Counter = Counter()
    digits = _digits(text)  # most prose has too few digits for any address or number: skip those patterns
    for kind, pattern, valid, min_digits, precheck in _RULES:
        if kind not in types or digits < min_digits or (precheck is not None and not precheck(text)):
            continue

        def replace(m: re.Match, kind=kind, valid=valid) -> str:
            if valid is not None and not valid(m):
                return m.group()
            found[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    if "phone" in types and digits >= 8:
        text = _scrub_phones(text, found)
    return text, found


class PIIConfig(StageConfig):
    types: list[PIIType] = Field(default_factory=lambda: list(PLACEHOLDERS),
                                 description="PII types to replace with <EMAIL>, <IP_ADDRESS>, <PHONE>; [] turns scrubbing off")


class ScrubPII:
    name = "pii"

    def __init__(self, cfg: PIIConfig) -> None:
        self.types = tuple(cfg.types)
        self.stats: Counter = Counter({kind: 0 for kind in self.types})  # every type in the metrics, even at 0

    def __call__(self, record: Record) -> Record:
        text, found = scrub_pii(record.text, self.types)
        if not found:
            return record
        self.stats.update(found)
        return dataclasses.replace(record, text=text, meta={**record.meta, "pii": dict(sorted(found.items()))})
