"""Training: our SentencePiece BPE model, and the Hugging Face byte-level BPE we compare it with.

Settings that make the model exact and reproducible:
- identity normalization, no dummy prefix, extra whitespace kept: decode gives back the input;
- byte fallback: a character outside the vocabulary becomes its UTF-8 bytes, never <unk>;
- digits split, runs of spaces allowed as pieces (indentation);
- special tokens are control symbols (ids only, never matched in text); ids 0..7 in SPECIAL_TOKENS order;
- SentencePiece stores `num_threads` in the model file; we clear it so the same sample gives the same
  bytes on any machine (the learned pieces do not depend on the thread count; a test checks that).

Training text comes through `sentence_iterator`: no copy of the corpus is written anywhere.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator

from llmpipe.errors import UserError
from llmpipe.tokenizer.sentencepiece_bpe import SPECIAL_TOKENS, split_for_encoding

# Documents are fed as segments cut before a space (see sentencepiece_bpe.py), at most this many
# characters, so SentencePiece's sentence length limit (bytes) never drops text: 4 bytes per character
# at most.
TRAIN_SEGMENT_CHARS = 2000
MAX_SENTENCE_BYTES = 4 * TRAIN_SEGMENT_CHARS
CONTROL_SYMBOLS = [SPECIAL_TOKENS[name] for name in ("system", "user", "assistant", "end_of_turn")]
RESERVED_PIECES = len(SPECIAL_TOKENS) + 256  # special tokens + byte-fallback pieces


def training_sentences(text: str) -> Iterator[str]:
    """One document -> the sentences SentencePiece trains on (segments of <= TRAIN_SEGMENT_CHARS)."""
    for segment in split_for_encoding(text, TRAIN_SEGMENT_CHARS // 2):
        for start in range(0, len(segment), TRAIN_SEGMENT_CHARS):  # a long run without spaces
            yield segment[start:start + TRAIN_SEGMENT_CHARS]


def trainer_options(vocab_size: int, character_coverage: float, num_threads: int) -> dict:
    return dict(
        model_type="bpe", vocab_size=vocab_size, character_coverage=character_coverage,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece=SPECIAL_TOKENS["unk"], bos_piece=SPECIAL_TOKENS["bos"], eos_piece=SPECIAL_TOKENS["eos"],
        pad_piece=SPECIAL_TOKENS["pad"], control_symbols=CONTROL_SYMBOLS,
        # We sample ourselves (deterministically, by document id): SentencePiece takes every sentence.
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=MAX_SENTENCE_BYTES,
        hard_vocab_limit=True, num_threads=num_threads, minloglevel=2,
    )


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, character_coverage: float,
                        num_threads: int, sample: str = "the training sample") -> bytes:
    """Train on `sentences`; returns the model file's bytes. Rejections become UserErrors that say
    which params.yaml key to change; `sample` describes the data in those messages."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buffer,
                                       **trainer_options(vocab_size, character_coverage, num_threads))
    except RuntimeError as exc:
        raise _explain(str(exc), vocab_size, sample) from None
    return canonical_model(buffer.getvalue())


def canonical_model(model: bytes) -> bytes:
    """Drop the thread count from the stored trainer settings: equal pieces -> equal bytes."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.trainer_spec.ClearField("num_threads")
    return proto.SerializeToString(deterministic=True)


def _explain(message: str, vocab_size: int, sample: str) -> UserError:
    """SentencePiece's RuntimeError -> a UserError naming the params.yaml key and the fix."""
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message):
        return UserError(
            f"Vocabulary size too high ({m[1]}): {sample} only supports {m[2]} pieces. Lower "
            f"tokenizer.vocab_size in params.yaml to at most {m[2]}, or add data (or raise "
            f"tokenizer.train_max_chars if the sample was capped)")
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message):
        return UserError(
            f"tokenizer.vocab_size={m[1]} is too small: {RESERVED_PIECES} reserved pieces (special tokens and "
            f"256 byte pieces) plus the characters kept by tokenizer.character_coverage need {m[2]}. Raise "
            f"tokenizer.vocab_size in params.yaml to at least {m[2]} (a few thousand for useful merges), "
            f"or lower tokenizer.character_coverage")
    if "sentences_.empty()" in message:
        return UserError(f"no training text: {sample} is empty. Check that its documents have text "
                          f"(re-run the data stages)")
    return UserError(f"SentencePiece rejected the tokenizer settings in params.yaml: {message}")


def train_reference_bpe(sentences: Iterable[str], vocab_size: int):
    """A Hugging Face `tokenizers` byte-level BPE (GPT-2 style) of the same vocabulary size and
    special tokens: the yardstick for our compression. Returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences, trainer)
    return tok


def count_reference_tokens(tok, texts: list[str]) -> int:
    """Tokens the reference BPE needs for `texts`. Its pre-tokenizer never joins a non-space with
    the space after it either, so the same exact segment split keeps long documents fast."""
    segments = [s for text in texts for s in split_for_encoding(text)]
    return sum(len(e.ids) for e in tok.encode_batch(segments, add_special_tokens=False)) if segments else 0
