"""Checkpoint -> one GGUF file for llama.cpp (architecture `llama`), in f32, f16, bf16 or q8_0.

What llama.cpp's own Hugging Face converter does for a Llama checkpoint, followed here step by step
(ggml-org/llama.cpp, `convert_hf_to_gguf.py` at 0024aa74 and its split-out `conversion/llama.py`,
`LlamaModel`; the tensor loader in `src/llama-model.cpp`):

- q and k rows are permuted, `LlamaModel.permute`: llama.cpp's `llama` rotary (LLAMA_ROPE_TYPE_NORM)
  rotates adjacent pairs (2j, 2j+1) of each head, while ours (like HF's) pairs j with j + head_dim/2.
  The converter reorders each head's rows so that row 2j is the old row j and row 2j+1 the old row
  j + head_dim/2; q uses n_head heads, k uses n_head_kv (`permute(k, n_head, n_kv_head)` takes
  n_kv_head when the two differ). The same pairs then rotate by the same angles, and q.k is
  unchanged because q and k are permuted alike. v and the output projection are left as they are.
- 1-D tensors (the RMSNorm gains) stay f32 whatever the file type ("Most of the codebase that takes in
  1D tensors or norms only handles F32 tensors", `ModelBase.prepare_tensors`); every 2-D weight,
  token_embd included, takes the file type, and a weight whose rows do not split into Q8_0's blocks
  of 32 falls back to f16 (`except gguf.QuantError: ... falling back to F16`).
- Tied embeddings: no `output.weight` is written. llama.cpp's loader creates `output` as
  TENSOR_NOT_REQUIRED and, when it is absent, uses token_embd ("if output is NULL, init from the
  input tok embed"); an untied lm_head is written as `output.weight`.
- The vocabulary, `_create_vocab_sentencepiece` + `_set_vocab_sentencepiece`: tokenizer model "llama"
  (llama.cpp's SentencePiece tokenizer), pre "default", every piece as its UTF-8 bytes with "▁" kept,
  its SentencePiece score, and its type by SentencePiece's own flags (unknown, control, unused, byte,
  else normal; the numbers are `gguf.TokenType`). Special ids, add_bos/add_eos false (our documents
  start with no bos: see the evaluate adapter) and add_space_prefix false (our SentencePiece model
  adds no dummy prefix), the chat template CHAT_TEMPLATE and `<|end|>` as the end-of-turn token.

Tokenizer limit: llama.cpp turns every space into "▁" before matching pieces, so a literal "▁" in text
reads as a space there, where our Tokenizer encodes it as its three UTF-8 bytes.

The file is written under a temp name next to `out_path` and renamed into place; the same checkpoint
and file type give the same bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from llmpipe.errors import UserError
from llmpipe.io import atomic_path

log = logging.getLogger("llmpipe.package")

FILE_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "llama"


def export_gguf(checkpoint: Path, tokenizer, out_path: Path, file_type: str) -> Path:
    """Write `checkpoint` (a checkpoint, or a stage output dir: find_checkpoint) with `tokenizer` (the
    Tokenizer it was trained with) as a GGUF file of `file_type` at `out_path`; returns `out_path`."""
    import gguf

    from llmpipe.model.hf import llama_incompatibilities
    from llmpipe.package.quant import QUANT_FILE, is_quantized
    from llmpipe.train.checkpoint import (find_checkpoint, load_weights, read_model_config, read_tokenizer_ref,
                                          verify_checkpoint)

    if file_type not in FILE_TYPES:
        raise UserError(f"GGUF file type {file_type!r} (params.yaml quantize.gguf) is not one of "
                        f"{', '.join(FILE_TYPES)}")
    checkpoint = find_checkpoint(checkpoint)
    if is_quantized(checkpoint):
        raise UserError(f"{checkpoint} holds quantized weights ({QUANT_FILE}); export GGUF from the unquantized "
                        f"checkpoint it came from: the q8_0 file type is llama.cpp's own int8")
    verify_checkpoint(checkpoint)
    cfg = read_model_config(checkpoint)
    missing = llama_incompatibilities(cfg)
    if missing:
        raise UserError(f"{checkpoint}: the model uses {', '.join(missing)} (its model_config.json), which "
                        f"llama.cpp's `llama` architecture does not have, so no GGUF file can hold it; train "
                        f"without them for a GGUF export")
    _check_tokenizer(checkpoint, read_tokenizer_ref(checkpoint), tokenizer, cfg.vocab_size)
    state = {k: v.float().numpy() for k, v in load_weights(checkpoint).items()}

    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    _add_model_metadata(writer, cfg, file_type)
    _add_tokenizer_metadata(writer, tokenizer)
    for name, array in gguf_tensors(state, cfg):
        data, qtype = _encode(name, array, file_type)
        writer.add_tensor(name, data, raw_dtype=qtype)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out_path


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: rows (n_head * head_dim, d_in) from rotate-half to interleaved
    pairs. Pass n_kv_head for k (the converter's `permute(k, n_head, n_kv_head)`)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def gguf_tensors(state: dict[str, np.ndarray], cfg) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in our (out, in) layout, q/k permuted) for every tensor the file holds."""
    import gguf

    def name(tensor, bid: int | None = None) -> str:
        return gguf.TENSOR_NAMES[tensor].format(bid=bid) + ".weight"

    T = gguf.MODEL_TENSOR
    out = [(name(T.TOKEN_EMBD), state["tok_embeddings.weight"])]
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        out += [
            (name(T.ATTN_NORM, i), state[p + "attn_norm.weight"]),
            (name(T.ATTN_Q, i), permute_rotary(state[p + "attn.wq.weight"], cfg.n_head)),
            (name(T.ATTN_K, i), permute_rotary(state[p + "attn.wk.weight"], cfg.n_kv_head)),
            (name(T.ATTN_V, i), state[p + "attn.wv.weight"]),
            (name(T.ATTN_OUT, i), state[p + "attn.wo.weight"]),
            (name(T.FFN_NORM, i), state[p + "mlp_norm.weight"]),
            (name(T.FFN_GATE, i), state[p + "mlp.w_gate.weight"]),
            (name(T.FFN_UP, i), state[p + "mlp.w_up.weight"]),
            (name(T.FFN_DOWN, i), state[p + "mlp.w_down.weight"]),
        ]
    out.append((name(T.OUTPUT_NORM), state["norm.weight"]))
    if not cfg.tie_embeddings:  # tied: llama.cpp reuses token_embd (see the module docstring)
        out.append((name(T.OUTPUT), state["lm_head.weight"]))
    assert len(out) == len(state) - cfg.tie_embeddings, "a model tensor has no GGUF name"  # lm_head: an alias
    return out


def _encode(name: str, array: np.ndarray, file_type: str):
    """(data for GGUFWriter.add_tensor, its GGMLQuantizationType), as the converter chooses them."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = Q.F32 if array.ndim <= 1 else {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[file_type]
    array = np.ascontiguousarray(array, dtype=np.float32)
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError as exc:  # rows not a multiple of the block size
        log.warning("GGUF %s: %s; writing it as f16", name, exc)
        return gguf.quants.quantize(array, Q.F16), Q.F16


def _add_model_metadata(writer, cfg, file_type: str) -> None:
    import gguf

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("llmpipe")
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)


def token_types(tokenizer) -> list[int]:
    """llama.cpp's token type of every piece, from SentencePiece's flags (the converter's order of checks)."""
    import gguf

    sp, T = tokenizer.sp, gguf.TokenType
    types = []
    for i in range(tokenizer.vocab_size):
        if sp.IsUnknown(i):
            types.append(T.UNKNOWN)
        elif sp.IsControl(i):
            types.append(T.CONTROL)
        elif sp.IsUnused(i):
            types.append(T.UNUSED)
        elif sp.IsByte(i):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    return [int(t) for t in types]


def _add_tokenizer_metadata(writer, tokenizer) -> None:
    from llmpipe.tokenizer.sentencepiece_bpe import CHAT_TEMPLATE

    sp = tokenizer.sp
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.IdToPiece(i).encode("utf-8") for i in range(tokenizer.vocab_size)])
    writer.add_token_scores([float(sp.GetScore(i)) for i in range(tokenizer.vocab_size)])
    writer.add_token_types(token_types(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.special_ids["unk"])
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_eot_token_id(tokenizer.end_of_turn_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _check_tokenizer(checkpoint: Path, ref: dict, tokenizer, vocab_size: int) -> None:
    """The vocabulary written must be the one the weights were trained with: ids would mean other text."""
    if ref.get("hash") != tokenizer.hash:
        raise UserError(f"{checkpoint} was trained with tokenizer {ref.get('hash')} (its tokenizer_ref.json), but "
                        f"the tokenizer given is {tokenizer.hash} ({tokenizer.model_file}): export with the "
                        f"tokenizer it was trained with")
    if tokenizer.vocab_size != vocab_size:
        raise UserError(f"{checkpoint}: model vocab_size {vocab_size} != tokenizer vocab_size "
                        f"{tokenizer.vocab_size} ({tokenizer.model_file})")
