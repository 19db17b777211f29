"""Decontamination: which eval documents share a word n-gram with the training data.

An eval item that the model saw in training measures memory, not skill. Following GPT-3 (Brown et
al. 2020, "Language Models are Few-Shot Learners", section 4 and appendix C: 13-gram overlap after
lowercasing and ignoring punctuation), a document is contaminated when any of its word 13-grams
also occurs in a training text. The training texts (`training_texts`) are the pretraining documents
of the train token split and the train split of the fine-tuning data, since the SFT and DPO models
saw those too.

Normalization (`words`): case folded, every character that is not a letter, digit or whitespace
turned into a space, whitespace collapsed. Lowercasing and ignoring punctuation are GPT-3's rule;
punctuation becomes a space rather than being deleted (lm-eval's Janitor deletes it) so that
"well-known" matches "well known" and "end.Next" (a lost space) matches "end. Next".

Index: each word gets a 64-bit xxh3 hash; an n-gram's hash is a polynomial in its words' hashes
mod 2^64, computed for all n-grams of a document at once with numpy. Two distinct n-grams collide
with probability about 2^-64, so false hits are negligible. The hashes are kept as one sorted,
deduplicated uint64 array (8 bytes per n-gram, looked up with searchsorted): on the demo corpus (15 MB
of training text, 2.2M distinct 13-grams, indexed in about 4 s of CPU) that is 17 MiB, where a Python
set of the same ints takes 138 MiB.

Texts shorter than n words have no n-gram. GPT-3 skipped them (they could never be flagged); here
such a text is one gram of all its words, on both sides, so a short eval item is contaminated
exactly when a training text normalizes to the same words (a short chat reply seen in training),
and can never match part of a longer text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from llmpipe.errors import UserError

if TYPE_CHECKING:
    from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer

NGRAM = 13  # GPT-3's n
MODES = ("exclude", "flag")

_NOT_WORD = re.compile(r"[^\w\s]|_")  # punctuation and symbols, in any script
# Polynomial base: odd, so multiplying by it is a bijection mod 2^64 (no gram hash loses bits).
_BASE = np.uint64(0x9E3779B97F4A7C17)
_COMPACT_MIN = 1 << 22  # hashes buffered before merging into the sorted array (32 MiB)


def words(text: str) -> list[str]:
    """The normalized words of `text`: case folded, punctuation turned into spaces, split on whitespace."""
    return _NOT_WORD.sub(" ", text.casefold()).split()


def ngram_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    """uint64 hashes of the normalized word n-grams of `text`, in order (one gram of all the words when
    there are fewer than n; none for a text without words)."""
    ws = words(text)
    if not ws:
        return np.empty(0, np.uint64)
    size = min(n, len(ws))
    # normalization removed lone surrogates (not word characters), so every word encodes
    h = np.fromiter((xxhash.xxh3_64_intdigest(w.encode()) for w in ws), np.uint64, count=len(ws))
    m = len(ws) - size + 1
    # The gram length seeds the hash, so a short text's one gram never equals an n-gram by construction.
    grams = np.full(m, xxhash.xxh3_64_intdigest(b"llmpipe-ngram-%d" % size), np.uint64)
    for j in range(size):  # grams[i] = seed * B^size + sum_j h[i+j] * B^(size-1-j)  (mod 2^64)
        grams = grams * _BASE + h[j:j + m]
    return grams


class NgramIndex:
    """The set of normalized word n-grams of the texts added (64-bit hashes, sorted uint64 array)."""

    def __init__(self, n: int = NGRAM):
        if n < 1:
            raise UserError(f"n-gram size must be at least 1, got {n}")
        self.n = n
        self.texts = 0  # texts added
        self._sorted = np.empty(0, np.uint64)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    @classmethod
    def build(cls, texts: Iterable[str], n: int = NGRAM) -> NgramIndex:
        index = cls(n)
        for text in texts:
            index.add(text)
        return index

    def add(self, text: str) -> None:
        grams = ngram_hashes(text, self.n)
        self.texts += 1
        if grams.size:
            self._pending.append(grams)
            self._pending_size += grams.size
            # Merge when the buffer is as big as the array: bounded memory, amortized linear-log time.
            if self._pending_size >= max(_COMPACT_MIN, self._sorted.size):
                self._compact()

    def _compact(self) -> np.ndarray:
        if self._pending:
            self._sorted = np.unique(np.concatenate([self._sorted, *self._pending]))
            self._pending, self._pending_size = [], 0
        return self._sorted

    def __len__(self) -> int:
        """Distinct n-grams held."""
        return int(self._compact().size)

    @property
    def nbytes(self) -> int:
        return int(self._compact().nbytes)

    def found(self, text: str) -> np.ndarray:
        """bool per n-gram of `text` (in order): whether the index holds it."""
        table, grams = self._compact(), ngram_hashes(text, self.n)
        if not table.size or not grams.size:
            return np.zeros(grams.size, bool)
        at = np.searchsorted(table, grams).clip(max=table.size - 1)
        return table[at] == grams

    def contaminated(self, text: str) -> bool:
        """Whether `text` shares any n-gram with the index."""
        return bool(self.found(text).any())

    def overlap(self, text: str) -> float:
        """Share of `text`'s n-grams the index holds (0.0 for a text without words)."""
        hits = self.found(text)
        return float(hits.mean()) if hits.size else 0.0


def find_contaminated(docs: list[str], index: NgramIndex) -> list[int]:
    """Positions of the contaminated documents in `docs`."""
    return [k for k, doc in enumerate(docs) if index.contaminated(doc)]


def decontaminate(task_docs: dict[str, list[str]], index: NgramIndex, mode: str = "exclude",
                  ) -> tuple[dict[str, list[int]], dict[str, dict[str, float]]]:
    """Check every task's documents against `index`.

    Returns the positions of the documents to keep per task (all of them with mode "flag", the
    clean ones with "exclude") and a report per task: docs, contaminated, fraction (contaminated /
    docs), excluded, and n (the n-gram size it was checked with)."""
    if mode not in MODES:
        raise UserError(f"decontamination mode must be one of {', '.join(MODES)}, got {mode!r}")
    kept: dict[str, list[int]] = {}
    report: dict[str, dict[str, float]] = {}
    for task, docs in task_docs.items():
        dirty = set(find_contaminated(docs, index))
        excluded = dirty if mode == "exclude" else set()
        kept[task] = [k for k in range(len(docs)) if k not in excluded]
        report[task] = {"docs": len(docs), "contaminated": len(dirty),
                        "fraction": len(dirty) / len(docs) if docs else 0.0, "excluded": len(excluded),
                        "n": index.n}
    return kept, report


# -- the training data ----------------------------------------------------------------------------

def training_texts(root: Path, tokens: Path | str = "data/tokens", chat: Path | str | None = "data/chat",
                   tokenizer: Path | str = "models/tokenizer") -> Iterator[str]:
    """Every text the models trained on: the documents of the train token split, decoded (exactly
    what pretraining saw, whatever split rule made it; the val split is never read), then the train
    split of the chat data (`finetuning_texts`). Paths are relative to `root` (or absolute: pass a
    stage's `ctx.input(role)`); `chat=None` leaves the fine-tuning data out."""
    from llmpipe.evaluate.heldout import split_documents
    from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer  # sentencepiece only when needed

    root = Path(root)
    tok = Tokenizer.load(root / tokenizer)
    yield from split_documents(root / tokens / "train", tok)
    if chat is not None:
        yield from finetuning_texts(root / chat, tok)


def finetuning_texts(chat_dir: Path, tok: Tokenizer) -> Iterator[str]:
    """The train split of the chat data as text: each SFT conversation, and each DPO prompt followed by
    its chosen and, separately, its rejected reply (the DPO model saw both)."""
    from llmpipe.io import iter_parquet_batches

    specials = set(tok.special_ids.values())
    sft, dpo = chat_dir / "sft" / "train.parquet", chat_dir / "dpo" / "train.parquet"
    for file in (sft, dpo):
        if not file.exists():
            raise UserError(f"{file} not found: run the chat_data stage (dvc repro chat_data), or leave the "
                             "fine-tuning data out of decontamination")
    for batch in iter_parquet_batches(sft, columns=["ids"]):
        yield from (_decode_turns(tok, ids, specials) for ids in batch.column(0).to_pylist())
    for batch in iter_parquet_batches(dpo, columns=["prompt_ids", "chosen_ids", "rejected_ids"]):
        for prompt, chosen, rejected in zip(*(column.to_pylist() for column in batch.columns)):
            yield _decode_turns(tok, prompt + chosen, specials)
            yield _decode_turns(tok, prompt + rejected, specials)


def _decode_turns(tok: Tokenizer, ids: list[int], specials: set[int]) -> str:
    """Token ids -> text with a line break at every special token (role and end-of-turn markers decode
    to nothing, and the last word of one message must not merge with the first of the next)."""
    runs: list[list[int]] = [[]]
    for i in ids:
        if i in specials:
            runs.append([])
        else:
            runs[-1].append(i)
    return "\n".join(tok.decode(run) for run in runs if run)
