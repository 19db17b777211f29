"""The GGUF export read back with gguf's own reader, and run by a NumPy forward written from llama.cpp's
semantics (gguf_forward.py), against our model with trained weights."""

from __future__ import annotations

import re

import gguf
import jinja2
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig
from llmpipe.package.export_gguf import export_gguf
from llmpipe.tokenizer.sentencepiece_bpe import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer
from llmpipe.train.checkpoint import load_checkpoint, save_checkpoint, tied_aliases
from tests.package.gguf_forward import GGUFModel, dequantize_q8_0, spm_tokenize, tensor_values

FILE_TYPES = ("f32", "f16", "bf16", "q8_0")
QTYPE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
LLAMA_FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}  # llama.cpp's enum llama_ftype
TOKEN_TYPE = {"normal": 1, "unknown": 2, "control": 3, "byte": 6}  # llama.cpp's enum llama_token_type


@pytest.fixture(scope="module")
def source(trained_project):
    tok = Tokenizer.load(trained_project / "models" / "tokenizer")
    checkpoint = trained_project / "models" / "pretrain" / "final"
    model, cfg, _ = load_checkpoint(checkpoint)
    return checkpoint, tok, model, cfg


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    checkpoint, tok, _, _ = source
    out = tmp_path_factory.mktemp("gguf")
    return {ft: export_gguf(checkpoint, tok, out / f"model-{ft}.gguf", ft) for ft in FILE_TYPES}


@pytest.fixture(scope="module")
def text_ids(source, corpus_text):
    """A full context of real text: rotary is checked at every position the model was trained on."""
    _, tok, _, cfg = source
    return tok.encode(corpus_text[20_000:30_000])[:cfg.max_seq_len]


def interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The layout llama.cpp's rotary needs: in each head, rows 2j and 2j+1 are our rows j and j + D/2
    (the pair our rotate-half rotary turns together)."""
    D = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for j in range(D // 2):
            out[h * D + 2 * j] = w[h * D + j]
            out[h * D + 2 * j + 1] = w[h * D + j + D // 2]
    return out


def expected_tensors(model: GPT) -> dict[str, np.ndarray]:
    """GGUF name -> our tensor (out, in) as the file must hold it (before rounding)."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["tok_embeddings.weight"], "output_norm.weight": sd["norm.weight"]}
    names = {"attn_norm": "attn_norm", "attn_v": "attn.wv", "attn_output": "attn.wo", "ffn_norm": "mlp_norm",
             "ffn_gate": "mlp.w_gate", "ffn_up": "mlp.w_up", "ffn_down": "mlp.w_down"}
    for i in range(cfg.n_layer):
        out.update({f"blk.{i}.{g}.weight": sd[f"layers.{i}.{ours}.weight"] for g, ours in names.items()})
        out[f"blk.{i}.attn_q.weight"] = interleaved(sd[f"layers.{i}.attn.wq.weight"], cfg.n_head)
        out[f"blk.{i}.attn_k.weight"] = interleaved(sd[f"layers.{i}.attn.wk.weight"], cfg.n_kv_head)
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def rounded(w: np.ndarray, file_type: str) -> np.ndarray:
    """What a file of this type holds for w: 1-D stays f32, 2-D is rounded (q8_0 by gguf's own quantizer)."""
    if w.ndim == 1 or file_type == "f32":
        return w
    if file_type == "f16":
        return w.astype(np.float16).astype(np.float32)
    if file_type == "bf16":
        return torch.from_numpy(w).to(torch.bfloat16).float().numpy()  # round to nearest even, like ggml
    return gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0)


def rounded_model(model: GPT, file_type: str) -> GPT:
    copy = GPT(model.config)
    copy.load_state_dict({k: torch.from_numpy(rounded(v.float().numpy(), file_type))
                          for k, v in model.state_dict().items()})
    return copy.eval()


def logits_of(model: GPT, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].double().numpy()


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_every_tensor_reads_back_as_the_source(source, exported, file_type):
    _, _, model, _ = source
    reader = gguf.GGUFReader(str(exported[file_type]))
    tensors = {t.name: t for t in reader.tensors}
    expected = expected_tensors(model)
    assert set(tensors) == set(expected)  # tied: no output.weight, token_embd serves as the output
    for name, want in expected.items():
        t = tensors[name]
        assert [int(n) for n in t.shape] == list(reversed(want.shape)), name  # ggml ne: [n_in, n_out]
        assert t.tensor_type == (Q.F32 if want.ndim == 1 else QTYPE[file_type]), name
        got = tensor_values(t)
        if file_type == "q8_0" and want.ndim == 2:
            # bit-exact to gguf's quantizer (ggml-quants.c's reference), and our block decoding to its own
            assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(want, Q.Q8_0)), name
            assert np.array_equal(got, gguf.quants.dequantize(np.asarray(t.data), Q.Q8_0)), name
            # within half a step of each block's grid, the step (max |x| / 127) itself stored as float16
            step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(got - want).reshape(-1, 32) <= step * (0.5 + 127 * 2.0 ** -11)), name
        else:
            assert np.array_equal(got, rounded(want, file_type)), name


def test_q8_0_block_decoding_by_hand():
    """One block written out byte by byte: scale 0.5 as float16 (0x3800, little-endian), then 32 int8."""
    q = np.arange(-16, 16, dtype=np.int8)
    raw = np.concatenate([np.array([0x00, 0x38], dtype=np.uint8), q.view(np.uint8)])
    assert np.array_equal(dequantize_q8_0(raw, [32, 1]), (0.5 * q.astype(np.float32))[None, :])


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_metadata(source, exported, file_type):
    _, tok, _, cfg = source
    f = GGUFModel(exported[file_type]).fields
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == LLAMA_FILE_TYPE[file_type]
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    llama = {"vocab_size": cfg.vocab_size, "context_length": cfg.max_seq_len, "embedding_length": cfg.d_model,
             "block_count": cfg.n_layer, "feed_forward_length": cfg.mlp_hidden,
             "rope.dimension_count": cfg.head_dim, "attention.head_count": cfg.n_head,
             "attention.head_count_kv": cfg.n_kv_head}
    assert {k: f[f"llama.{k}"] for k in llama} == llama
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps, rel=1e-6)  # stored as f32
    assert f["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta, rel=1e-6)

    assert f["tokenizer.ggml.model"] == "llama"
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert f["tokenizer.ggml.tokens"] == pieces  # SentencePiece pieces as they are, "▁" included
    assert any("\u2581" in p for p in pieces)
    assert f["tokenizer.ggml.scores"] == pytest.approx([tok.sp.GetScore(i) for i in range(tok.vocab_size)])
    specials = set(SPECIAL_TOKENS.values()) - {SPECIAL_TOKENS["unk"]}
    want_types = [TOKEN_TYPE["unknown"] if p == SPECIAL_TOKENS["unk"] else TOKEN_TYPE["control"] if p in specials
                  else TOKEN_TYPE["byte"] if re.fullmatch(r"<0x[0-9A-F]{2}>", p) else TOKEN_TYPE["normal"]
                  for p in pieces]
    assert f["tokenizer.ggml.token_type"] == want_types
    assert want_types.count(TOKEN_TYPE["byte"]) == 256
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unknown": tok.special_ids["unk"], "padding": tok.pad_id,
           "eot": tok.end_of_turn_id}
    assert {k: f[f"tokenizer.ggml.{k}_token_id"] for k in ids} == ids
    assert pieces[f["tokenizer.ggml.eot_token_id"]] == "<|end|>"
    assert (f["tokenizer.ggml.add_bos_token"], f["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert f["tokenizer.ggml.add_space_prefix"] is False
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_f32_forward_matches_our_logits(source, exported, text_ids):
    _, _, model, _ = source
    got = GGUFModel(exported["f32"]).logits(text_ids)
    want = logits_of(model, text_ids)
    print(f"f32: max |logit diff| {np.abs(got - want).max():.3g}")
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("file_type", ["f16", "bf16", "q8_0"])
def test_rounded_forward_matches_our_logits(source, exported, text_ids, file_type):
    """The file is our network exactly, up to its weights' rounding: with the same rounding applied to our
    weights the logits agree to fp32 precision; against the unrounded model they move by what the rounding
    costs, bounded relative to the logits' spread (below), and the greedy next token rarely changes."""
    _, _, model, _ = source
    got = GGUFModel(exported[file_type]).logits(text_ids)
    assert np.abs(got - logits_of(rounded_model(model, file_type), text_ids)).max() <= 1e-4
    full = logits_of(model, text_ids)
    drift = np.abs(got - full).max() / full.std()
    print(f"{file_type}: max |logit diff| vs fp32 {np.abs(got - full).max():.4g} ({drift:.3g} of the logits' std)")
    assert drift <= DRIFT[file_type]
    assert (got.argmax(-1) == full.argmax(-1)).mean() >= 0.95


# Measured on the fixture (max |logit diff| against the fp32 model, over the logits' std): f16 5e-4,
# bf16 3.7e-3, q8_0 1.4e-2. They scale with each format's relative rounding of one weight (2^-11 for
# f16, 2^-8 for bf16, about 1/254 of a block's largest value for q8_0). The bounds leave 3 to 10 times
# that; a wrong layout or a missing permutation moves the logits by about their whole spread (drift ~1).
DRIFT = {"f16": 0.005, "bf16": 0.02, "q8_0": 0.05}


def small_checkpoint(path, tok: Tokenizer, tokenizer_hash: str | None = None, **overrides):
    """A fresh 1-layer model (norm gains drawn away from 1) saved as a checkpoint trained with `tok`
    (or with the tokenizer of `tokenizer_hash`)."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=64, max_seq_len=32,
                      **overrides)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    save_checkpoint(path, model.state_dict(), cfg, {"hash": tokenizer_hash or tok.hash, "vocab_size": tok.vocab_size},
                    {"step": 0},
                    aliases=tied_aliases(model))
    return model.eval()


def test_untied_head_is_written_as_output(source, tmp_path):
    _, tok, _, _ = source
    model = small_checkpoint(tmp_path / "ckpt", tok, tie_embeddings=False)
    path = export_gguf(tmp_path / "ckpt", tok, tmp_path / "untied.gguf", "f32")
    gg = GGUFModel(path)
    assert np.array_equal(gg.w["output.weight"], model.lm_head.weight.detach().numpy())
    ids = tok.encode("Now is the winter of our discontent")[:32]
    assert np.abs(gg.logits(ids) - logits_of(model, ids)).max() <= 1e-4


def test_q8_0_is_a_quarter_of_f32_and_exports_are_reproducible(exported, source, tmp_path):
    checkpoint, tok, _, _ = source
    sizes = {ft: exported[ft].stat().st_size for ft in FILE_TYPES}
    print("GGUF sizes (bytes):", sizes)
    assert sizes["f16"] <= 0.52 * sizes["f32"] and sizes["bf16"] == sizes["f16"]
    assert sizes["q8_0"] <= 0.3 * sizes["f32"]  # 34 bytes per 32 weights, plus the f32 norms and the vocab
    again = export_gguf(checkpoint, tok, tmp_path / "again.gguf", "q8_0")
    assert again.read_bytes() == exported["q8_0"].read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["again.gguf"]  # no temp file left behind


def test_refusals_name_the_problem(source, tmp_path):
    checkpoint, tok, _, _ = source
    with pytest.raises(UserError, match=r"'q4_k'.*quantize\.gguf.*f32, f16, bf16, q8_0"):
        export_gguf(checkpoint, tok, tmp_path / "x.gguf", "q4_k")
    small_checkpoint(tmp_path / "qk", tok, qk_norm=True)
    with pytest.raises(UserError, match=r"qk_norm.*llama"):
        export_gguf(tmp_path / "qk", tok, tmp_path / "qk.gguf", "f16")
    small_checkpoint(tmp_path / "quantized", tok)
    (tmp_path / "quantized" / "quantization.json").write_text('{"variant": "int8"}')
    with pytest.raises(UserError, match=r"quantized weights.*export GGUF from the unquantized checkpoint"):
        export_gguf(tmp_path / "quantized", tok, tmp_path / "quantized.gguf", "q8_0")
    small_checkpoint(tmp_path / "other", tok, tokenizer_hash="0" * 64)
    with pytest.raises(UserError, match=r"trained with tokenizer 0{64}.*export with the tokenizer it was trained"):
        export_gguf(tmp_path / "other", tok, tmp_path / "other.gguf", "f16")
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".gguf" or p.name.startswith(".tmp")]


def test_llama_cpp_tokenizer_gives_our_ids(source, exported, corpus_text):
    """llama.cpp's SentencePiece tokenizer (gguf_forward.spm_tokenize, from llama-vocab.cpp) on the file's
    vocabulary gives our ids: real text, spaces, tabs, newlines, digits, byte fallback, and the chat template
    rendered as llama.cpp renders it (Jinja) with its special tokens parsed."""
    _, tok, _, _ = source
    fields = GGUFModel(exported["q8_0"]).fields
    step = len(corpus_text) // 12
    samples = [corpus_text[k:k + 1500] for k in range(0, len(corpus_text) - 1500, step)]
    hard = ["Hello, world!", "  two  spaces\tand a tab\n\nnew line", "digits 1234567890, 3.14",
            "emoji 🙂, CJK 漢字, é", " leading", "trailing ", "x  \n  y", "<|user|> written in a document is text"]
    for text in samples + hard:
        assert spm_tokenize(fields, text, parse_special=False) == tok.encode(text), text[:60]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Hamlet? 42 times"},
                {"role": "assistant", "content": " A prince."}, {"role": "user", "content": "And 🙂?"}]
    template = jinja2.Environment().from_string(fields["tokenizer.chat_template"])  # the file's own template
    rendered = template.render(messages=messages, add_generation_prompt=True)
    assert spm_tokenize(fields, rendered) == tok.apply_chat_template(messages, add_generation_prompt=True)
    # The one known difference: llama.cpp turns spaces into "▁" before matching, so a literal "▁" reads as a
    # space there, where our Tokenizer encodes its three UTF-8 bytes (see export_gguf's docstring).
    assert spm_tokenize(fields, "a ▁ b", parse_special=False) == tok.encode("a   b") != tok.encode("a ▁ b")


def test_transformers_gguf_loader_gives_our_logits(source, exported, text_ids):
    """A second, independent reader of the file: transformers' GGUF loader undoes llama.cpp's q/k
    permutation on its own and runs its Llama; it gets our logits too."""
    from transformers import AutoModelForCausalLM

    _, _, model, _ = source
    path = exported["f32"]
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor([text_ids])).logits[0].double().numpy()
    assert np.abs(got - logits_of(model, text_ids)).max() <= 1e-4
