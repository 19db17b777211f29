"""The `tokenizer` stage: train a SentencePiece BPE tokenizer on the deduplicated corpus, then encode
the corpus into train/val token shards. Its paths come from the registry (llmpipe.stages); the roles
it asks for by name are in brackets:

    [dedup] data/dedup/part-*.parquet ─▶ [tokenizer] models/tokenizer/{tokenizer.model, tokenizer.json}
                                      ─▶ [tokens] data/tokens/{train,val}/{shard-*.bin, meta.json}

Split: a document goes to val when hash(id) < tokenizer.val_ratio (see encode.is_val), so the split
never changes when other documents come or go. The tokenizer trains on train-split documents only
(a deterministic sample of about tokenizer.train_max_chars characters), so val bytes-per-token is an
honest measure of compression on unseen text; a Hugging Face byte-level BPE trained on the same
sample is the yardstick.

Both outputs are built in temp directories and renamed into place. A finished tokenizer whose
fingerprint (settings, sample, input hash, and the stage's code fingerprint: every file dvc.yaml lists
as its code) matches is reused on rerun, so a crash while encoding does not cost the training again,
while an edit of the stage's code trains anew. Encoding is redone whole on every run, so it has no
fingerprint of its own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.errors import UserError
from llmpipe.io import atomic_path, read_json, remove_temp_leftovers, sha256_file, write_json_atomic
from llmpipe.tokenizer import encode, train
from llmpipe.tokenizer.sentencepiece_bpe import MODEL_FILE, SPECIAL_TOKENS, TOKENIZER_META_FILE, Tokenizer
from llmpipe.tokenizer.shards import SPLIT_META_FILE

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

TOKENIZER_FORMAT = "llmpipe.tokenizer/1"


class TokenizerConfig(StageConfig):
    """The `tokenizer` section of params.yaml."""

    vocab_size: int = Field(4096, ge=1, le=2**31 - 1, description="pieces incl. 8 special tokens and 256 bytes")
    val_ratio: float = Field(0.05, gt=0, lt=1, description="fraction of documents (by id hash) in the val split")
    train_max_chars: int = Field(100_000_000, ge=1, description="about how many characters to train on")
    character_coverage: float = Field(0.9995, gt=0, le=1,
                                      description="share of characters that get their own piece; rarer ones use bytes")
    shard_tokens: int = Field(100_000_000, ge=1, description="max tokens per shard file")
    reference: bool = Field(True, description="train a Hugging Face byte-level BPE to compare compression with")


class TrainingSample:
    """The train-split documents the tokenizer learns from: those with hash(id) < fraction, about
    `max_chars` characters in all. Iterating yields SentencePiece sentences and records a hash and
    counts of what was yielded; any two iterations yield the same. `source` names the input in messages."""

    def __init__(self, files: list[Path], val_ratio: float, max_chars: int, source: str):
        import pyarrow.compute as pc

        from llmpipe.io import iter_parquet_batches

        self.files, self.val_ratio, self.source = files, val_ratio, source
        self.corpus_documents = self.val_documents = self.train_chars = 0
        for file in files:
            encode.check_schema(file)
            for batch in iter_parquet_batches(file, batch_size=4096, columns=["id", "text"]):
                lengths = pc.utf8_length(batch.column(1)).to_pylist()
                for doc_id, length in zip(batch.column(0).to_pylist(), lengths):
                    self.corpus_documents += 1
                    if encode.is_val(doc_id, val_ratio):
                        self.val_documents += 1
                    else:
                        self.train_chars += length or 0
        self.fraction = min(1.0, max_chars / self.train_chars) if self.train_chars else 1.0
        self.documents = self.chars = self.sentences = 0
        self.hash = ""

    def __iter__(self):
        digest = hashlib.sha256()
        documents = chars = sentences = 0
        for ids, texts in encode.iter_documents(self.files):
            for doc_id, text in zip(ids, texts):
                if encode.is_val(doc_id, self.val_ratio) or encode.unit_hash(doc_id, "sample") >= self.fraction:
                    continue
                digest.update(doc_id.encode() + b"\0" + text.encode() + b"\0")
                documents += 1
                chars += len(text)
                for sentence in train.training_sentences(text):
                    sentences += 1
                    yield sentence
        self.documents, self.chars, self.sentences, self.hash = documents, chars, sentences, digest.hexdigest()

    def __str__(self) -> str:
        return (f"the training sample ({self.chars:,} characters in {self.documents:,} train-split documents "
                f"of {self.corpus_documents:,} in {self.source})")


class ReferenceBPE:
    """The yardstick: a Hugging Face byte-level BPE of equal vocabulary trained on the same sample.

    Called with each batch of val texts (encode_corpus's `val_hook`), it counts its own tokens for
    them; the time that takes is kept apart, so encode_time_s measures our encoding alone."""

    def __init__(self, sample: TrainingSample, vocab_size: int):
        started = time.perf_counter()
        self.bpe = train.train_reference_bpe(iter(sample), vocab_size)
        self.train_seconds = time.perf_counter() - started
        self.val_tokens = 0
        self.count_seconds = 0.0

    def __call__(self, texts: list[str]) -> None:
        started = time.perf_counter()
        self.val_tokens += train.count_reference_tokens(self.bpe, texts)
        self.count_seconds += time.perf_counter() - started

    def metrics(self, val: encode.SplitStats, bytes_per_token_val: float) -> dict[str, float]:
        bytes_per_token = val.bytes / max(self.val_tokens, 1)
        return {"ref_train_time_s": self.train_seconds, "ref_bytes_per_token_val": bytes_per_token,
                "compression_vs_ref": bytes_per_token_val / bytes_per_token}


def run(cfg: TokenizerConfig, ctx: StageContext) -> dict[str, float]:
    """Check the input, train (or reuse) the tokenizer and its yardstick, encode the shards, measure."""
    input_dir, model_dir, tokens_dir = ctx.input("dedup"), ctx.output("tokenizer"), ctx.output("tokens")
    remove_temp_leftovers(model_dir, tokens_dir)
    files = _input_files(input_dir)
    source_hash = encode.source_hash(files)
    sample = TrainingSample(files, cfg.val_ratio, cfg.train_max_chars, source=_shown(ctx, input_dir))
    _check_corpus(cfg, sample)

    metrics = _train_or_reuse(cfg, ctx, sample, source_hash, model_dir)
    tok = Tokenizer.load(model_dir)
    info = read_json(model_dir / TOKENIZER_META_FILE)
    reference = _train_reference(cfg, sample, info)
    stats, encode_seconds = _encode(cfg, ctx, tok, files, source_hash, tokens_dir, reference)
    _log_artifacts(ctx, [model_dir / MODEL_FILE, model_dir / TOKENIZER_META_FILE,
                         *(tokens_dir / split / SPLIT_META_FILE for split in encode.SPLITS)])

    metrics |= _quality_metrics(tok, info, stats) | _throughput_metrics(stats, encode_seconds)
    if reference is not None:
        metrics.update(reference.metrics(stats["val"], metrics["bytes_per_token_val"]))
    ctx.log.info("val: %.3f bytes/token (reference %.3f), byte fallback %.4f, vocab used %.3f",
                 metrics["bytes_per_token_val"], metrics.get("ref_bytes_per_token_val", float("nan")),
                 metrics["byte_fallback_rate_val"], metrics["vocab_utilization_val"])
    return metrics


def _input_files(input_dir: Path) -> list[Path]:
    files = encode.input_files(input_dir)
    if not files:
        raise UserError(f"{input_dir} has no part-*.parquet files: run the dedup stage first (dvc repro dedup)")
    return files


def _shown(ctx: StageContext, path: Path) -> str:
    """A project path as messages show it: relative to the project root, as in dvc.yaml."""
    return path.relative_to(ctx.root).as_posix()


def _train_or_reuse(cfg: TokenizerConfig, ctx: StageContext, sample: TrainingSample, source_hash: str,
                    model_dir: Path) -> dict[str, float]:
    """Write the tokenizer output (temp dir, then rename) unless a finished one has our fingerprint."""
    options = train.trainer_options(cfg.vocab_size, cfg.character_coverage, num_threads=0)
    del options["num_threads"], options["minloglevel"]  # how, not what: not part of the result
    fingerprint = _fingerprint(cfg, options, source_hash, ctx.code_fingerprint)
    if _reusable(model_dir, fingerprint):
        ctx.log.info("reusing %s: trained with the same settings on the same input", model_dir)
        return {"tokenizer_reused": 1.0, "train_time_s": 0.0}
    started = time.perf_counter()
    model = train.train_sentencepiece(sample, cfg.vocab_size, cfg.character_coverage, ctx.workers, sample)
    seconds = time.perf_counter() - started
    ctx.log.info("trained %d pieces on %s in %.1f s", cfg.vocab_size, sample, seconds)
    with atomic_path(model_dir) as tmp:
        tmp.mkdir()
        (tmp / MODEL_FILE).write_bytes(model)
        meta = _tokenizer_meta(cfg, options, sample, source_hash, fingerprint, sha256_file(tmp / MODEL_FILE))
        write_json_atomic(tmp / TOKENIZER_META_FILE, meta)
    return {"tokenizer_reused": 0.0, "train_time_s": seconds}


def _train_reference(cfg: TokenizerConfig, sample: TrainingSample, info: dict) -> ReferenceBPE | None:
    """The reference BPE (when tokenizer.reference is on), trained on a second pass over the sample,
    which must hash as the pass the tokenizer was trained on did (recorded in tokenizer.json)."""
    if not cfg.reference:
        return None
    reference = ReferenceBPE(sample, cfg.vocab_size)
    if sample.hash != info["training_data_hash"]:
        raise RuntimeError(f"{sample} hashes to {sample.hash[:12]} on this pass, {info['training_data_hash'][:12]} "
                           f"when the tokenizer was trained: {sample.source} changed while the stage ran (rerun "
                           f"the tokenizer stage), or the sample is not deterministic (a bug in llmpipe)")
    return reference


def _encode(cfg: TokenizerConfig, ctx: StageContext, tok: Tokenizer, files: list[Path], source_hash: str,
            tokens_dir: Path, reference: ReferenceBPE | None) -> tuple[dict[str, encode.SplitStats], float]:
    """Encode every document into train/val shards (round trip checked on val); returns the split
    statistics and the seconds our encoding took (the reference's counting excluded).

    Shards made by another tokenizer go first: if encoding fails, no mismatched pair is left at the
    final paths."""
    _remove_tokens_of_other_tokenizers(tokens_dir, tok.hash, ctx)
    started = time.perf_counter()
    with atomic_path(tokens_dir) as tmp:
        tmp.mkdir()
        stats = encode.encode_corpus(tok, files, tmp, cfg.val_ratio, cfg.shard_tokens, ctx.workers,
                                     meta={"source_hash": source_hash}, val_hook=reference)
    seconds = time.perf_counter() - started - (reference.count_seconds if reference is not None else 0.0)
    return stats, seconds


def _remove_tokens_of_other_tokenizers(tokens_dir: Path, tokenizer_hash: str, ctx: StageContext) -> None:
    metas = [tokens_dir / split / SPLIT_META_FILE for split in encode.SPLITS]
    if tokens_dir.exists() and any(not m.exists() or read_json(m).get("tokenizer_hash") != tokenizer_hash
                                   for m in metas):
        ctx.log.info("removing %s: made by another tokenizer", tokens_dir)
        shutil.rmtree(tokens_dir)


def _log_artifacts(ctx: StageContext, paths: list[Path]) -> None:
    for path in paths:
        ctx.tracker.log_artifact(path, artifact_path=path.parent.relative_to(ctx.root).as_posix())


def _quality_metrics(tok: Tokenizer, info: dict, stats: dict[str, encode.SplitStats]) -> dict[str, float]:
    train_st, val_st = stats["train"], stats["val"]
    val_content = val_st.tokens - val_st.documents  # eos tokens excluded: compare like with like
    train_content = train_st.tokens - train_st.documents
    return dict(
        vocab_size=tok.vocab_size,
        train_sample_documents=info["training_data"]["documents"],
        train_sample_chars=info["training_data"]["characters"],
        train_documents=train_st.documents, val_documents=val_st.documents,
        train_tokens=train_st.tokens, val_tokens=val_st.tokens,
        train_bytes=train_st.bytes, val_bytes=val_st.bytes,
        bytes_per_token_val=val_st.bytes / max(val_content, 1),  # UTF-8 bytes per token: higher compresses better
        # share of all vocab_size ids (specials and the 256 byte pieces included) that occur at least once
        vocab_utilization_val=float((val_st.id_counts > 0).mean()),
        vocab_utilization_train=float((train_st.id_counts > 0).mean()),
        # share of tokens that are byte-fallback pieces (characters the vocabulary does not cover)
        byte_fallback_rate_val=val_st.byte_tokens / max(val_content, 1),
        byte_fallback_rate_train=train_st.byte_tokens / max(train_content, 1),
        # every val document was decoded and compared with its text (a mismatch stops the stage)
        roundtrip_checked_documents=val_st.roundtrip_checked,
    )


def _throughput_metrics(stats: dict[str, encode.SplitStats], seconds: float) -> dict[str, float]:
    """encode_mb_per_s: UTF-8 megabytes (1e6 bytes) of document text per second of encode_time_s,
    which covers reading, encoding, writing and the val round trip."""
    text_bytes = sum(st.bytes for st in stats.values())
    return {"encode_time_s": seconds, "encode_mb_per_s": text_bytes / 1e6 / max(seconds, 1e-9)}


def _check_corpus(cfg: TokenizerConfig, sample: TrainingSample) -> None:
    """Stop early, with what to change, on input the tokenizer cannot be trained or evaluated on."""
    where = f"{sample.source} ({len(sample.files)} part files)"
    if sample.corpus_documents == 0:
        raise UserError(f"{where} holds no documents: the corpus is empty. Check the ingest sources "
                         "and the clean/dedup settings, then re-run the data stages")
    if sample.train_chars == 0:
        raise UserError(f"the train split of {where} has no text ({sample.corpus_documents - sample.val_documents} "
                         f"documents, all empty or in val): lower tokenizer.val_ratio in params.yaml or add data")
    if sample.val_documents == 0:
        raise UserError(f"tokenizer.val_ratio={cfg.val_ratio} put none of the {sample.corpus_documents} documents "
                         f"of {where} into the val split: raise tokenizer.val_ratio in params.yaml or add data")


def _fingerprint(cfg: TokenizerConfig, options: dict, source_hash: str, code: str) -> str:
    import sentencepiece

    data = {"options": options, "val_ratio": cfg.val_ratio, "train_max_chars": cfg.train_max_chars,
            "source_hash": source_hash, "sentencepiece": sentencepiece.__version__,
            "code": code, "format": TOKENIZER_FORMAT}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _reusable(model_dir: Path, fingerprint: str) -> bool:
    meta_file, model_file = model_dir / TOKENIZER_META_FILE, model_dir / MODEL_FILE
    if not (meta_file.exists() and model_file.exists()):
        return False
    meta = read_json(meta_file)
    return meta.get("fingerprint") == fingerprint and meta.get("hash") == sha256_file(model_file)


def _tokenizer_meta(cfg: TokenizerConfig, options: dict, sample: TrainingSample, source_hash: str,
                    fingerprint: str, model_hash: str) -> dict:
    """tokenizer.json: what the model is, how it was trained, on what. No timings: same input, same bytes."""
    import sentencepiece

    ids = {name: i for i, name in enumerate(SPECIAL_TOKENS)}  # train.trainer_options fixes ids 0..7
    return {
        "format": TOKENIZER_FORMAT, "model_file": MODEL_FILE, "type": "sentencepiece-bpe",
        "vocab_size": cfg.vocab_size, "hash": model_hash,
        "special_tokens": {name: {"piece": piece, "id": ids[name]} for name, piece in SPECIAL_TOKENS.items()},
        "training_params": {**options, "val_ratio": cfg.val_ratio, "train_max_chars": cfg.train_max_chars,
                            "sentencepiece_version": sentencepiece.__version__},
        "training_data_hash": sample.hash, "source_hash": source_hash,
        "training_data": {"documents": sample.documents, "characters": sample.chars, "sentences": sample.sentences,
                          "sample_fraction": sample.fraction},
        "fingerprint": fingerprint,
    }
