"""Preference pairs for DPO: a prompt (messages ending with a user turn), a chosen and a rejected reply.

Sources (the `chat_data.preferences` entries of params.yaml):
- `pairs`: records `{prompt, chosen, rejected}` (prompt a string or a message list; replies strings),
  a JSONL file or a .json list;
- `hh`: Anthropic HH-style records `{chosen, rejected}`, each a whole dialogue
  ("\\n\\nHuman: ...\\n\\nAssistant: ..."): the shared turns are the prompt, the two final assistant
  replies are chosen and rejected;
- `hf`: either of those from a Hugging Face dataset by name;
- `relevance` (the default): built from the conversations of one of `chat_data.sources`. The prompt
  is a conversation up to its last assistant turn, chosen is the real reply, rejected is the last
  reply of another conversation of the same split, picked with the seed. It teaches a model to
  prefer the reply that answers the conversation over a fluent reply to some other one: a
  *relevance* preference set, not a helpfulness or harmlessness one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field

from llmpipe.data.steps import Reject
from llmpipe.finetune.conversations import (HFSource, Messages, Row, _FileSource, _Source, check_turns,
                                            is_utf8, iter_hf_records, iter_json_records, make_row, parsed, raw_json)
from llmpipe.tokenizer.encode import is_val

HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class Pair:
    prompt: Messages  # ends with a user turn
    chosen: str
    rejected: str

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


# -- the source settings ------------------------------------------------------------------------------

class RelevanceSource(_Source):
    """Pairs built from the conversations of the conversation source named `from`."""

    model_config = ConfigDict(populate_by_name=True)
    type: Literal["relevance"]
    from_: str = Field("chitchat", alias="from", min_length=1,
                       description="the name of the chat_data.sources entry whose conversations make the pairs")


class PairsSource(_FileSource):
    type: Literal["pairs"]


class HHSource(_FileSource):
    type: Literal["hh"]


class HFPairsSource(HFSource):
    format: Literal["auto", "pairs", "hh"] = Field(  # type: ignore[assignment]
        "auto", description="the rows' format; auto: `pairs` when a row has a 'prompt' key, else `hh`")


PreferenceSource = Annotated[Union[RelevanceSource, PairsSource, HHSource, HFPairsSource],
                             Field(discriminator="type")]

DEFAULT_PREFERENCES = RelevanceSource(name="chitchat-relevance", type="relevance", from_="chitchat")


# -- validation and the formats -------------------------------------------------------------------------

def check_pair(prompt: Any, chosen: Any, rejected: Any) -> Pair | Reject:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt is None or not isinstance(chosen, str) or not isinstance(rejected, str):
        return Reject("format.missing_turns", "needs 'prompt' (string or messages), 'chosen' and 'rejected' strings")
    messages = check_turns(prompt, last="user")
    if isinstance(messages, Reject):
        return messages
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply.strip():
            return Reject("turns.empty", f"the {name} reply is empty")
        if not is_utf8(reply):
            return Reject("format.bad_unicode", f"the {name} reply holds a lone surrogate")
    if chosen.strip() == rejected.strip():
        return Reject("pair.identical", "chosen and rejected are the same reply: nothing to prefer")
    return Pair(messages, chosen, rejected)


def from_pairs(record: dict) -> Pair | Reject:
    return check_pair(record.get("prompt"), record.get("chosen"), record.get("rejected"))


def parse_hh_dialogue(text: Any) -> Messages | Reject:
    """"\\n\\nHuman: hi\\n\\nAssistant: hello" -> messages (contents stripped)."""
    if not isinstance(text, str):
        return Reject("format.missing_turns", "an HH dialogue must be a string")
    parts = HH_TURN.split(text)
    if parts[0].strip():
        return Reject("turns.role_order", "text before the first 'Human:' / 'Assistant:' marker")
    messages = [{"role": HH_ROLES[role], "content": content.strip()}
                for role, content in zip(parts[1::2], parts[2::2])]
    return check_turns(messages)


def from_hh(record: dict) -> Pair | Reject:
    chosen, rejected = parse_hh_dialogue(record.get("chosen")), parse_hh_dialogue(record.get("rejected"))
    for dialogue in (chosen, rejected):
        if isinstance(dialogue, Reject):
            return dialogue
    if chosen[:-1] != rejected[:-1]:
        return Reject("pair.prompt_mismatch", "the chosen and rejected dialogues differ before their last reply")
    return check_pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def from_any(record: dict) -> Pair | Reject:
    return from_pairs(record) if record.get("prompt") is not None else from_hh(record)


PARSERS = {"pairs": from_pairs, "hh": from_hh, "auto": from_any}


def read_pairs(src: Any, root: Path) -> Iterator[Row]:
    """Every record of a `pairs`, `hh` or `hf` source as a Row whose value is a Pair or a Reject."""
    if src.type == "hf":
        records, parse = iter_hf_records(src, root), PARSERS[src.format]
    else:
        records, parse = iter_json_records(root / src.path, src.path), PARSERS[src.type]
    for origin, raw, record in records:
        yield make_row(src.name, origin, raw, parsed(record, parse))


# -- the relevance preference set -----------------------------------------------------------------------

def relevance_pairs(conversations: list[Row], name: str, seed: int, val_ratio: float) -> Iterator[Row]:
    """One pair per valid conversation (a Row keyed by the conversation's id, so it lands in the same
    split): rejected is the last reply of another conversation of that split. The choice depends on
    the seed and the set of conversations, not on their order."""
    for in_val in (False, True):
        group = sorted((c for c in conversations if is_val(c.id, val_ratio) == in_val), key=lambda c: c.id)
        for i, conversation in enumerate(group):
            messages = conversation.value
            origin = f"relevance:{conversation.origin}"
            if len(group) < 2:
                value: Pair | Reject = Reject("pair.no_other", "no other conversation in its split to take a "
                                                                "rejected reply from")
                yield Row(conversation.id, name, origin, conversation.raw, value)
                continue
            other = group[(i + 1 + random.Random(f"{seed}:{conversation.id}").randrange(len(group) - 1)) % len(group)]
            value = check_pair(messages[:-1], messages[-1]["content"], other.value[-1]["content"])
            raw = conversation.raw if isinstance(value, Reject) else raw_json(
                {**value.to_json(), "conversation": conversation.origin, "rejected_from": other.origin})
            yield Row(conversation.id, name, origin, raw, value)
