"""A small NumPy forward pass over a GGUF file, and llama.cpp's SentencePiece tokenizer over its vocabulary,
both written from llama.cpp's semantics, not from our model or tokenizer.

It reads only the file: hyperparameters from the `llama.*` keys, tensors by their GGUF names, and
follows llama.cpp's `llama` graph (llm_build_llama) with ggml's operators:

- A ggml tensor's shape is ne = [ne0, ne1] with ne0 the contiguous dimension; GGUFReader's `shape`
  is that ne. Stored row after row, it is the NumPy array of shape (ne1, ne0). A weight is
  [n_in, n_out], and ggml_mul_mat(W, x) contracts ne0 with ne0: y[t, o] = sum_i W[o, i] x[t, i].
  token_embd is [n_embd, n_vocab]; ggml_get_rows picks its rows (one per token).
- ggml_rms_norm: x / sqrt(mean(x^2) + eps), then multiplied by the gain.
- ggml_rope_ext with LLAMA_ROPE_TYPE_NORM (the `llama` arch): adjacent pairs (x[i0], x[i0+1]) for
  i0 = 0, 2, ..., n_rot - 2 turn by pos * freq_base^(-i0 / n_rot).
- Attention: scale 1/sqrt(head_dim), causal mask, softmax; with GQA, ggml_mul_mat broadcasts k/v over
  the head dimension, so q head h reads kv head h // (n_head / n_head_kv).
- FFN: ffn_down(silu(ffn_gate(x)) * ffn_up(x)); residual after attention and after the FFN.
- Output: output_norm, then `output.weight`, or token_embd when the file has none (tied).

Dequantization is by hand from the block formats (ggml-common.h): F16 as IEEE half, BF16 as the top
16 bits of a float32, Q8_0 as blocks of 34 bytes: a float16 scale d, then 32 int8 q; x = d * q.

`spm_tokenize` follows src/llama-vocab.cpp (tokenizer_st_partition, llm_tokenizer_spm_session: a
priority queue of adjacent pairs by the merged token's score, ties to the leftmost, unknown symbols
as byte tokens), as llama_tokenize runs it for a `llama` (SPM) vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

Q8_0_BLOCK, Q8_0_BYTES = 32, 2 + 32


def dequantize_q8_0(raw: np.ndarray, ne: list[int]) -> np.ndarray:
    """Q8_0 bytes -> float32 array of shape (ne1, ne0)."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, Q8_0_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # (n_blocks, 32)
    return (d * q).reshape(tuple(reversed(ne)))


def dequantize_bf16(raw: np.ndarray, ne: list[int]) -> np.ndarray:
    halves = np.ascontiguousarray(raw, dtype=np.uint8).view(np.uint16).astype(np.uint32)
    return (halves << 16).view(np.float32).reshape(tuple(reversed(ne)))


def tensor_values(t) -> np.ndarray:
    """A GGUFReader tensor as float32, shape (ne1, ne0) (or (ne0,) for 1-D)."""
    ne = [int(n) for n in t.shape]
    if t.tensor_type == GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed(ne)))
    if t.tensor_type == GGMLQuantizationType.F16:
        return np.asarray(t.data, dtype=np.float16).astype(np.float32).reshape(tuple(reversed(ne)))
    if t.tensor_type == GGMLQuantizationType.BF16:
        return dequantize_bf16(t.data, ne)
    if t.tensor_type == GGMLQuantizationType.Q8_0:
        return dequantize_q8_0(t.data, ne)
    raise NotImplementedError(f"{t.name}: {t.tensor_type.name}")


class GGUFModel:
    def __init__(self, path: Path | str):
        reader = GGUFReader(str(path))
        self.fields = {name: f.contents() for name, f in reader.fields.items()}
        arch = self.fields["general.architecture"]
        assert arch == "llama", arch
        hp = lambda key: self.fields[f"llama.{key}"]  # noqa: E731
        self.n_embd, self.n_layer = hp("embedding_length"), hp("block_count")
        self.n_head, self.n_head_kv = hp("attention.head_count"), hp("attention.head_count_kv")
        self.n_rot, self.freq_base = hp("rope.dimension_count"), hp("rope.freq_base")
        self.eps = hp("attention.layer_norm_rms_epsilon")
        self.head_dim = self.n_embd // self.n_head
        self.w = {t.name: tensor_values(t) for t in reader.tensors}

    def mul_mat(self, name: str, x: np.ndarray) -> np.ndarray:
        """ggml_mul_mat(W, x): W (ne1=n_out, ne0=n_in), x (T, n_in) -> (T, n_out)."""
        return x @ self.w[name].T

    def rms_norm(self, x: np.ndarray, gain: str) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.w[gain]

    def rope_norm(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x (T, heads, head_dim): adjacent pairs (i0, i0 + 1) turn by pos * base^(-i0 / n_rot)."""
        out = x.copy()
        for i0 in range(0, self.n_rot, 2):
            theta = pos * self.freq_base ** (-i0 / self.n_rot)  # (T,)
            c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
            x0, x1 = x[:, :, i0], x[:, :, i0 + 1]
            out[:, :, i0] = x0 * c - x1 * s
            out[:, :, i0 + 1] = x0 * s + x1 * c
        return out

    def attention(self, il: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        T, D = x.shape[0], self.head_dim
        q = self.mul_mat(f"blk.{il}.attn_q.weight", x).reshape(T, self.n_head, D)
        k = self.mul_mat(f"blk.{il}.attn_k.weight", x).reshape(T, self.n_head_kv, D)
        v = self.mul_mat(f"blk.{il}.attn_v.weight", x).reshape(T, self.n_head_kv, D)
        q, k = self.rope_norm(q, pos), self.rope_norm(k, pos)
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        group = self.n_head // self.n_head_kv
        heads = []
        for h in range(self.n_head):
            kv = h // group
            scores = q[:, h] @ k[:, kv].T / np.sqrt(D) + mask  # (T, T)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            heads.append((scores / scores.sum(axis=-1, keepdims=True)) @ v[:, kv])  # (T, D)
        return self.mul_mat(f"blk.{il}.attn_output.weight", np.concatenate(heads, axis=-1))

    def ffn(self, il: int, x: np.ndarray) -> np.ndarray:
        gate = self.mul_mat(f"blk.{il}.ffn_gate.weight", x)
        up = self.mul_mat(f"blk.{il}.ffn_up.weight", x)
        return self.mul_mat(f"blk.{il}.ffn_down.weight", gate / (1.0 + np.exp(-gate)) * up)

    def logits(self, ids: list[int]) -> np.ndarray:
        """ids (T,) -> logits (T, n_vocab), computed in float64 so the reference adds no error of its own."""
        w = self.w
        self.w = {k: v.astype(np.float64) for k, v in w.items()}
        try:
            pos = np.arange(len(ids), dtype=np.float64)
            x = self.w["token_embd.weight"][np.asarray(ids)]  # ggml_get_rows
            for il in range(self.n_layer):
                x = x + self.attention(il, self.rms_norm(x, f"blk.{il}.attn_norm.weight"), pos)
                x = x + self.ffn(il, self.rms_norm(x, f"blk.{il}.ffn_norm.weight"))
            x = self.rms_norm(x, "output_norm.weight")
            head = "output.weight" if "output.weight" in self.w else "token_embd.weight"
            return self.mul_mat(head, x)
        finally:
            self.w = w


# -- llama.cpp's SentencePiece tokenizer (src/llama-vocab.cpp: tokenizer_st_partition, then per raw fragment
# llm_tokenizer_spm_session::tokenize), over the file's tokens, scores and token types -------------------------

TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN = 3, 4, 2


def spm_tokenize(fields: dict, text: str, parse_special: bool = True) -> list[int]:
    """The ids llama.cpp gives `text` with this file's vocabulary (llama_tokenize with add_special false).

    Special tokens (control/user-defined/unknown, longest first) are cut out of the raw text first when
    parse_special; each remaining fragment gets a leading space if add_space_prefix and it follows a special
    token or starts the text, spaces become "▁", then: one symbol per character; repeatedly merge the adjacent
    pair whose concatenation is a token with the highest score (ties: the leftmost); a final symbol that is
    no token is written as its UTF-8 byte tokens <0xXX>."""
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    types = fields["tokenizer.ggml.token_type"]
    to_id = {t: i for i, t in enumerate(tokens)}
    fragments: list[str | int] = [text]
    if parse_special:
        specials = sorted((i for i, ty in enumerate(types) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)),
                          key=lambda i: len(tokens[i]), reverse=True)
        for sid in specials:
            split: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int):
                    split.append(frag)
                    continue
                parts = frag.split(tokens[sid])
                for k, part in enumerate(parts):
                    if k:
                        split.append(sid)
                    if part:
                        split.append(part)
            fragments = split
    out, prev_special = [], True
    for frag in fragments:
        if isinstance(frag, int):
            out.append(frag)
            prev_special = True
            continue
        raw = (" " if fields.get("tokenizer.ggml.add_space_prefix", True) and prev_special else "") + frag
        out += _spm_session(raw.replace(" ", "\u2581"), to_id, scores)
        prev_special = False
    return out


def _spm_session(text: str, to_id: dict[str, int], scores: list[float]) -> list[int]:
    import heapq

    sym = [[i, 1] for i in range(len(text))]  # [start, length in characters]; length 0 once merged away
    nxt = list(range(1, len(text))) + [-1]
    prv = list(range(-1, len(text) - 1))
    queue: list[tuple[float, int, int, int]] = []

    def try_add(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        piece = text[sym[left][0]:sym[left][0] + sym[left][1] + sym[right][1]]
        if piece in to_id:
            heapq.heappush(queue, (-scores[to_id[piece]], left, right, len(piece)))

    for i in range(1, len(text)):
        try_add(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if sym[left][1] == 0 or sym[right][1] == 0 or sym[left][1] + sym[right][1] != size:
            continue  # one side was merged since this pair was queued
        sym[left][1] += sym[right][1]
        sym[right][1] = 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        try_add(prv[left], left)
        try_add(left, nxt[left])
    out, i = [], 0 if text else -1
    while i != -1:
        piece = text[sym[i][0]:sym[i][0] + sym[i][1]]
        out += [to_id[piece]] if piece in to_id else [to_id[f"<0x{b:02X}>"] for b in piece.encode("utf-8")]
        i = nxt[i]
    return out
