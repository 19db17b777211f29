"""The texts evaluation reads, recovered from what the pipeline trained on and held out.

Documents come from the token shards (`data/tokens/{train,val}`: documents end with an eos id), so the
held-out documents are exactly those pretraining never saw and the training documents exactly those
it did, whatever split rule or params produced them. Conversations come back from chat_data's token
rows (`data/chat/sft/{train,val}.parquet`) by their role tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llmpipe.tokenizer import Tokenizer
from llmpipe.tokenizer.shards import open_split


def split_documents(split_dir: Path, tok: Tokenizer, limit: int | None = None) -> Iterator[str]:
    """The documents of a token split, decoded, in shard order (at most `limit`)."""
    n, carry = 0, []  # shards are cut by size, so a document may go on in the next shard
    for shard in open_split(split_dir).shards:
        ends = np.flatnonzero(np.asarray(shard) == tok.eos_id)
        start = 0
        for end in ends:
            if limit is not None and n >= limit:
                return
            ids, carry = carry + np.asarray(shard[start:end]).tolist(), []
            if ids:
                yield tok.decode(ids)
                n += 1
            start = end + 1
        carry += np.asarray(shard[start:]).tolist()


def conversations(parquet: Path, tok: Tokenizer) -> list[list[dict[str, str]]]:
    """chat_data's token rows back into [{"role", "content"}] messages (none if the file is missing)."""
    if not parquet.exists():
        return []
    import pyarrow.parquet as pq

    roles = {tok.system_id: "system", tok.user_id: "user", tok.assistant_id: "assistant"}
    out = []
    for ids in pq.read_table(parquet, columns=["ids"]).column("ids").to_pylist():
        messages, role, content = [], None, []
        for i in ids:
            if i in roles:
                role, content = roles[i], []
            elif i == tok.end_of_turn_id and role is not None:
                messages.append({"role": role, "content": tok.decode(content)})
                role = None
            else:
                content.append(i)
        out.append(messages)
    return out
