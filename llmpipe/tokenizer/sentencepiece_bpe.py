"""The `Tokenizer` every later stage uses: a standard SentencePiece BPE model plus our special tokens.

Exactness: the model is trained with identity normalization, no dummy prefix, kept whitespace and
byte fallback, so `decode(encode(x)) == x` for any string. One SentencePiece quirk needs help: it
escapes " " as U+2581 ("▁") and unescapes on decode, so a literal "▁" in the input would come back
as a space. We encode a literal "▁" as its three UTF-8 byte pieces instead, which decode to "▁".

Special tokens are SentencePiece control symbols: they have ids but are never produced from text,
so a document containing the string "<|user|>" encodes to ordinary pieces, never to `user_id`.

Speed: SentencePiece's BPE slows down on long inputs, and a document is often one long input.
A BPE piece never contains a non-space followed by a space (training splits words before each
space), so no piece can straddle position i when text[i] == " " and text[i-1] != " ". We cut
documents into ~1000-character segments at such positions and encode all segments of a batch on
SentencePiece's C++ thread pool: the ids are exactly those of encoding the whole text at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import sentencepiece as spm

from llmpipe.errors import UserError

MODEL_FILE = "tokenizer.model"
TOKENIZER_META_FILE = "tokenizer.json"
SPACE_SYMBOL = "\u2581"  # SentencePiece's escaped space, "▁"
SEGMENT_CHARS = 1000  # target segment length for encoding; any value gives the same ids

# Special tokens: (name, piece). The ids are fixed by their order (see train.py).
SPECIAL_TOKENS: dict[str, str] = {
    "unk": "<unk>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "pad": "<|pad|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end_of_turn": "<|end|>",
}
CHAT_ROLES = ("system", "user", "assistant")
# `apply_chat_template` as a Jinja template, for exports (Hugging Face tokenizer_config.json, GGUF
# tokenizer.chat_template): a tokenizer that matches the special tokens' strings in the rendered text
# gets exactly our ids (tests/package prove it for the Hugging Face export).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('role ' + message['role'] + ' is not one of system, user, assistant') }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def split_for_encoding(text: str, target: int = SEGMENT_CHARS) -> list[str]:
    """Cut `text` into segments of about `target` characters, only before a space that follows a
    non-space: no BPE piece crosses such a point, so encoding the segments equals encoding `text`."""
    segments = []
    start, n = 0, len(text)
    while n - start > target:
        cut = text.find(" ", start + target)
        while cut != -1 and text[cut - 1] == " ":  # inside a run of spaces: go to the next run
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        segments.append(text[start:cut])
        start = cut
    segments.append(text[start:])
    return segments


class Tokenizer:
    """SentencePiece BPE with bos/eos/pad and chat-template tokens. Load with `Tokenizer.load(dir)`."""

    def __init__(self, model_file: Path | str):
        self.model_file = Path(model_file)
        data = self.model_file.read_bytes()
        self.hash = hashlib.sha256(data).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=data)
        self.special_ids = {name: self.sp.piece_to_id(piece) for name, piece in SPECIAL_TOKENS.items()}
        for name, piece in SPECIAL_TOKENS.items():
            i = self.special_ids[name]
            # piece_to_id returns unk_id for an unknown piece; a wrong model must fail here, not later.
            if self.sp.id_to_piece(i) != piece or not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                raise UserError(f"{model_file}: special token {piece!r} is missing or not a control symbol; "
                                 "it was not trained by llmpipe (re-run the tokenizer stage)")
        # Literal "▁": its UTF-8 bytes as byte-fallback pieces (see module docstring).
        self._space_symbol_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode("utf-8")]
        if not all(self.sp.is_byte(i) for i in self._space_symbol_ids):
            raise UserError(f"{model_file} has no byte-fallback pieces, so some text cannot be encoded exactly; "
                             "it was not trained by llmpipe (re-run the tokenizer stage)")
        # The segment split is exact only if no piece has a space after a non-space; check the vocab.
        pieces = (self.sp.id_to_piece(i) for i in range(self.vocab_size))
        self._can_split = not any(SPACE_SYMBOL in p.lstrip(SPACE_SYMBOL) for p in pieces)

    @classmethod
    def load(cls, directory: Path | str) -> "Tokenizer":
        """Load from the tokenizer stage's output directory (`models/tokenizer/`)."""
        directory = Path(directory)
        model_file, meta_file = directory / MODEL_FILE, directory / TOKENIZER_META_FILE
        if not model_file.exists():
            raise UserError(f"{model_file} not found: run the tokenizer stage (llmpipe stage tokenizer)")
        tok = cls(model_file)
        if meta_file.exists():
            recorded = json.loads(meta_file.read_text(encoding="utf-8")).get("hash")
            if recorded != tok.hash:
                raise UserError(f"{model_file} (sha256 {tok.hash[:12]}) does not match {meta_file} "
                                 f"(hash {str(recorded)[:12]}): re-run the tokenizer stage")
        return tok

    # -- ids ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.special_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["pad"]

    @property
    def system_id(self) -> int:
        return self.special_ids["system"]

    @property
    def user_id(self) -> int:
        return self.special_ids["user"]

    @property
    def assistant_id(self) -> int:
        return self.special_ids["assistant"]

    @property
    def end_of_turn_id(self) -> int:
        return self.special_ids["end_of_turn"]

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def is_byte(self, i: int) -> bool:
        return self.sp.is_byte(i)

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; no bos/eos added, never a special id."""
        return self.encode_batch([text], num_threads=1)[0]

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts on SentencePiece's C++ thread pool (all cores by default)."""
        num_threads = num_threads or os.cpu_count() or 1
        segments: list[str] = []
        layout: list[list[int | None]] = []  # per text: segment indices, None for a literal "▁"
        for text in texts:
            parts = text.split(SPACE_SYMBOL) if SPACE_SYMBOL in text else [text]
            entry: list[int | None] = []
            for k, part in enumerate(parts):
                if k:
                    entry.append(None)
                pieces = split_for_encoding(part) if self._can_split else [part]
                entry.extend(range(len(segments), len(segments) + len(pieces)))
                segments.extend(pieces)
            layout.append(entry)
        encoded = self.sp.encode(segments, num_threads=num_threads) if segments else []
        out = []
        for entry in layout:
            if len(entry) == 1:
                out.append(encoded[entry[0]])
            else:
                out.append(list(itertools.chain.from_iterable(
                    self._space_symbol_ids if k is None else encoded[k] for k in entry)))
        return out

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """ids -> text. Special tokens decode to nothing, or to their strings with skip_special=False."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        if skip_special:
            return self.sp.decode(ids)
        specials = {i: SPECIAL_TOKENS[name] for name, i in self.special_ids.items()}
        out, run = [], []
        for i in ids:
            if i in specials:
                out.append(self.sp.decode(run) + specials[i])
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def decode_batch(self, batch: list[list[int]], num_threads: int | None = None) -> list[str]:
        """Decode many id lists (Python ints) on SentencePiece's thread pool."""
        return self.sp.decode(batch, num_threads=num_threads or os.cpu_count() or 1)

    # -- chat -----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> list[int]:
        """[{"role", "content"}] -> ids: `<|role|> content <|end|>` per message, specials inserted by id.

        With add_generation_prompt, ends with `<|assistant|>` so the model writes the reply next.
        """
        role_ids = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
        for k, message in enumerate(messages):
            if message.get("role") not in role_ids:
                raise UserError(f"message {k}: role {message.get('role')!r} is not one of {', '.join(CHAT_ROLES)}")
            if not isinstance(message.get("content"), str):
                raise UserError(f"message {k}: content must be a string, got {type(message.get('content')).__name__}")
        contents = self.encode_batch([m["content"] for m in messages], num_threads=1)
        ids: list[int] = []
        for message, content in zip(messages, contents):
            ids += [role_ids[message["role"]], *content, self.end_of_turn_id]
        if add_generation_prompt:
            ids.append(self.assistant_id)
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_file}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"
