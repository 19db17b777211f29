"""The shape of one clean step, datatrove-style: a small callable over one `Record`.

A step returns the record (possibly a modified copy) to keep it, or a `Reject(reason, detail)` to
send it to quarantine. Each step keeps its own `stats` counters (summed across shards into the
stage metrics as `<step.name>.<counter>`), so every number in the report traces back to one step.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import NamedTuple, Protocol, runtime_checkable

from llmpipe.data.accounting import Record


class Reject(NamedTuple):
    reason: str  # dotted name, e.g. "quality.too_few_words": one bar in the report per reason
    detail: str = ""  # the measured value against the threshold, for someone reading the quarantine


@runtime_checkable
class Step(Protocol):
    name: str
    stats: Counter

    def __call__(self, record: Record) -> Record | Reject: ...


def with_text(record: Record, text: str) -> Record:
    """A copy of `record` with new text (the input record is never mutated, so steps compose freely)."""
    return record if text == record.text else dataclasses.replace(record, text=text)
