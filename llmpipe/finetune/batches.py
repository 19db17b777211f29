"""Micro-batches for SFT and DPO from the tokenized chat data (data/chat/, written by `chat_data`).

Label convention as in pretraining: `targets[t]` is the token at t + 1, -100 where no loss is taken.
A conversation of n tokens becomes a row of n - 1 inputs (its last token, the closing end_of_turn,
predicts nothing) whose targets are the next token wherever that next token is one the model must
learn to produce (the `mask` chat_data wrote: assistant content and its end_of_turn), else -100.

Two ways to lay SFT conversations into (B, T) micro-batches (`mode`):

    bucket  one conversation per row, right padded to the longest row of the micro-batch. Rows are
            grouped by length inside a shuffled window, so a micro-batch pads little. Right padding
            needs no attention mask under a causal model: a real token only attends to positions at
            or before it, which are all real, so the padding after it cannot change its logits; the
            padding's own targets are -100, so it adds nothing to the loss. The window
            (`bucket_window` micro-batches) trades padding against variety: within it, who shares
            a micro-batch is decided by length, so a window as large as the data would group the
            same conversations together every epoch.
    pack    several whole conversations end to end in rows of up to seq_len (greedy first-fit in
            shuffled order; a conversation is never split across rows), with "segments" (B, T): 0 at
            padding, 1..n for the conversation. GPT.forward(segments=...) keeps attention causal and
            inside each conversation, so each one's logits are those it would get alone.

Exact resume and world-size-free batches, as in llmpipe/train/data.py: the work of an epoch is a
fixed list of micro-batches (a seeded permutation of the examples, then bucketing or packing, then
a seeded order), and global micro-batch g = (step * world_size + rank) * accum + m is the g-th of
the concatenated epochs. So `micro_batches(step)` is a pure function of (seed, step, micro, rank),
each epoch uses every example exactly once, and W ranks with accumulation A see what one process
with accumulation W * A sees.

torch, numpy and pyarrow only: this runs on a bare GPU node next to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch

from llmpipe.errors import UserError
from llmpipe.train.task import IGNORE

PAD_ID = 0  # any id works: padding is never attended to by real tokens and its targets are IGNORE
Mode = Literal["bucket", "pack"]
MODES = ("bucket", "pack")


@dataclass(frozen=True)
class SftExample:
    id: str
    ids: np.ndarray  # (n,) int64, the whole templated conversation
    mask: np.ndarray  # (n,) bool, True at tokens the model must learn to produce


@dataclass(frozen=True)
class TokenPair:
    id: str
    prompt_ids: np.ndarray  # (p,) int64, ends with the <|assistant|> id
    chosen_ids: np.ndarray  # (c,) int64, response content + end_of_turn
    rejected_ids: np.ndarray  # (r,) int64


# ---------------- reading data/chat ----------------
def _int_lists(table, column: str, path: Path) -> list[np.ndarray]:
    if column not in table.column_names:
        raise UserError(f"{path}: no column {column!r} (has {', '.join(table.column_names)}); "
                        f"it is not chat_data output: rerun `dvc repro chat_data`")
    lists = table.column(column).combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(lists))]


def _ids(table, path: Path) -> list[str]:
    if "id" not in table.column_names:
        raise UserError(f"{path}: no column 'id'; it is not chat_data output: rerun `dvc repro chat_data`")
    return [str(x) for x in table.column("id").to_pylist()]


def read_sft_examples(path: str | Path) -> list[SftExample]:
    """data/chat/sft/{train,val}.parquet (id, ids list<int32>, mask list<bool>) -> examples."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SFT data {path} not found: run `dvc repro chat_data` first")
    table = pq.read_table(path)
    ids = _int_lists(table, "ids", path)
    masks = _int_lists(table, "mask", path)
    examples = []
    for rid, tokens, mask in zip(_ids(table, path), ids, masks):
        if len(tokens) != len(mask):
            raise UserError(f"{path}: record {rid!r} has {len(tokens)} ids but {len(mask)} mask values; "
                            f"rerun `dvc repro chat_data`")
        examples.append(SftExample(rid, tokens.astype(np.int64), mask.astype(bool)))
    return examples


def read_pairs(path: str | Path) -> list[TokenPair]:
    """data/chat/dpo/{train,val}.parquet (id, prompt_ids, chosen_ids, rejected_ids) -> pairs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preference data {path} not found: run `dvc repro chat_data` first")
    table = pq.read_table(path)
    columns = [_int_lists(table, c, path) for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
    return [TokenPair(rid, p.astype(np.int64), c.astype(np.int64), r.astype(np.int64))
            for rid, p, c, r in zip(_ids(table, path), *columns)]


# ---------------- rows ----------------
def shift_targets(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """targets[t] = labels[t + 1] where mask[t + 1], else IGNORE: (n,) -> (n - 1,) int64.

    Only masked positions read `labels`: whatever a user or system token holds cannot reach the loss."""
    return np.where(mask[1:], labels[1:], IGNORE).astype(np.int64)


def _check_sft(examples: list[SftExample], seq_len: int, name: str) -> np.ndarray:
    """Row lengths (n - 1 each); refuses examples that cannot train."""
    if not examples:
        raise UserError(f"{name}: no conversations; check the chat_data report (data/chat/meta.json) for rejects")
    lengths = np.array([len(e.ids) - 1 for e in examples], dtype=np.int64)
    for e, n in zip(examples, lengths):
        if n > seq_len:
            raise UserError(f"{name}: conversation {e.id!r} has {n + 1} tokens, more than seq_len + 1 = "
                            f"{seq_len + 1}; set chat_data's max_tokens to at most seq_len + 1 and rerun it")
        if n < 1 or not e.mask[1:].any():
            raise UserError(f"{name}: conversation {e.id!r} has no assistant token to learn; "
                            f"rerun `dvc repro chat_data` (it keeps only conversations that end with an answer)")
    return lengths


def collate_sft(examples: list[SftExample], rows: list[list[int]], packed: bool) -> dict[str, torch.Tensor]:
    """rows: example indices per row (one each unless packed) -> {"idx", "targets"[, "segments"]} (B, T),
    right padded to the longest row."""
    T = max(sum(len(examples[i].ids) - 1 for i in row) for row in rows)
    idx = np.full((len(rows), T), PAD_ID, dtype=np.int64)
    targets = np.full((len(rows), T), IGNORE, dtype=np.int64)
    segments = np.zeros((len(rows), T), dtype=np.int64)
    for b, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row, start=1):
            e = examples[i]
            n = len(e.ids) - 1
            idx[b, at:at + n] = e.ids[:-1]
            targets[b, at:at + n] = shift_targets(e.ids, e.mask)
            segments[b, at:at + n] = s
            at += n
    batch = {"idx": torch.from_numpy(idx), "targets": torch.from_numpy(targets)}
    if packed:
        batch["segments"] = torch.from_numpy(segments)
    return batch


def first_fit(order: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Greedy first-fit of examples (in `order`) into rows of seq_len: each goes into the first row
    with room, else a new row. Whole conversations only, so none is ever split."""
    rows: list[list[int]] = []
    room = np.empty(len(order), dtype=np.int64)  # room[r] = free tokens in row r; at most one row per example
    for i in order:
        fits = np.flatnonzero(room[:len(rows)] >= lengths[i])
        if len(fits):
            r = int(fits[0])
        else:
            r = len(rows)
            rows.append([])
            room[r] = seq_len
        rows[r].append(int(i))
        room[r] -= lengths[i]
    return rows


def length_buckets(order: np.ndarray, lengths: np.ndarray, micro_batch: int, window: int) -> list[list[int]]:
    """Micro-batches of `micro_batch` examples of similar length: `order` is cut into windows of
    window * micro_batch examples, each sorted by length (stable) and cut into micro-batches."""
    size = window * micro_batch
    batches = []
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[j:j + micro_batch].tolist() for j in range(0, len(chunk), micro_batch))
    return batches


# ---------------- the epoch schedule shared by SFT and DPO ----------------
class _Epochs:
    """Global micro-batch g -> its work, over epochs whose micro-batch lists `plan(epoch)` builds.

    Epoch lengths may differ (packing gives a different number of rows each epoch), so the epochs
    before g's are planned once to count them; the last two plans are kept."""

    def __init__(self, plan):
        self._plan = plan
        self._ends: list[int] = []  # cumulative micro-batch counts of epochs 0..e
        self._cache: dict[int, list] = {}

    def plan(self, epoch: int) -> list:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = self._plan(epoch)
        return self._cache[epoch]

    def locate(self, g: int) -> tuple[int, int]:
        """(epoch, index inside that epoch's plan) of global micro-batch g."""
        while not self._ends or self._ends[-1] <= g:
            self._ends.append((self._ends[-1] if self._ends else 0) + len(self.plan(len(self._ends))))
        epoch = int(np.searchsorted(self._ends, g, side="right"))
        return epoch, g - (self._ends[epoch - 1] if epoch else 0)

    def work(self, g: int):
        epoch, j = self.locate(g)
        return self.plan(epoch)[j]


class _Source:
    """What SftBatches and DpoBatches share: the schedule from (seed, step, micro, rank) to work."""

    def __init__(self, num_examples: int, micro_batch: int, accum: int, seed: int, rank: int, world_size: int):
        if micro_batch < 1 or accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"batches: need micro_batch >= 1, accum >= 1 and 0 <= rank < world_size, got "
                            f"micro_batch={micro_batch}, accum={accum}, rank={rank}, world_size={world_size}")
        self.num_examples = num_examples
        self.micro_batch, self.accum, self.seed, self.rank, self.world_size = micro_batch, accum, seed, rank, world_size
        self._epochs = _Epochs(self._plan)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def _shuffled(self, epoch: int, work: list) -> list:
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(work))
        return [work[i] for i in order]

    def _plan(self, epoch: int) -> list:
        raise NotImplementedError

    def _collate(self, work) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def global_micro(self, step: int, micro: int) -> int:
        """The world-size-free index of this rank's micro-batch `micro` at `step`."""
        return (step * self.world_size + self.rank) * self.accum + micro

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The `accum` micro-batches this rank runs at optimizer step `step`."""
        return [self._collate(self._epochs.work(self.global_micro(step, m))) for m in range(self.accum)]

    def epoch_of(self, step: int) -> int:
        """The epoch this rank's first micro-batch of `step` comes from (for logging)."""
        return self._epochs.locate(self.global_micro(step, 0))[0]

    def steps_per_epoch(self, epoch: int = 0) -> float:
        """Optimizer steps that `epoch` lasts (its micro-batches over accum x world_size)."""
        return len(self._epochs.plan(epoch)) / (self.accum * self.world_size)

    @staticmethod
    def tokens(batch: dict[str, torch.Tensor]) -> int:
        """Supervised tokens in a micro-batch: the targets the loss averages over."""
        return int((batch["targets"] != IGNORE).sum())


class SftBatches(_Source):
    """SFT micro-batches (see the module docstring for the two modes)."""

    def __init__(self, examples: list[SftExample], micro_batch: int, seq_len: int, accum: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1, mode: Mode = "bucket", bucket_window: int = 32):
        if mode not in MODES:
            raise UserError(f"sft batching mode {mode!r} is not one of {', '.join(MODES)}")
        self.examples, self.seq_len, self.mode, self.bucket_window = examples, seq_len, mode, bucket_window
        self.lengths = _check_sft(examples, seq_len, "sft train")
        super().__init__(len(examples), micro_batch, accum, seed, rank, world_size)

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        order = self._permutation(epoch)
        if self.mode == "pack":
            rows = self._shuffled(epoch, first_fit(order, self.lengths, self.seq_len))
            return [rows[j:j + self.micro_batch] for j in range(0, len(rows), self.micro_batch)]
        buckets = length_buckets(order, self.lengths, self.micro_batch, self.bucket_window)
        return [[[i] for i in batch] for batch in self._shuffled(epoch, buckets)]

    def _collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        return collate_sft(self.examples, rows, self.mode == "pack")


def _share(batches: list, num_batches: int | None, rank: int, world_size: int, name: str) -> list:
    """Evenly spaced `num_batches` of a fixed list (all by default), this rank's share rank::world_size.
    Every rank must evaluate the same number of batches (collectives), so the count is cut to a multiple."""
    n = len(batches) if num_batches is None else min(num_batches, len(batches))
    n -= n % world_size
    if n == 0:
        raise UserError(f"{name}: {len(batches)} validation micro-batches cannot be shared by {world_size} "
                        f"processes; hold out more data (val_ratio) or use a smaller micro_batch")
    picked = [batches[j * len(batches) // n] for j in range(n)]
    return picked[rank::world_size]


def sft_val_batches(examples: list[SftExample], micro_batch: int, seq_len: int, mode: Mode = "bucket",
                    num_batches: int | None = None, rank: int = 0, world_size: int = 1) -> list[dict]:
    """A fixed list of validation micro-batches (no shuffling: the same every eval and every run)."""
    if mode not in MODES:
        raise UserError(f"sft batching mode {mode!r} is not one of {', '.join(MODES)}")
    lengths = _check_sft(examples, seq_len, "sft val")
    order = np.argsort(lengths, kind="stable")  # shortest first: bucketing over the whole split
    if mode == "pack":
        rows = first_fit(order[::-1], lengths, seq_len)  # longest first packs tightest (first-fit decreasing)
        work = [rows[j:j + micro_batch] for j in range(0, len(rows), micro_batch)]
    else:
        work = [[[int(i)] for i in order[j:j + micro_batch]] for j in range(0, len(order), micro_batch)]
    return [collate_sft(examples, w, mode == "pack") for w in _share(work, num_batches, rank, world_size, "sft val")]


# ---------------- DPO ----------------
def _check_pairs(pairs: list[TokenPair], seq_len: int, name: str) -> None:
    if not pairs:
        raise UserError(f"{name}: no preference pairs; check the chat_data report (data/chat/meta.json) for rejects")
    for p in pairs:
        longest = len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) - 1
        if longest > seq_len or not len(p.chosen_ids) or not len(p.rejected_ids) or not len(p.prompt_ids):
            raise UserError(f"{name}: pair {p.id!r} needs a non-empty prompt and responses of at most "
                            f"seq_len + 1 = {seq_len + 1} tokens with the prompt (has {longest + 1}); "
                            f"set chat_data's max_tokens to at most seq_len + 1 and rerun it")


def collate_dpo(pairs: list[TokenPair], index: list[int], ref_logp: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Pairs `index` (B) -> {"idx", "targets"} (2B, T): rows 0..B-1 prompt + chosen, B..2B-1 prompt +
    rejected, targets IGNORE outside the response, right padded; "ref_logp" (2B,) when cached."""
    seqs = [(pairs[i].prompt_ids, pairs[i].chosen_ids) for i in index]
    seqs += [(pairs[i].prompt_ids, pairs[i].rejected_ids) for i in index]
    T = max(len(p) + len(r) - 1 for p, r in seqs)
    idx = np.full((len(seqs), T), PAD_ID, dtype=np.int64)
    targets = np.full((len(seqs), T), IGNORE, dtype=np.int64)
    for b, (prompt, response) in enumerate(seqs):
        full = np.concatenate([prompt, response])
        mask = np.arange(len(full)) >= len(prompt)
        idx[b, :len(full) - 1] = full[:-1]
        targets[b, :len(full) - 1] = shift_targets(full, mask)
    batch = {"idx": torch.from_numpy(idx), "targets": torch.from_numpy(targets)}
    if ref_logp is not None:
        batch["ref_logp"] = torch.from_numpy(np.concatenate([ref_logp[index, 0], ref_logp[index, 1]]).astype(np.float32))
    return batch


def _check_ref(ref_logp: np.ndarray | None, n: int) -> np.ndarray | None:
    if ref_logp is None:
        return None
    ref_logp = np.asarray(ref_logp, dtype=np.float64)
    if ref_logp.shape != (n, 2):
        raise UserError(f"cached reference log-probs have shape {ref_logp.shape}, need ({n}, 2) (chosen, rejected "
                        f"per pair); recompute them with dpo_reference_batches over these pairs")
    return ref_logp


class DpoBatches(_Source):
    """DPO micro-batches of `micro_batch` pairs (2 x micro_batch rows). `ref_logp` (num pairs, 2):
    the reference model's summed response log-probs (chosen, rejected) per pair, when cached."""

    def __init__(self, pairs: list[TokenPair], micro_batch: int, seq_len: int, accum: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1, ref_logp: np.ndarray | None = None):
        _check_pairs(pairs, seq_len, "dpo train")
        self.pairs, self.seq_len, self.ref_logp = pairs, seq_len, _check_ref(ref_logp, len(pairs))
        super().__init__(len(pairs), micro_batch, accum, seed, rank, world_size)

    def _plan(self, epoch: int) -> list[list[int]]:
        order = self._permutation(epoch).tolist()
        return [order[j:j + self.micro_batch] for j in range(0, len(order), self.micro_batch)]

    def _collate(self, index: list[int]) -> dict[str, torch.Tensor]:
        return collate_dpo(self.pairs, index, self.ref_logp)


def dpo_reference_batches(pairs: list[TokenPair], micro_batch: int, seq_len: int) -> list[tuple[np.ndarray, dict]]:
    """Every pair once, in order, as (pair indices (B,), batch): run the reference model over these and
    fill ref_logp[indices] = (chosen, rejected) to cache the reference log-probs."""
    _check_pairs(pairs, seq_len, "dpo reference")
    starts = range(0, len(pairs), micro_batch)
    return [(np.arange(s, min(s + micro_batch, len(pairs))),
             collate_dpo(pairs, list(range(s, min(s + micro_batch, len(pairs)))))) for s in starts]


def dpo_val_batches(pairs: list[TokenPair], micro_batch: int, seq_len: int, num_batches: int | None = None,
                    rank: int = 0, world_size: int = 1, ref_logp: np.ndarray | None = None) -> list[dict]:
    """A fixed list of validation DPO micro-batches, pairs in file order."""
    _check_pairs(pairs, seq_len, "dpo val")
    ref_logp = _check_ref(ref_logp, len(pairs))
    work = [list(range(s, min(s + micro_batch, len(pairs)))) for s in range(0, len(pairs), micro_batch)]
    return [collate_dpo(pairs, w, ref_logp) for w in _share(work, num_batches, rank, world_size, "dpo val")]
