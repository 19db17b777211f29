"""Conversations for supervised fine-tuning: the formats users have, read into one shape, validated.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}`: an optional
system message first, then user and assistant strictly alternating, starting with the user and
ending with the assistant, every content non-empty after strip. Anything else is a `Reject` with a
dotted reason (`format.bad_json`, `format.missing_turns`, `turns.empty`, `turns.role_order`), so the
stage can quarantine it and go on.

Sources (the `chat_data.sources` entries of params.yaml): `messages` (OpenAI-style
`{"messages": [...]}`), `sharegpt` (`{"conversations": [{"from", "value"}]}`), `alpaca`
(`{instruction, input, output}`), each a JSONL file or a .json file holding a list of records; `hf`
(a Hugging Face dataset by name, rows in any of those formats); `chitchat` (the wheel of
`chitchat-dataset==0.9.0`, the default). A record's id is a hash of its messages, so the same
conversation has the same id (and split) in any format and in any order of the input.
"""

from __future__ import annotations

import itertools
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.data.accounting import content_id
from llmpipe.data.steps import Reject
from llmpipe.errors import UserError

ROLES = ("system", "user", "assistant")
CHITCHAT_WHEEL = "data/sources/chitchat_dataset-0.9.0-py3-none-any.whl"  # the chitchat stage's output
CHITCHAT_MEMBER = "chitchat_dataset/dataset.json"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Messages = list[dict[str, str]]


# -- the source settings ------------------------------------------------------------------------------

class _Source(StageConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="short name: each record's `source`, the key of per-source accounting")


class _FileSource(_Source):
    path: str = Field(min_length=1, description="a JSONL file (one record a line) or a .json list of records, "
                                                "relative to the project root")


class ChitchatSource(_Source):
    """The chitchat-dataset wheel: `chitchat_dataset/dataset.json` read from the zip."""

    type: Literal["chitchat"]
    path: str = Field(CHITCHAT_WHEEL, min_length=1, description="the wheel, relative to the project root")


class MessagesSource(_FileSource):
    type: Literal["messages"]


class ShareGPTSource(_FileSource):
    type: Literal["sharegpt"]


class AlpacaSource(_FileSource):
    type: Literal["alpaca"]


class HFSource(_Source):
    """A Hugging Face dataset: a hub name, or a packaged builder ("json", "parquet") with local `data_files`."""

    type: Literal["hf"]
    dataset: str = Field(min_length=1)
    config: str | None = None
    split: str = "train"
    limit: int | None = Field(None, ge=1, description="read at most this many rows (null: all)")
    data_files: list[str] | None = Field(None, description="local files for a builder, relative to the project root")
    revision: str | None = Field(None, description="pin a hub dataset's commit: without it reruns may see new data")
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = Field(
        "auto", description="the rows' format; auto: by their keys (messages / conversations / instruction)")


ConversationSource = Annotated[Union[ChitchatSource, MessagesSource, ShareGPTSource, AlpacaSource, HFSource],
                               Field(discriminator="type")]

DEFAULT_SOURCE = ChitchatSource(name="chitchat", type="chitchat")


# -- one record as read ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One record of a source: its id, where it came from, the record as JSON text (for the
    quarantine) and what it parsed to (a conversation, a preference pair, or why not)."""

    id: str
    source: str
    origin: str  # "data/chat.jsonl:12", "hf:org/name:train#7", "<wheel>:<conversation key>"
    raw: str
    value: Any  # Messages, a preferences.Pair, or a Reject


def record_id(value: Any) -> str:
    """The id of a parsed record: a hash of its canonical JSON (same content, same id)."""
    return content_id(json.dumps(value, sort_keys=True, ensure_ascii=False))


def make_row(source: str, origin: str, raw: str, value: Any) -> Row:
    rid = content_id(raw) if isinstance(value, Reject) else record_id(_as_json(value))
    return Row(rid, source, origin, raw, value)


def _as_json(value: Any) -> Any:
    return value.to_json() if hasattr(value, "to_json") else value


def raw_json(record: Any) -> str:
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    # a lone surrogate ("\\ud800" in the input) cannot be written as UTF-8: keep it escaped
    return text if is_utf8(text) else json.dumps(record, sort_keys=True, default=str)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- validation -----------------------------------------------------------------------------------------

def check_turns(messages: Any, last: str = "assistant") -> Messages | Reject:
    """The messages, normalized to plain {role, content} dicts, if they are a valid conversation
    ending with a `last` turn; else why not."""
    if not isinstance(messages, list) or not messages:
        return Reject("format.missing_turns", "no messages")
    out: Messages = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            return Reject("format.missing_turns", f"message {k} is not {{role: str, content: str}}")
        out.append({"role": message["role"], "content": message["content"]})
    body = out[1:] if out[0]["role"] == "system" else out
    if not body:
        return Reject("format.missing_turns", "only a system message")
    for k, message in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if message["role"] != expected:
            at = k + len(out) - len(body)
            return Reject("turns.role_order", f"message {at} is {message['role']!r}, expected {expected!r} "
                                              "(optional system first, then user/assistant alternating)")
    if body[-1]["role"] != last:
        return Reject("turns.role_order", f"the last message is {body[-1]['role']!r}, expected {last!r}")
    for k, message in enumerate(out):
        if not message["content"].strip():
            return Reject("turns.empty", f"message {k} ({message['role']}) is empty")
        if not is_utf8(message["content"]):
            return Reject("format.bad_unicode", f"message {k} holds a lone surrogate (an escape like \\ud800 "
                                                "that is no character)")
    return out


# -- the formats ----------------------------------------------------------------------------------------

def from_messages(record: dict) -> Messages | Reject:
    if "messages" not in record:
        return Reject("format.missing_turns", "no 'messages' key")
    return check_turns(record["messages"])


def from_sharegpt(record: dict) -> Messages | Reject:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return Reject("format.missing_turns", "no 'conversations' list")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return Reject("format.missing_turns", f"turn {k} is not {{from, value: str}}")
        role = SHAREGPT_ROLES.get(str(turn.get("from")).lower())
        if role is None:
            return Reject("turns.role_order", f"turn {k}: 'from' is {turn.get('from')!r}, expected one of "
                                              f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return check_turns(messages)


def from_alpaca(record: dict) -> Messages | Reject:
    instruction, extra, output = record.get("instruction"), record.get("input") or "", record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
        return Reject("format.missing_turns", "needs string 'instruction' and 'output' (and optional 'input')")
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    return check_turns([{"role": "user", "content": user}, {"role": "assistant", "content": output}])


PARSERS = {"messages": from_messages, "sharegpt": from_sharegpt, "alpaca": from_alpaca}


def from_any(record: dict) -> Messages | Reject:
    """A row of unknown format (a HF dataset): told apart by its keys (a None value counts as absent:
    the json builder gives every row every column of the file)."""
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
        if record.get(key) is not None:
            return PARSERS[fmt](record)
    return Reject("format.missing_turns", f"no 'messages', 'conversations' or 'instruction' key "
                                          f"(keys: {', '.join(sorted(record)) or 'none'})")


def from_chitchat(conversation: Any) -> Messages | Reject:
    """One chitchat conversation: `messages` is a list of groups of {sender, text}. Consecutive
    messages of one sender become one turn (joined with newlines, blank ones skipped); the first
    sender is the user, then turns alternate; a trailing user turn (no reply) is dropped."""
    groups = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(groups, list):
        return Reject("format.missing_turns", "no 'messages' list")
    flat = list(itertools.chain.from_iterable(g if isinstance(g, list) else [g] for g in groups))
    if not all(isinstance(m, dict) and isinstance(m.get("text"), str) and "sender" in m for m in flat):
        return Reject("format.missing_turns", "a message is not {sender, text: str}")
    turns = [[m["text"] for m in run] for _, run in itertools.groupby(flat, key=lambda m: m["sender"])]
    if len(turns) < 2:
        return Reject("format.missing_turns", "one speaker only: nobody answered")
    turns = turns[: len(turns) // 2 * 2]
    messages = [{"role": "user" if k % 2 == 0 else "assistant",
                 "content": "\n".join(t for t in texts if t.strip())} for k, texts in enumerate(turns)]
    return check_turns(messages)


# -- reading a source -----------------------------------------------------------------------------------

def iter_json_records(path: Path, shown: str) -> Iterator[tuple[str, str, Any]]:
    """(origin, raw text, record or Reject) for every record of a JSONL file (blank lines skipped) or of
    a .json file holding a list. A bad line is a `format.bad_json` reject; the rest of the file is read."""
    if not path.is_file():
        raise UserError(f"{shown}: file not found; fix the source's path in params.yaml (chat_data) "
                        "or create the file")
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{shown}: not valid JSON ({exc}); a .json source holds one list of records, "
                            "use .jsonl for one record a line") from None
        if not isinstance(records, list):
            raise UserError(f"{shown}: a .json source must hold a list of records, got {type(records).__name__}")
        for k, record in enumerate(records):
            yield f"{shown}:{k}", raw_json(record), record
        return
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            yield f"{shown}:{number}", text, _parse_line(line)


def _parse_line(line: bytes) -> Any:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return Reject("format.bad_json", f"not UTF-8: {exc}")
    except ValueError as exc:
        return Reject("format.bad_json", str(exc))
    if not isinstance(record, dict):
        return Reject("format.bad_json", f"a JSON object per line expected, got {type(record).__name__}")
    return record


def iter_hf_records(src: Any, root: Path) -> Iterator[tuple[str, str, Any]]:
    """(origin, raw text, row) for the rows of a Hugging Face dataset (streamed: nothing cached)."""
    import datasets

    kwargs: dict[str, Any] = {}
    if src.data_files:
        kwargs["data_files"] = [str(root / f) for f in src.data_files]
    if src.revision:
        kwargs["revision"] = src.revision
    stream = datasets.load_dataset(src.dataset, src.config, split=src.split, streaming=True, **kwargs)
    name = src.dataset + (f"/{src.config}" if src.config else "")
    for k, row in enumerate(itertools.islice(stream, src.limit)):
        yield f"hf:{name}:{src.split}#{k}", raw_json(row), dict(row)


def iter_chitchat(path: Path, shown: str) -> Iterator[tuple[str, str, Any]]:
    if not path.is_file():
        raise UserError(f"{shown}: not found; run the chitchat stage (dvc repro chitchat) or fix the "
                        "chitchat source's path in params.yaml (chat_data.sources)")
    try:
        with zipfile.ZipFile(path) as wheel:
            data = json.loads(wheel.read(CHITCHAT_MEMBER))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise UserError(f"{shown}: not a chitchat-dataset wheel with {CHITCHAT_MEMBER} ({exc}); "
                        "delete it and run the chitchat stage again") from None
    if not isinstance(data, dict):
        raise UserError(f"{shown}: {CHITCHAT_MEMBER} is not a mapping of conversation ids to conversations")
    for key, conversation in data.items():
        yield f"{shown}:{key}", raw_json({"key": key, **conversation}) if isinstance(conversation, dict) \
            else raw_json({"key": key, "value": conversation}), conversation


def read_conversations(src: Any, root: Path) -> Iterator[Row]:
    """Every record of one source as a Row whose value is the validated messages or a Reject."""
    if src.type == "chitchat":
        records, parse = iter_chitchat(root / src.path, src.path), from_chitchat
    elif src.type == "hf":
        records, parse = iter_hf_records(src, root), from_any if src.format == "auto" else PARSERS[src.format]
    else:
        records, parse = iter_json_records(root / src.path, src.path), PARSERS[src.type]
    for origin, raw, record in records:
        yield make_row(src.name, origin, raw, parsed(record, parse))


def parsed(record: Any, parse) -> Any:
    """`parse(record)` for a JSON object; a reader's Reject passes through."""
    if isinstance(record, Reject):
        return record
    if not isinstance(record, dict) and parse is not from_chitchat:
        return Reject("format.bad_json", f"a JSON object per record expected, got {type(record).__name__}")
    return parse(record)


def content_chars(messages: Messages) -> int:
    return sum(len(m["content"]) for m in messages)
