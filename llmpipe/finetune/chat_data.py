"""The `chat_data` stage: conversations and preference pairs, validated, truncated and tokenized with the
project's tokenizer into the tables the `sft` and `dpo` stages read. Paths by role (llmpipe.stages):

    sources of params.yaml (chat_data.sources, .preferences), [tokenizer] models/tokenizer
        ─▶ [chat] data/chat/sft/{train,val}.parquet    id, ids: list<int32>, mask: list<bool>
                  data/chat/dpo/{train,val}.parquet    id, prompt_ids, chosen_ids, rejected_ids: list<int32>
                  data/chat/quarantine/{sft,dpo}.parquet  id, source, origin, reason, detail, raw (JSON text)
                  data/chat/meta.json, report.md (+ plots)

A conversation is `Tokenizer.apply_chat_template(messages)`; its mask is True exactly at the tokens the
model learns to produce: each assistant message's content and its closing end_of_turn (never a role
token, never a user or system token). A prompt ends with the `<|assistant|>` id; a response is its
content ids plus end_of_turn.

Truncation: a conversation longer than `max_tokens` loses its oldest user/assistant exchanges (the
system message stays) until it fits; when even the last exchange does not fit it is rejected as
`length.too_long`. A pair's prompt is cut the same way until prompt + the longer response fits.

Every record read is kept or rejected with a reason (read == kept + rejected per source, checked
against the rows written); the split is by a hash of the record id (`val_ratio`), as the
tokenizer's. The whole output is built in a temp directory and renamed into place: a final path
never holds part of a run, and the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from llmpipe.config import StageConfig
from llmpipe.data.accounting import Counts
from llmpipe.data.report import PLOTS, write_report
from llmpipe.data.steps import Reject
from llmpipe.finetune.conversations import (DEFAULT_SOURCE, ConversationSource, Messages, Row, content_chars,
                                            read_conversations)
from llmpipe.finetune.preferences import (DEFAULT_PREFERENCES, Pair, PreferenceSource, read_pairs,
                                          relevance_pairs)
from llmpipe.io import atomic_path, remove_temp_leftovers, write_json_atomic
from llmpipe.tokenizer.encode import is_val
from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

CHAT_FORMAT = "llmpipe.chat/1"
SPLITS = ("train", "val")
IDS = pa.list_(pa.int32())
SFT_SCHEMA = pa.schema([("id", pa.string()), ("ids", IDS), ("mask", pa.list_(pa.bool_()))])
DPO_SCHEMA = pa.schema([("id", pa.string()), ("prompt_ids", IDS), ("chosen_ids", IDS), ("rejected_ids", IDS)])
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("origin", pa.string()),
                               ("reason", pa.string()), ("detail", pa.string()), ("raw", pa.string())])


class ChatDataConfig(StageConfig):
    """The `chat_data` section of params.yaml."""

    sources: list[ConversationSource] = Field(default_factory=lambda: [DEFAULT_SOURCE], min_length=1,
                                              description="conversations for SFT")
    preferences: list[PreferenceSource] = Field(default_factory=lambda: [DEFAULT_PREFERENCES],
                                                description="preference pairs for DPO (empty: none)")
    val_ratio: float = Field(0.05, gt=0, lt=1, description="fraction of records (by id hash) held out for val")
    max_tokens: int = Field(256, ge=8, description="longest templated conversation (and prompt + response), tokens")
    seed: int = Field(0, description="picks the rejected reply of each relevance pair")

    @model_validator(mode="after")
    def _check_names(self) -> ChatDataConfig:
        names = [s.name for s in (*self.sources, *self.preferences)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:  # a ValueError in a validator: load_section makes it a ConfigError naming the key
            raise ValueError(f"source names must be unique across sources and preferences (they key the "
                             f"accounting); repeated: {', '.join(dupes)}")
        conversation_names = {s.name for s in self.sources}
        for p in self.preferences:
            if p.type == "relevance" and p.from_ not in conversation_names:
                raise ValueError(f"preferences '{p.name}': from: {p.from_!r} is not the name of an entry of "
                                 f"chat_data.sources ({', '.join(sorted(conversation_names))})")
        return self


# -- tokenizing one record ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    mask: list[bool]
    truncated: bool


def _fit(messages: Messages, lengths: list[int], budget: int, keep_last: int) -> int | None:
    """The index from which the non-system messages are kept so their tokens fit `budget` (the oldest
    exchanges dropped two messages at a time, the last `keep_last` messages always kept); None if
    even that does not fit."""
    start = 1 if messages[0]["role"] == "system" else 0
    total = sum(lengths)
    while total > budget:
        if len(messages) - start <= keep_last:
            return None
        total -= lengths[start] + lengths[start + 1]
        start += 2
    return start


def _message_lengths(tok: Tokenizer, messages: Messages) -> list[int]:
    return [len(ids) + 2 for ids in tok.encode_batch([m["content"] for m in messages], num_threads=1)]


def _kept(messages: Messages, start: int) -> Messages:
    return messages[:1] + messages[start:] if messages[0]["role"] == "system" else messages[start:]


def encode_conversation(tok: Tokenizer, messages: Messages, max_tokens: int) -> Encoded | Reject:
    lengths = _message_lengths(tok, messages)
    start = _fit(messages, lengths, max_tokens, keep_last=2)
    if start is None:
        return Reject("length.too_long", f"{sum(lengths[-2:])} tokens in the last exchange alone, max_tokens "
                                         f"is {max_tokens}")
    kept = _kept(messages, start)
    ids = tok.apply_chat_template(kept)
    mask: list[bool] = []
    for message, n in zip(kept, _message_lengths(tok, kept)):
        # the role token is given; the content and its end_of_turn are what the model produces
        mask += [False] + [message["role"] == "assistant"] * (n - 1)
    if len(mask) != len(ids):
        raise RuntimeError(f"mask of {len(mask)} for {len(ids)} ids: the chat template changed (a bug in llmpipe)")
    return Encoded(ids, mask, truncated=len(kept) < len(messages))


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def encode_pair(tok: Tokenizer, pair: Pair, max_tokens: int) -> EncodedPair | Reject:
    chosen, rejected = (ids + [tok.end_of_turn_id] for ids in tok.encode_batch([pair.chosen, pair.rejected],
                                                                                num_threads=1))
    longest = max(len(chosen), len(rejected))
    lengths = _message_lengths(tok, pair.prompt)
    start = _fit(pair.prompt, lengths, max_tokens - longest - 1, keep_last=1)  # 1: the <|assistant|> id
    if start is None:
        return Reject("length.too_long", f"the last user turn ({lengths[-1]} tokens) + the generation prompt + "
                                         f"the longer reply ({longest}) exceed max_tokens {max_tokens}")
    kept = _kept(pair.prompt, start)
    return EncodedPair(tok.apply_chat_template(kept, add_generation_prompt=True), chosen, rejected,
                       truncated=len(kept) < len(pair.prompt))


# -- the tables -----------------------------------------------------------------------------------------

@dataclass
class Tables:
    """The rows of one kind (sft or dpo): per split, plus its quarantine."""

    schema: pa.Schema
    splits: dict[str, dict[str, list]] = field(init=False)
    quarantine: dict[str, list] = field(init=False)

    def __post_init__(self) -> None:
        self.splits = {split: {n: [] for n in self.schema.names} for split in SPLITS}
        self.quarantine = {n: [] for n in QUARANTINE_SCHEMA.names}

    def add(self, split: str, row: dict) -> None:
        for name, column in self.splits[split].items():
            column.append(row[name])

    def reject(self, row: Row, reject: Reject) -> None:
        values = {"id": row.id, "source": row.source, "origin": row.origin, "reason": reject.reason,
                  "detail": reject.detail, "raw": row.raw}
        for name, column in self.quarantine.items():
            column.append(values[name])

    def rows(self, split: str) -> int:
        return len(self.splits[split]["id"])

    def write(self, out: Path, kind: str) -> tuple[int, int]:
        (out / kind).mkdir(parents=True, exist_ok=True)
        (out / "quarantine").mkdir(exist_ok=True)
        for split, columns in self.splits.items():
            pq.write_table(pa.table(columns, schema=self.schema), out / kind / f"{split}.parquet", compression="zstd")
        pq.write_table(pa.table(self.quarantine, schema=QUARANTINE_SCHEMA), out / "quarantine" / f"{kind}.parquet",
                       compression="zstd")
        return sum(self.rows(s) for s in SPLITS), len(self.quarantine["id"])


def _account(counts: Counts, tables: Tables, row: Row, result, size: int, val_ratio: float, to_row) -> bool:
    """Count `row` as read, then kept (its table row added to its split) or rejected (quarantined)."""
    counts.on_read(row.source, size)
    if isinstance(result, Reject):
        counts.on_rejected(row.source, result.reason, size)
        tables.reject(row, result)
        return False
    counts.on_kept(row.source, size)
    counts.stats["truncated"] += result.truncated
    tables.add("val" if is_val(row.id, val_ratio) else "train", {"id": row.id, **to_row(result)})
    return True


def _size(row: Row) -> int:
    if isinstance(row.value, Reject):
        return len(row.raw)
    if isinstance(row.value, Pair):
        return content_chars(row.value.prompt) + len(row.value.chosen) + len(row.value.rejected)
    return content_chars(row.value)


def build_sft(cfg: ChatDataConfig, ctx: StageContext, tok: Tokenizer) -> tuple[Tables, Counts, dict[str, list[Row]]]:
    """The SFT tables; also the valid conversations of each source that relevance pairs are built from."""
    tables, counts = Tables(SFT_SCHEMA), Counts()
    wanted = {p.from_ for p in cfg.preferences if p.type == "relevance"}
    valid: dict[str, list[Row]] = {name: [] for name in wanted}
    for src in cfg.sources:
        for row in read_conversations(src, ctx.root):
            result = row.value if isinstance(row.value, Reject) else encode_conversation(tok, row.value, cfg.max_tokens)
            if not isinstance(row.value, Reject) and src.name in valid:
                valid[src.name].append(row)
            kept = _account(counts, tables, row, result, _size(row), cfg.val_ratio,
                            lambda e: {"ids": e.ids, "mask": e.mask})
            counts.stats["tokens"] += len(result.ids) if kept else 0
            counts.stats["supervised_tokens"] += sum(result.mask) if kept else 0
    return tables, counts, valid


def _pair_rows(cfg: ChatDataConfig, ctx: StageContext, valid: dict[str, list[Row]]) -> Iterator[Row]:
    for src in cfg.preferences:
        if src.type == "relevance":
            yield from relevance_pairs(valid[src.from_], src.name, cfg.seed, cfg.val_ratio)
        else:
            yield from read_pairs(src, ctx.root)


def build_dpo(cfg: ChatDataConfig, ctx: StageContext, tok: Tokenizer, valid: dict[str, list[Row]]) -> tuple[Tables, Counts]:
    tables, counts = Tables(DPO_SCHEMA), Counts()
    for row in _pair_rows(cfg, ctx, valid):
        result = row.value if isinstance(row.value, Reject) else encode_pair(tok, row.value, cfg.max_tokens)
        _account(counts, tables, row, result, _size(row), cfg.val_ratio,
                 lambda e: {"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids})
    return tables, counts


# -- the stage ------------------------------------------------------------------------------------------

def run(cfg: ChatDataConfig, ctx: StageContext) -> dict[str, float]:
    tok = Tokenizer.load(ctx.input("tokenizer"))
    out = ctx.output("chat")
    remove_temp_leftovers(out)
    sft, sft_counts, valid = build_sft(cfg, ctx, tok)
    dpo, dpo_counts = build_dpo(cfg, ctx, tok, valid)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        sft_counts.check("chat_data (conversations)", written=sft.write(tmp, "sft"))
        dpo_counts.check("chat_data (preferences)", written=dpo.write(tmp, "dpo"))
        write_json_atomic(tmp / "meta.json", _meta(cfg, tok, sft, sft_counts, dpo, dpo_counts))
        write_report(ctx.name, Counts().merge(sft_counts).merge(dpo_counts), tmp, extra=_rows_table(sft, dpo))
    for artifact in ("report.md", *PLOTS, "meta.json"):
        ctx.tracker.log_artifact(out / artifact, f"{ctx.name}_report")
    metrics = _metrics(sft, sft_counts, dpo, dpo_counts)
    ctx.log.info("chat_data: %d of %d conversations kept (%d truncated), %d of %d preference pairs kept",
                 metrics["sft_records_kept"], metrics["sft_records_read"], metrics["sft_truncated"],
                 metrics["dpo_records_kept"], metrics["dpo_records_read"])
    if not sft.rows("val"):
        ctx.log.warning("chat_data: no conversation fell into the val split: raise chat_data.val_ratio or add data")
    return metrics


def _meta(cfg: ChatDataConfig, tok: Tokenizer, sft: Tables, sft_counts: Counts, dpo: Tables,
          dpo_counts: Counts) -> dict:
    """meta.json: what the tables are and how every record was accounted for. No timings: same bytes on rerun."""
    return {"format": CHAT_FORMAT, "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size,
            "special_ids": dict(tok.special_ids), "max_tokens": cfg.max_tokens, "val_ratio": cfg.val_ratio,
            "seed": cfg.seed,
            "rows": {f"{kind}/{split}": tables.rows(split) for kind, tables in (("sft", sft), ("dpo", dpo))
                     for split in SPLITS},
            "counts": {"sft": sft_counts.to_dict(), "dpo": dpo_counts.to_dict()},
            "reasons": {"sft": dict(sft_counts.reasons()), "dpo": dict(dpo_counts.reasons())}}


def _metrics(sft: Tables, sft_counts: Counts, dpo: Tables, dpo_counts: Counts) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for kind, tables, counts in (("sft", sft, sft_counts), ("dpo", dpo, dpo_counts)):
        metrics[f"{kind}_truncated"] = 0.0  # present even when nothing was kept
        metrics.update({f"{kind}_{k}": v for k, v in counts.metrics().items()})
        metrics.update({f"{kind}_{split}_rows": float(tables.rows(split)) for split in SPLITS})
    return metrics


def _rows_table(sft: Tables, dpo: Tables) -> str:
    rows = [f"| {kind} | {tables.rows('train'):,} | {tables.rows('val'):,} |" for kind, tables in
            (("sft conversations", sft), ("dpo pairs", dpo))]
    return "\n".join(["## Tables", "", "| table | train | val |", "|---|---:|---:|", *rows])
