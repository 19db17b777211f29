"""Synthetic test data for the tokenizer tests: a multilingual corpus with the strings that break
tokenizers (whitespace runs, newlines, tabs, emoji, literal special tokens), and dedup-style parts."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there one all we their been has when who will more no if out so said what up "
         "its about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little good very make world still own see "
         "men work long get here between both life being under never day same another know while last").split()
# Non-ASCII, emoji, code indentation, literal special-token strings, the escaped-space symbol.
EXTRAS = ["naïve café crème brûlée", "日本語のテキストです。", "Привет, мир!", "emoji 😀👍🏽🇩🇪 ok",
          "    def f(x):\n\treturn  x\r\n", "<|user|> is a literal, so is <|end|>", "über Straße", "a▁b ▁ c",
          "1234567 + 89 = 1234656", "tabs\tand\t\ttabs"]
TRICKY = ["", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "hello", " leading", "trailing ", "two  spaces",
          "many     spaces here", "line one\nline two\r\nline three\n\n", "\ttab start", "a\x00b\x01c",
          "naïve café", "日本語", "😀", "👍🏽 family: 👨‍👩‍👧‍👦 flag 🇩🇪", "e\u0301 (combining)", "שלום עולם",
          "▁", "▁▁ x▁y ▁", "<|user|>", "<|bos|><|eos|><|pad|><|system|><|assistant|><|end|><unk>", "<0x0A><0xFF>",
          "mixed <|user|>\nhi\t<|end|> 😀 ▁ end ", "\u2028\u2029\u00a0\u3000", "x" * 5000, ("word " * 3000).strip(),
          "a " * 1500 + "   " + "b " * 1500]


def make_document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 12)):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        line = line[0].upper() + line[1:] + rng.choice([".", ",", "!", "?", ";", ""])
        if rng.random() < 0.25:
            line += " " + rng.choice(EXTRAS)
        lines.append(("    " if rng.random() < 0.1 else "") + line)
    return rng.choice(["\n", "\n\n"]).join(lines) + rng.choice(["", "\n"])


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [make_document(rng) for _ in range(n_docs)]


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def write_dedup_parts(root: Path, docs: list[str], parts: int = 3) -> Path:
    """data/dedup/part-*.parquet with the data record schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / "data" / "dedup"
    out.mkdir(parents=True, exist_ok=True)
    for k in range(parts):
        chunk = docs[k::parts]
        pq.write_table(pa.table({"id": [doc_id(t) for t in chunk], "source": ["synthetic"] * len(chunk),
                                 "text": chunk, "meta": ["{}"] * len(chunk)}), out / f"part-{k:05d}.parquet")
    return out


def write_small_tokenizer(out: Path, docs: list[str]) -> Path:
    """A 600-piece tokenizer trained on `docs` (about a second), written as the tokenizer stage writes
    one, with the hash of its model in the meta file."""
    from llmpipe.tokenizer import train
    from llmpipe.tokenizer.sentencepiece_bpe import MODEL_FILE, TOKENIZER_META_FILE

    sentences = [s for doc in docs for s in train.training_sentences(doc)]
    model = train.train_sentencepiece(sentences, vocab_size=600, character_coverage=0.9995, num_threads=2)
    (out / MODEL_FILE).write_bytes(model)
    (out / TOKENIZER_META_FILE).write_text('{"hash": "%s"}' % hashlib.sha256(model).hexdigest())
    return out
