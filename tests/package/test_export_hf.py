"""The Hugging Face export: transformers loads it with no custom code, and its logits, token ids, chat
template, decoding and greedy generation equal ours. The weights are trained (norm gains away from 1),
so a swapped or missing weight changes the logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import transformers  # noqa: E402  (a test dependency: a missing install must fail, not skip)

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig
from llmpipe.package.export_hf import export_hf
from llmpipe.serve.engine import Engine
from llmpipe.serve.load import load_model
from llmpipe.serve.sampling import SamplingParams
from llmpipe.tokenizer.sentencepiece_bpe import CHAT_TEMPLATE, SPACE_SYMBOL, SPECIAL_TOKENS, Tokenizer
from llmpipe.train.checkpoint import save_checkpoint, tied_aliases
from tests.helpers import torch_threads

# Text where a converted SentencePiece tokenizer typically goes wrong: byte fallback (emoji, CJK, a rare
# accent), SentencePiece's own space symbol, digits, leading, trailing and repeated spaces, tabs, newlines.
HARD_TEXTS = [
    "▁", "▁▁x", "a▁b ▁ c", "x▁", " ▁y", "😀 emoji", "中文字符 and 日本語", "naïve café Ωmega", "\u200b zero width",
    "12345 678.9 0x1F 2026-12-01", "  two leading spaces", " one", "trailing   ", "x" + " " * 17 + "y",
    " " * 40, "\t\ttabs\tand\n\n\nnewlines\r\n", "\n" * 9, "aaaaaaaaaaaaaaa", "--------", "!!!??...", "",
    "<0x41> is not a byte piece", "MACBETH. So foul and fair a day I have not seen.",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What say you?"}],
    [{"role": "system", "content": "Speak briefly."}, {"role": "user", "content": " Hello ▁there, 12 lords"},
     {"role": "assistant", "content": "Good morrow!\n"}, {"role": "user", "content": "😀"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "  spaced  "}],
]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # CPU float results depend on the thread count
        yield


@pytest.fixture(scope="module")
def ours(trained_project: Path):
    with torch_threads(1):
        return load_model(trained_project / "models" / "pretrain")


@pytest.fixture(scope="module")
def exported(trained_project: Path, ours, tmp_path_factory) -> Path:
    _, tok, info = ours
    return export_hf(Path(info.path), tok, tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def hf_tok(exported: Path):
    return transformers.AutoTokenizer.from_pretrained(str(exported))


@pytest.fixture(scope="module")
def hf_model(exported: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()


def test_the_directory_is_a_plain_llama_directory_without_tokenizer_model(exported: Path, ours):
    _, tok, _ = ours
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tok.bos_id, tok.eos_id,
                                                                                           tok.pad_id)
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_id, tok.end_of_turn_id]
    from safetensors import safe_open

    with safe_open(str(exported / "model.safetensors"), framework="pt") as fh:
        names = set(fh.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # the tie is stored once
    tok_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert (tok_config["add_bos_token"], tok_config["add_eos_token"]) == (False, False)


def test_transformers_logits_equal_ours_with_trained_weights(hf_model, ours, corpus_text: str):
    model, tok, _ = ours
    gains = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
    assert all((g - 1).abs().max() > 0.05 for g in gains)  # trained: a swapped norm would change the logits
    assert type(hf_model) is transformers.LlamaForCausalLM and hf_model.dtype == torch.float32
    ids = tok.encode(corpus_text[100_000:104_000])
    idx = torch.tensor([[tok.eos_id, *ids[:127]], ids[500:628]])  # (2, 128): a document start and a full window
    with torch.no_grad():
        diff = (model(idx)[0] - hf_model(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_an_untied_model_with_its_own_rope_theta_and_norm_eps_exports_too(tmp_path: Path, ours):
    """Fields the trained model leaves at their defaults: a wrong rope_theta, norm_eps or lm_head shows here."""
    _, tok, _ = ours
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, max_seq_len=48,
                      tie_embeddings=False, rope_theta=500.0, norm_eps=1e-6)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5) if p.ndim == 1 else p.normal_(0.0, 0.05)
    ckpt = save_checkpoint(tmp_path / "final", model.state_dict(), cfg, {"hash": tok.hash, "vocab_size": tok.vocab_size},
                           {"step": 0}, aliases=tied_aliases(model))
    out = export_hf(ckpt, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not hf.config.tie_word_embeddings
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_autotokenizer_loads_tokenizer_json_as_written(hf_tok):
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    backend = hf_tok.backend_tokenizer
    assert backend.normalizer is None and backend.pre_tokenizer is None  # no class default rebuilt them


def test_token_ids_equal_ours_on_real_text_and_hard_strings(hf_tok, ours, corpus_text: str):
    _, tok, _ = ours
    sample = corpus_text[:150_000]
    assert hf_tok(sample).input_ids == tok.encode(sample)
    lines = sample.splitlines(keepends=True)
    assert [hf_tok(line).input_ids for line in lines] == tok.encode_batch(lines, num_threads=1)
    for text in HARD_TEXTS:
        assert hf_tok(text).input_ids == tok.encode(text), repr(text)
    # the hard strings do reach byte fallback and single digits
    assert any(tok.is_byte(i) for i in tok.encode("😀 中文字符"))
    assert len(tok.encode("12345")) == 5  # split_digits: no piece joins two digits


def test_a_literal_space_symbol_is_its_three_bytes_as_in_our_tokenizer(hf_tok, ours):
    _, tok, _ = ours
    byte_ids = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode()]
    assert tok.encode("x▁y") == tok.encode("x") + byte_ids + tok.encode("y")
    assert tok.sp.encode("x▁y") != tok.encode("x▁y")  # plain SentencePiece reads it as a space: the trap
    assert hf_tok("x▁y").input_ids == tok.encode("x▁y")
    assert hf_tok.decode(hf_tok("x▁y ▁▁z").input_ids) == "x▁y ▁▁z"


def test_special_token_strings_in_text_are_matched_unless_split_special_tokens(hf_tok, ours):
    """The one documented difference: a Hugging Face tokenizer matches its special tokens in text."""
    _, tok, _ = ours
    text = "He said <|user|> and <|end|>, then <|eos|>."
    specials = set(tok.special_ids.values())
    assert not specials & set(tok.encode(text))
    assert {tok.user_id, tok.end_of_turn_id, tok.eos_id} <= set(hf_tok(text).input_ids)
    assert hf_tok(text, split_special_tokens=True).input_ids == tok.encode(text)


def test_the_chat_template_gives_our_ids(hf_tok, ours):
    _, tok, _ = ours
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=False)
            assert list(theirs) == tok.apply_chat_template(messages, add_generation_prompt=prompt), messages


def test_decode_round_trips_and_skips_special_tokens(hf_tok, ours, corpus_text: str):
    _, tok, _ = ours
    for text in [*HARD_TEXTS, corpus_text[:20_000]]:
        ids = tok.encode(text)
        assert hf_tok.decode(ids) == text == tok.decode(ids), repr(text[:40])
    chat = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)
    assert hf_tok.decode(chat, skip_special_tokens=True) == tok.decode(chat)
    assert hf_tok.decode(chat) == tok.decode(chat, skip_special=False)


def test_transformers_greedy_generate_equals_our_engine(hf_model, ours):
    model, tok, _ = ours
    prompts = [[tok.eos_id, *tok.encode("MACBETH.")], [tok.eos_id, *tok.encode("Enter the King, and")],
               tok.apply_chat_template([{"role": "user", "content": "Who comes here?"}], add_generation_prompt=True)]
    stops = {tok.eos_id, tok.end_of_turn_id}
    done = Engine(model, tok).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=60),
                                       end_ids=[tok.end_of_turn_id])
    for prompt, completion in zip(prompts, done):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False)
        new = out[0, len(prompt):].tolist()
        end = next((k + 1 for k, t in enumerate(new) if t in stops), len(new))  # generate pads after a stop
        assert new[:end] == completion.token_ids
    assert sum(len(c.token_ids) for c in done) > 60  # not all stopped at once: tokens were compared


def _random_checkpoint(path: Path, tok: Tokenizer, tokenizer_hash: str, **overrides) -> Path:
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=16, **overrides)
    model = GPT(cfg)
    return save_checkpoint(path, model.state_dict(), cfg, {"hash": tokenizer_hash, "vocab_size": tok.vocab_size},
                           {"step": 0}, aliases=tied_aliases(model))


@pytest.mark.parametrize("case, match", [("qk_norm", "QK-norm"), ("tokenizer", "trained with tokenizer")])
def test_what_cannot_be_exported_is_refused_before_anything_is_written(case, match, tmp_path: Path, ours):
    _, tok, _ = ours
    ckpt = _random_checkpoint(tmp_path / "final", tok, "another" if case == "tokenizer" else tok.hash,
                              qk_norm=case == "qk_norm")
    with pytest.raises(UserError, match=match):
        export_hf(ckpt, tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["final"]


def test_the_special_tokens_are_declared_by_name(hf_tok, ours):
    _, tok, _ = ours
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.special_ids["unk"])
    assert set(hf_tok.all_special_ids) == set(tok.special_ids.values())
    assert {hf_tok.convert_ids_to_tokens(i) for i in tok.special_ids.values()} == set(SPECIAL_TOKENS.values())


def test_exporting_again_gives_the_same_bytes(exported: Path, ours, tmp_path: Path):
    """dvc.lock records the export's hash: a rerun of the stage must not change it."""
    _, tok, info = ours
    again = export_hf(Path(info.path), tok, tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in again.iterdir()} == {p.name: p.read_bytes() for p in exported.iterdir()}
