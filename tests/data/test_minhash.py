"""MinHash engine: normalization, shingle hashing, signature accuracy, LSH banding, union-find."""

import random

import numpy as np
import pytest
import xxhash

from llmpipe.data import minhash


def test_normalization_folds_case_whitespace_punctuation_and_compatibility_forms():
    variants = ["Hello, World!", "hello   world", "  HELLO\n\tWORLD...", "Hello — “World”", "ＨＥＬＬＯ world\u00a0"]
    assert {minhash.dedup_key_text(v) for v in variants} == {"hello world"}
    assert minhash.dedup_key_text("don't stop") == "don t stop"
    assert minhash.dedup_key_text("?!  \n") == ""


def test_batched_normalization_matches_the_reference_text_by_text():
    rng = random.Random(0)
    alphabet = [" ", "  ", "\n", "\t", "a", "b", "é", "Ä", "!", "—", "\u00a0", "\u200b", "ﬁ", "Ｚ", "\u2028", "_"]
    for _ in range(500):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(rng.randrange(1, 5))]
        buf, bounds = minhash.normalized_buffer(texts)
        assert buf.tobytes() == "\n".join(map(minhash.dedup_key_text, texts)).encode()
        hashes = minhash.exact_hashes(buf, bounds)
        for t, text in enumerate(texts):
            expected = xxhash.xxh3_128_intdigest(minhash.dedup_key_text(text).encode())
            assert (int(hashes[t, 0]) << 64) | int(hashes[t, 1]) == expected


def _shingle_hashes(texts, n):
    buf, _ = minhash.normalized_buffer(texts)
    return minhash.shingle_hashes(buf, len(texts), n)


def test_shingles_are_word_ngrams_hashed_by_content_alone():
    x, text_of = _shingle_hashes(["a b c d e", "", "x y", "Q c d e!"], 3)
    assert text_of.tolist() == [0, 0, 0, 2, 3, 3]  # 5 words -> 3 trigrams; empty -> none; 2 words -> one
    assert x[2] == x[5]  # "c d e" in two texts, at different offsets, after normalization
    assert len(set(x[:3].tolist())) == 3


def _true_and_estimated(a_words, b_words, hasher):
    a, b = " ".join(a_words), " ".join(b_words)
    true = len(set(a_words) & set(b_words)) / len(set(a_words) | set(b_words))
    sig = hasher.signatures([a, b])
    return true, float(minhash.estimated_jaccard(sig[0], sig[1]))


@pytest.mark.parametrize("overlap", [0.2, 0.5, 0.8])
def test_signature_estimate_is_unbiased_with_binomial_spread(overlap: float):
    # Unigram shingles of distinct tokens, so the true Jaccard is known exactly.
    num_perm, errors = 128, []
    for seed in range(40):
        hasher = minhash.MinHasher(num_perm=num_perm, shingle_size=1, seed=seed)
        shared = int(400 * overlap)
        words = [f"w{seed}x{i}" for i in range(800 - shared)]
        true, est = _true_and_estimated(words[:400], words[400 - shared:], hasher)
        errors.append(est - true)
    sd = np.sqrt(true * (1 - true) / num_perm)
    assert abs(np.mean(errors)) < 3 * sd / np.sqrt(len(errors))  # unbiased
    assert np.std(errors) < 1.5 * sd  # no worse than independent permutations
    assert np.max(np.abs(errors)) < 5 * sd


def test_estimate_agrees_with_datasketch_on_the_same_shingles():
    import datasketch  # a test dependency: a missing install must fail, not skip

    rng = random.Random(1)
    vocab = [f"v{i}" for i in range(3000)]
    hasher = minhash.MinHasher(num_perm=128, shingle_size=3, seed=0)
    diffs = []
    for _ in range(30):
        a = [rng.choice(vocab) for _ in range(300)]
        b = [w if rng.random() > 0.08 else rng.choice(vocab) for w in a]
        sig = hasher.signatures([" ".join(a), " ".join(b)])
        ours = float(minhash.estimated_jaccard(sig[0], sig[1]))
        theirs = []
        for words in (a, b):
            m = datasketch.MinHash(num_perm=128)
            m.update_batch([" ".join(words[i:i + 3]).encode() for i in range(len(words) - 2)])
            theirs.append(m)
        diffs.append(ours - theirs[0].jaccard(theirs[1]))
    assert abs(np.mean(diffs)) < 0.03
    assert np.max(np.abs(diffs)) < 0.25  # two independent estimates, each with sd ~0.04


def test_equal_band_slices_share_buckets_and_large_buckets_stay_linear():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2**32, size=(300, 8), dtype=np.uint64).astype(np.uint32)
    sig[10, 2:4] = sig[3, 2:4]  # equal in band 1 only
    sig[200:300] = sig[100]  # a bucket of 101 members: star + chain pairs, not 5050
    keys = [minhash.band_key(sig, band, rows=2) for band in range(4)]
    assert [3, 10] in minhash.bucket_pairs(keys[1]).tolist()
    assert [3, 10] not in minhash.bucket_pairs(keys[0]).tolist()
    pairs = minhash.bucket_pairs(keys[0], max_all_pairs=64)
    assert np.all(pairs[:, 0] < pairs[:, 1]) and len(np.unique(pairs, axis=0)) == len(pairs)
    assert set(pairs.ravel().tolist()) == {100, *range(200, 300)} and len(pairs) < 2 * 101
    labels = minhash.connected_components(300, pairs)
    assert set(labels[[100, *range(200, 300)]].tolist()) == {100}
    assert len(minhash.bucket_pairs(keys[0], max_all_pairs=200)) == 101 * 100 // 2
    # Which pairs a big bucket yields follows `tiebreak` (content), not the order records came in.
    perm = rng.permutation(300)
    tiebreak = rng.permutation(300)
    shuffled = minhash.bucket_pairs(keys[0][perm], tiebreak=tiebreak[perm])
    original = minhash.bucket_pairs(keys[0], tiebreak=tiebreak)
    assert sorted(map(sorted, perm[shuffled].tolist())) == sorted(map(sorted, original.tolist()))
    subset = np.array([3, 10, 50])
    assert np.array_equal(minhash.band_key(sig, 1, 2, subset=subset), keys[1][subset])


def test_verification_keeps_pairs_at_or_above_threshold():
    sig = np.zeros((3, 10), dtype=np.uint32)
    sig[1, :3] = 1  # 0.7 with row 0
    sig[2, :6] = 2  # 0.4 with row 0
    kept, est = minhash.verified_pairs(sig, np.array([[0, 1], [0, 2]]), threshold=0.7)
    assert kept.tolist() == [[0, 1]] and est.tolist() == [0.7]


def test_connected_components_match_a_reference_union_find():
    rng = np.random.default_rng(3)
    n = 200
    edges = rng.integers(0, n, size=(150, 2))
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for u, v in edges.tolist():
        ru, rv = find(u), find(v)
        parent[max(ru, rv)] = min(ru, rv)
    expected = [min(j for j in range(n) if find(j) == find(i)) for i in range(n)]
    assert minhash.connected_components(n, edges).tolist() == expected
