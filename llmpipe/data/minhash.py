"""Vectorized MinHash and LSH banding with numpy: the engine behind the dedup stage.

The text dedup compares, `dedup_key_text` (shared by exact and near-duplicate detection), is made in
this order:
  1. Unicode NFKC (full-width letters, ligatures and compatibility forms fold to their plain form),
  2. lowercase,
  3. every punctuation, symbol, control, format or separator character (Unicode categories P*, S*,
     Cc, Cf, Z*) becomes a space,
  4. runs of whitespace collapse to one space; leading/trailing whitespace is dropped.
  So "Hello,  World!" and "hello world" have the same key text "hello world".

Shingles are word n-grams of the normalized text (`shingle_size` words): robust to re-wrapping and
punctuation changes, and one shingle per word keeps signatures cheap (character n-grams would make
~5x more). The default, 3 words, comes from benchmarks/data_stages.py on the demo corpus: a copy with
10% of its words edited keeps a 3-gram Jaccard of ~0.6 (5-grams: ~0.4) while distinct chunks stay
under ~0.03, so a threshold of 0.45 with 42 bands x 3 rows separates them. A text with fewer words
than `shingle_size` is one shingle; an empty normalized text has none (it can only be an exact
duplicate, never a near duplicate).

Hashing, all numpy, a batch of texts at a time (no Python loop per shingle):
  - the batch's normalized texts are joined with "\\n" into one byte buffer; every shingle is a byte
    span of it, hashed with a polynomial hash mod 2^64 computed from prefix sums (O(1) per span),
    then finalized with murmur3's fmix64 and cut to 32 bits: x (n_shingles,) uint32;
  - permutation k is h_k(x) = (a_k * x + b_k) mod 2^32 with a_k odd: a bijection of 32-bit values,
    computed for all permutations at once by broadcasting (num_perm, n_shingles) in uint32, which is
    native wrap-around arithmetic (several times faster than uint64 `% p` with a prime p). Because x
    is already a strong hash of the shingle, each h_k(x) is uniform over 32-bit values, so
    P[min h_k(A) == min h_k(B)] = Jaccard(A, B) up to 2^-32 collisions (tests check the estimate
    against the true Jaccard and against datasketch);
  - signature[k] = min over the text's shingles of h_k: a segmented min (`np.minimum.reduceat`).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import xxhash

U64 = np.uint64
EMPTY = np.uint32(0xFFFFFFFF)  # signature value of a text without shingles
_BASE = 0x100000001B3  # odd, so invertible mod 2^64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_BLOCK = 4096  # shingles per broadcast block: (num_perm, _BLOCK) uint32 stays in cache


class _SeparatorMap(dict):
    """str.translate table: code point -> " " for separators, itself otherwise, filled in lazily
    (the characters a corpus uses, instead of classifying all 1.1M code points up front)."""

    def __missing__(self, cp: int) -> str:
        char = chr(cp)
        self[cp] = " " if unicodedata.category(char).startswith(("P", "S", "Cc", "Cf", "Z")) else char
        return self[cp]


_SEPARATORS = _SeparatorMap()


def dedup_key_text(text: str) -> str:
    """The text dedup compares: its exact hash and its shingles are taken from this form (see the
    module docstring). Not clean's `llmpipe.data.normalize.normalize_text`, which keeps case,
    punctuation and line breaks: this one folds all of them away."""
    return " ".join(_separators_to_spaces(text).split())


def _separators_to_spaces(text: str) -> str:
    """Steps 1-3 of the normalization: afterwards the only whitespace left is " " (str.split's
    whitespace characters all are Cc or Z*)."""
    return unicodedata.normalize("NFKC", text).lower().translate(_SEPARATORS)


def normalized_buffer(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The normalized texts joined by "\n", as UTF-8 bytes, and where each one starts.

    Same bytes as "\n".join(map(dedup_key_text, texts)).encode(), but the whitespace collapse runs
    in numpy over the whole batch instead of a str.split per text. Returns (buf (B,) uint8,
    bounds (T + 1,) int64): text t is buf[bounds[t]:bounds[t + 1] - 1] (minus its "\n").
    """
    if not texts:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64)
    raw = np.frombuffer("\n".join(map(_separators_to_spaces, texts)).encode("utf-8", "surrogatepass"), np.uint8)
    space = raw == 32
    word = ~space & (raw != 10)
    # Of each run of spaces keep only the first, and only between two word bytes of the same text
    # (not next to "\n" or the ends): one space between words, none at a text's ends.
    edge = np.concatenate([[False], space, [False]])
    run_start = np.flatnonzero(space & ~edge[:-2])  # (R,) first space of each run
    run_end = np.flatnonzero(space & ~edge[2:])  # (R,) last space of the same run
    padded_word = np.concatenate([[False], word, [False]])
    between_words = padded_word[run_start] & padded_word[run_end + 2]  # bytes before and after the run
    keep = ~space
    keep[run_start[between_words]] = True
    buf = raw[keep]
    bounds = np.concatenate([[0], np.flatnonzero(buf == 10) + 1, [len(buf) + 1]])
    return buf, bounds


def exact_hashes(buf: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """128-bit xxh3 of each normalized text in a `normalized_buffer`: (T, 2) uint64 (high, low)."""
    data = buf.tobytes()
    out = np.empty((len(bounds) - 1, 2), dtype=U64)
    for t, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        out[t] = divmod(xxhash.xxh3_128_intdigest(data[lo:hi - 1]), 1 << 64)
    return out


def fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finalizer (avalanche), in place on a uint64 array."""
    h ^= h >> U64(33)
    h *= U64(0xFF51AFD7ED558CCD)
    h ^= h >> U64(33)
    h *= U64(0xC4CEB9FE1A85EC53)
    h ^= h >> U64(33)
    return h


@lru_cache(maxsize=4)
def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B^t, B^-t) mod 2^64 for t < n (uint64 multiplication wraps, which is the mod)."""
    base = np.full(n, _BASE, dtype=U64)
    inv = np.full(n, _BASE_INV, dtype=U64)
    base[0] = inv[0] = 1
    return np.cumprod(base), np.cumprod(inv)


def shingle_hashes(buf: np.ndarray, n_texts: int, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every word n-gram of every text in a `normalized_buffer`:
    (hashes (S,) uint32, text index (S,) int64), grouped by text, texts in order; a text without
    words contributes none."""
    n = len(buf)
    if n == 0:
        return np.zeros(0, np.uint32), np.zeros(0, np.int64)
    is_sep = (buf == 32) | (buf == 10)
    word = ~is_sep
    starts = np.flatnonzero(word & np.concatenate([[True], is_sep[:-1]]))  # (W,) first byte of each word
    ends = np.flatnonzero(word & np.concatenate([is_sep[1:], [True]])) + 1  # (W,) one past its last byte
    text_of_word = np.cumsum(buf == 10, dtype=np.int32)[starts]  # newlines before the word
    n_words = np.bincount(text_of_word, minlength=n_texts)  # (T,)
    first = np.cumsum(n_words) - n_words  # (T,) index of each text's first word
    i = np.arange(len(starts))
    offset = i - first[text_of_word]
    keep = offset <= np.maximum(n_words[text_of_word] - shingle_size, 0)  # one shingle per start position
    i, texts = i[keep], text_of_word[keep]
    last_word = np.minimum(i + shingle_size - 1, first[texts] + n_words[texts] - 1)
    s, e = starts[i], ends[last_word]  # shingle = bytes [s, e) of buf, single spaces between words

    # hash(s, e) = sum_{t=s}^{e-1} c_t B^(e-1-t) = B^(e-1) * (P[e] - P[s]), P[k] = sum_{t<k} c_t B^-t
    pow_base, pow_inv = _powers(1 << max(int(n).bit_length(), 16))
    prefix = np.empty(n + 1, dtype=U64)
    prefix[0] = 0
    np.multiply(buf, pow_inv[:n], out=prefix[1:])  # uint8 * uint64 -> uint64, no separate cast
    np.cumsum(prefix[1:], out=prefix[1:])
    h = (prefix[e] - prefix[s]) * pow_base[e - 1] + (e - s).astype(U64) * U64(0x9E3779B97F4A7C15)
    return (fmix64(h) >> U64(32)).astype(np.uint32), texts


def make_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (num_perm,) uint32, a odd: h_k(x) = a_k * x + b_k mod 2^32 is a bijection."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def signatures_from_hashes(x: np.ndarray, text_of: np.ndarray, n_texts: int, a: np.ndarray,
                           b: np.ndarray) -> np.ndarray:
    """MinHash signatures (n_texts, num_perm) uint32 from shingle hashes grouped by text."""
    num_perm = len(a)
    sig = np.full((num_perm, n_texts), EMPTY, dtype=np.uint32)  # (P, T): min along the contiguous axis
    work = np.empty((num_perm, _BLOCK), dtype=np.uint32)
    for lo in range(0, len(x), _BLOCK):
        xb, tb = x[lo:lo + _BLOCK], text_of[lo:lo + _BLOCK]
        h = work[:, :len(xb)]
        np.multiply(a[:, None], xb[None, :], out=h)  # (P, block), wraps mod 2^32
        np.add(h, b[:, None], out=h)
        seg = np.flatnonzero(np.concatenate([[True], tb[1:] != tb[:-1]]))  # first shingle of each text
        texts = tb[seg]  # distinct, ascending
        sig[:, texts] = np.minimum(sig[:, texts], np.minimum.reduceat(h, seg, axis=1))
    return np.ascontiguousarray(sig.T)


@dataclass(frozen=True)
class MinHasher:
    """Signatures of texts: `num_perm` 32-bit min-hashes of their word `shingle_size`-grams."""

    num_perm: int = 126
    shingle_size: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        a, b = make_permutations(self.num_perm, self.seed)
        object.__setattr__(self, "_perm", (a, b))

    def sketch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalize and hash raw texts: (exact hashes (T, 2) uint64, has words (T,) bool,
        signatures (T, num_perm) uint32, all EMPTY for a text without words)."""
        buf, bounds = normalized_buffer(texts)
        x, text_of = shingle_hashes(buf, len(texts), self.shingle_size)
        sig = signatures_from_hashes(x, text_of, len(texts), *self._perm)
        return exact_hashes(buf, bounds), np.diff(bounds) > 1, sig

    def signatures(self, texts: list[str]) -> np.ndarray:
        return self.sketch(texts)[2]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature slots, row by row: (n, P), (n, P) -> (n,) float."""
    return (sig_a == sig_b).mean(axis=-1)


def band_key(sig: np.ndarray, band: int, rows: int, subset: np.ndarray | None = None) -> np.ndarray:
    """Hash of signature slots [band * rows, (band + 1) * rows) of each row of `sig` (or of the rows
    `subset`): (n,) uint64. Two texts share an LSH bucket in this band iff their keys are equal
    (up to 2^-64 collisions, which verification removes)."""
    rows_idx = slice(None) if subset is None else subset
    h = np.full(len(sig) if subset is None else len(subset), band, dtype=U64)
    for k in range(band * rows, (band + 1) * rows):
        h = fmix64(h ^ sig[rows_idx, k].astype(U64))
    return h


def bucket_pairs(keys: np.ndarray, tiebreak: np.ndarray | None = None, max_all_pairs: int = 64) -> np.ndarray:
    """Pairs (i, j), i < j, with equal keys (one LSH band): (n_pairs, 2) int64, unique.

    Buckets come from sorting the keys, not from a dict. A bucket of m <= max_all_pairs members
    yields all m(m-1)/2 pairs; a larger one (thousands of near-identical boilerplate texts) yields
    each member paired with the bucket's first and with its neighbour in `tiebreak` order (default:
    index order), O(m) instead of O(m^2), which union-find still joins into one cluster.
    """
    n = len(keys)
    order = np.lexsort((np.arange(n) if tiebreak is None else tiebreak, keys))
    starts = np.flatnonzero(first_of_runs(keys[order]))
    sizes = np.diff(np.append(starts, n))
    found = [np.zeros((0, 2), dtype=np.int64)]
    for m in np.unique(sizes[sizes > 1]).tolist():
        run_starts = starts[sizes == m][:, None]  # (R, 1): buckets with m members
        if m <= max_all_pairs:
            ii, jj = np.triu_indices(m, 1)
            left, right = run_starts + ii, run_starts + jj  # (R, m(m-1)/2)
        else:
            member = run_starts + np.arange(1, m)  # (R, m-1)
            left = np.concatenate([np.broadcast_to(run_starts, member.shape), member[:, :-1]], axis=1)
            right = np.concatenate([member, member[:, 1:]], axis=1)
        found.append(np.stack([order[left.ravel()], order[right.ravel()]], axis=1))
    pairs = np.sort(np.concatenate(found), axis=1)
    return np.unique(pairs, axis=0)


def first_of_runs(sorted_values: np.ndarray) -> np.ndarray:
    """(n,) bool: True where a run of equal values (rows, for 2-D) starts in a sorted array."""
    first = np.ones(len(sorted_values), dtype=bool)
    diff = sorted_values[1:] != sorted_values[:-1]
    first[1:] = diff.any(axis=1) if diff.ndim > 1 else diff
    return first


def verified_pairs(sig: np.ndarray, pairs: np.ndarray, threshold: float,
                   chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Keep the candidate pairs whose estimated Jaccard reaches `threshold`: (pairs, their estimates)."""
    estimates = np.empty(len(pairs))
    for lo in range(0, len(pairs), chunk):
        p = pairs[lo:lo + chunk]
        estimates[lo:lo + chunk] = estimated_jaccard(sig[p[:, 0]], sig[p[:, 1]])
    ok = estimates >= threshold
    return pairs[ok], estimates[ok]


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """Union-find over `edges` (E, 2): the label of each of n nodes is the smallest node index in its
    component. Vectorized: hook every root onto the smaller root across each edge, then compress
    paths by pointer jumping, until no edge joins two different roots."""
    parent = np.arange(n)
    if not len(edges):
        return parent
    u, v = edges[:, 0], edges[:, 1]
    while True:
        ru, rv = parent[u], parent[v]
        differ = ru != rv
        if not differ.any():
            return parent
        np.minimum.at(parent, np.maximum(ru, rv)[differ], np.minimum(ru, rv)[differ])
        while True:  # pointer jumping until every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
