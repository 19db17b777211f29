"""Our SentencePiece `Tokenizer` as a Hugging Face tokenizer: `tokenizer.json`, `tokenizer_config.json`
and `special_tokens_map.json`, which `transformers.AutoTokenizer.from_pretrained(dir)` loads as written.

Why this shape (each choice is what makes the ids equal ours):

- A `tokenizers` BPE model holding the SentencePiece pieces and merges, with every "▁" in a piece
  rewritten to a plain space. Our model uses identity normalization and no dummy prefix, so
  SentencePiece's only rewrite of the input is " " -> "▁"; with spaces in the vocabulary instead,
  no normalizer or pre-tokenizer is needed at all, and a literal "▁" in the text matches no piece,
  so byte fallback turns it into its three UTF-8 byte pieces: exactly what `Tokenizer.encode` does
  (plain SentencePiece would read it as a space).
- The merges are every split of a piece into two pieces, ranked by the piece's score: SentencePiece's
  BPE merges, at each step, the adjacent pair whose concatenation is the best-scored piece, which is
  the pair with the lowest rank here. Byte, control and unknown pieces never take part in a merge
  (SentencePiece keeps them out of its merge table). Digits stay apart because no piece joins two.
- No `tokenizer.model` in the directory: given one, transformers converts it with its own
  SentencePiece defaults (a Metaspace pre-tokenizer, a dummy prefix), and the ids change.
- `tokenizer_class` "PreTrainedTokenizerFast" (transformers 5 names it `TokenizersBackend`): the
  generic class loads tokenizer.json unchanged, where `LlamaTokenizer` would rebuild the normalizer
  and pre-tokenizer from its class defaults.
- Nothing is added around the text (add_bos_token and add_eos_token false): `tok(text).input_ids`
  equals `Tokenizer.encode(text)`. Our models read a document as the tokens after an eos (see
  llmpipe/evaluate/adapter.py); a Hugging Face user who wants that prefix adds `tok.eos_token_id`.

Where a Hugging Face tokenizer cannot equal ours: it matches the special tokens' strings
("<|user|>", "<|end|>", ...) inside plain text and gives their ids; ours never produces a special id
from text. That matching is what makes the chat template work (the rendered template is text with
those markers, and its ids equal `Tokenizer.apply_chat_template`'s); plain text that contains a
marker gets our ids with `split_special_tokens=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmpipe.tokenizer.sentencepiece_bpe import CHAT_TEMPLATE, SPACE_SYMBOL, SPECIAL_TOKENS, Tokenizer

TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
CHAT_SPECIALS = ("system", "user", "assistant", "end_of_turn")  # the chat template's markers


def _text(piece: str) -> str:
    """A SentencePiece piece as the text it stands for (its escaped spaces back to spaces)."""
    return piece.replace(SPACE_SYMBOL, " ")


def _mergeable(tok: Tokenizer) -> dict[str, int]:
    """{piece: id} of the pieces that take part in BPE merges (not byte, control or unknown)."""
    sp = tok.sp
    return {sp.id_to_piece(i): i for i in range(tok.vocab_size)
            if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))}


def vocab_and_merges(tok: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary (every piece, spaces unescaped) and merges (best-scored piece first)."""
    vocab = {_text(tok.id_to_piece(i)): i for i in range(tok.vocab_size)}
    if len(vocab) != tok.vocab_size:  # two pieces would share one string: ids would be lost
        raise ValueError(f"{tok.model_file}: pieces collide once '▁' is written as a space")
    pieces = _mergeable(tok)
    ranked = sorted(pieces, key=lambda p: (-tok.sp.get_score(pieces[p]), pieces[p]))
    merges = [(_text(p[:k]), _text(p[k:])) for p in ranked for k in range(1, len(p))
              if p[:k] in pieces and p[k:] in pieces]
    return vocab, merges


def hf_tokenizer(tok: Tokenizer):
    """A `tokenizers.Tokenizer` giving our ids (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders
    from tokenizers.models import BPE

    vocab, merges = vocab_and_merges(tok)
    out = HFTokenizer(BPE(vocab=vocab, merges=merges, unk_token=SPECIAL_TOKENS["unk"], byte_fallback=True,
                          fuse_unk=False, ignore_merges=False))
    out.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    # already in the vocabulary, so they keep their ids; special: skipped by decode(skip_special_tokens=True)
    out.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in SPECIAL_TOKENS.values()])
    return out


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json: the class that loads tokenizer.json as written, the special tokens, the chat template."""
    return {
        "tokenizer_class": TOKENIZER_CLASS,
        **_named_specials(),
        "additional_special_tokens": [SPECIAL_TOKENS[name] for name in CHAT_SPECIALS],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # its English-punctuation rules would change decoded text
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def _named_specials() -> dict[str, str]:
    return {f"{name}_token": SPECIAL_TOKENS[name] for name in ("bos", "eos", "unk", "pad")}


def write_hf_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`; their names."""
    out_dir = Path(out_dir)
    hf_tokenizer(tok).save(str(out_dir / TOKENIZER_JSON))
    _write_json(out_dir / TOKENIZER_CONFIG, tokenizer_config(tok, model_max_length))
    _write_json(out_dir / SPECIAL_TOKENS_MAP, {**_named_specials(),
                                               "additional_special_tokens": [SPECIAL_TOKENS[n] for n in CHAT_SPECIALS]})
    return [TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = ["hf_tokenizer", "tokenizer_config", "vocab_and_merges", "write_hf_tokenizer"]
