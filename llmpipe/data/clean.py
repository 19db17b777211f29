"""The clean stage: ingest's documents (data/raw) -> chunks (data/clean, + quarantine), one shard per input shard.

Per document: HTML -> text, Unicode/whitespace normalization, Project Gutenberg header/footer removal
(all whole-document operations), then the document is split into chunks on paragraph boundaries of at
most `chunk_chars` characters. Per chunk: PII scrubbing, quality filters, repetition filters, toxicity.

THE UNIT AFTER CLEAN IS THE CHUNK. Every chunk is a record with its own content id and meta
{parent_id, chunk_index, chunk_count, ...the document's meta}. Accounting is at chunk level: `read`
counts the chunks produced, and each of them is either kept or rejected with a reason, so
`read == kept + rejected` holds per source. A document that is empty after normalization yields one
empty chunk, rejected as `empty`, so no input document disappears without a quarantine row.
Documents are counted on the side: `documents_in` (input records) and `documents_out` (those with
at least one kept chunk).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from llmpipe.config import StageConfig, params_hash
from llmpipe.data.accounting import Counts, Record, RecordShardWriter, content_id, read_records
from llmpipe.data.filters import GopherQuality, GopherRepetition, QualityConfig
from llmpipe.data.normalize import HtmlToText, Normalize, StripGutenberg
from llmpipe.data.pii import PIIConfig, ScrubPII
from llmpipe.data.report import publish_report
from llmpipe.data.shards import ShardTask, describe_throughput, run_shards, shard_paths, throughput_metrics
from llmpipe.data.steps import Reject, Step
from llmpipe.data.toxicity import ToxicityConfig, ToxicityFilter
from llmpipe.errors import UserError
from llmpipe.io import sha256_file

if TYPE_CHECKING:
    from llmpipe.stages import StageContext


class CleanConfig(StageConfig):
    chunk_chars: int = Field(4000, ge=200, description="max characters of a chunk (paragraphs are packed up to it)")
    html: Literal["auto", "always", "never"] = Field("auto", description="convert HTML to text (auto: detected pages)")
    strip_gutenberg: bool = Field(True, description="remove Project Gutenberg license headers/footers")
    quality: QualityConfig = Field(default_factory=QualityConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)
    toxicity: ToxicityConfig = Field(default_factory=ToxicityConfig)


# -- chunking ------------------------------------------------------------------------------------------

_CHUNK_SEPARATORS = ("\n\n", "\n", " ")  # paragraphs, then lines, then words; then a hard cut


def split_chunks(text: str, max_chars: int, level: int = 0) -> list[str]:
    """Greedily pack paragraphs into chunks of at most `max_chars`; a longer paragraph is split on
    lines (a longer line on spaces, a longer word by a hard cut). An empty text gives one empty chunk."""
    sep = _CHUNK_SEPARATORS[level]
    chunks: list[str] = []
    current: list[str] = []
    size = -len(sep)  # length of sep.join(current)
    for part in text.split(sep):
        if len(part) > max_chars:
            if current:
                chunks.append(sep.join(current))
            if level + 1 < len(_CHUNK_SEPARATORS):
                pieces = split_chunks(part, max_chars, level + 1)
            else:
                pieces = [part[i:i + max_chars] for i in range(0, len(part), max_chars)]
            chunks += pieces[:-1]
            current, size = [pieces[-1]], len(pieces[-1])  # the tail may share a chunk with what follows
            continue
        if current and size + len(sep) + len(part) > max_chars:
            chunks.append(sep.join(current))
            current, size = [], -len(sep)
        current.append(part)
        size += len(sep) + len(part)
    chunks.append(sep.join(current))
    return chunks


# -- the step pipeline ---------------------------------------------------------------------------------

class CleanPipeline:
    """Document steps (transforms), the chunker, then chunk steps (transforms or filters) in order."""

    def __init__(self, cfg: CleanConfig, root: Path) -> None:
        self.chunk_chars = cfg.chunk_chars
        self.doc_steps = [HtmlToText(cfg.html), Normalize()] + ([StripGutenberg()] if cfg.strip_gutenberg else [])
        self.chunk_steps: list[Step] = [ScrubPII(cfg.pii)] if cfg.pii.types else []
        self.chunk_steps += [GopherQuality(cfg.quality), GopherRepetition(cfg.quality)]
        if cfg.toxicity.threshold < 1:
            self.chunk_steps.append(ToxicityFilter(cfg.toxicity, root))

    def __call__(self, doc: Record) -> Iterator[tuple[Record, Reject | None]]:
        """Yield (chunk, None) for kept chunks and (chunk, Reject) for rejected ones."""
        for step in self.doc_steps:
            doc = step(doc)
        texts = split_chunks(doc.text, self.chunk_chars)
        for index, text in enumerate(texts):
            chunk = Record("", doc.source, text,
                           {**doc.meta, "parent_id": doc.id, "chunk_index": index, "chunk_count": len(texts)})
            verdict = Reject("empty", "no text left after normalization") if not text else None
            for step in self.chunk_steps if verdict is None else ():
                out = step(chunk)
                if isinstance(out, Reject):
                    verdict = out
                    break
                chunk = out
            yield dataclasses.replace(chunk, id=content_id(chunk.text)), verdict

    def stats(self) -> Counter:
        return Counter({f"{step.name}.{key}": n for step in self.doc_steps + self.chunk_steps
                        for key, n in step.stats.items()})


def clean_shard(task: ShardTask, *, cfg: CleanConfig, root: Path) -> Counts:
    """Clean one input shard into one output shard and one quarantine shard."""
    pipeline, counts, docs = CleanPipeline(cfg, root), Counts(), Counter()
    (path,) = task.inputs
    with RecordShardWriter(task.output, task.quarantine) as writer:
        for doc in read_records(Path(path)):
            docs["documents_in", doc.source] += 1
            counts.stats["input_bytes"] += len(doc.text.encode("utf-8", "surrogatepass"))
            kept = 0
            for chunk, verdict in pipeline(doc):
                counts.on_read(chunk.source, len(chunk.text))
                if verdict is None:
                    writer.keep(chunk)
                    counts.on_kept(chunk.source, len(chunk.text))
                    kept += 1
                else:
                    writer.reject(chunk, verdict.reason, verdict.detail)
                    counts.on_rejected(chunk.source, verdict.reason, len(chunk.text))
            docs["documents_out", doc.source] += kept > 0
    counts.stats.update(pipeline.stats())
    for (name, source), n in docs.items():
        counts.stats[name] += n
        counts.stats[f"{name}[{source}]"] += n  # per source, for the report (kept out of the metrics)
    return counts


# -- the stage -----------------------------------------------------------------------------------------

def run(cfg: CleanConfig, ctx: StageContext) -> dict[str, float]:
    in_dir, out_dir = ctx.input("raw"), ctx.output("clean")
    tasks = clean_tasks(cfg, ctx, in_dir, out_dir)
    process = functools.partial(clean_shard, cfg=cfg, root=ctx.root)
    shards = run_shards(tasks, process, out_dir=out_dir, workers=ctx.workers, stage="clean")
    counts = shards.counts
    metrics = {k: v for k, v in counts.metrics().items() if "[" not in k}
    metrics.update(chunks_out=float(sum(counts.kept.values())), **throughput_metrics(shards))
    publish_report(ctx, counts, out_dir, extra=_report_extra(counts))
    ctx.log.info("clean: %d documents -> %d of %d chunks kept; %s", counts.stats["documents_in"],
                 metrics["chunks_out"], sum(counts.read.values()), describe_throughput(metrics))
    return metrics


def clean_tasks(cfg: CleanConfig, ctx: StageContext, in_dir: Path, out_dir: Path) -> list[ShardTask]:
    """One task per input shard, fingerprinted by the params, the code, the scorer's files and the shard."""
    inputs = sorted(in_dir.glob("part-*.parquet"))
    if not inputs:
        raise UserError(f"{in_dir}: no part-*.parquet shards; run the ingest stage first (llmpipe stage ingest)")
    # Files a plugged-in scorer reads (a word list, a model) count like code: edit one, redo the shards.
    scorer_files = [sha256_file(ctx.root / v) for v in cfg.toxicity.scorer_args.values()
                    if isinstance(v, str) and (ctx.root / v).is_file()]
    # The code fingerprint: when DVC reruns clean because its code changed, no shard of the old code counts as done.
    base = f"{params_hash(cfg)}:{ctx.code_fingerprint}:{','.join(scorer_files)}"
    tasks = []
    for index, path in enumerate(inputs):
        fingerprint = hashlib.sha256(f"{base}:{path.name}:{sha256_file(path)}".encode()).hexdigest()[:16]
        tasks.append(ShardTask(index, (str(path),), *shard_paths(out_dir, index), fingerprint))
    return tasks


def _report_extra(counts: Counts) -> str:
    s = counts.stats
    sources = sorted({k[k.index("[") + 1:-1] for k in s if k.startswith("documents_in[")})
    lines = ["## Unit: the chunk", "",
             "Records above are **chunks**: each document is split on paragraph boundaries into chunks, and "
             "`read = kept + rejected` counts chunks. Documents are counted here: a document is *out* when at "
             "least one of its chunks is kept.", "",
             "| source | documents in | documents out |", "|---|---:|---:|"]
    lines += [f"| {src} | {s[f'documents_in[{src}]']:,} | {s[f'documents_out[{src}]']:,} |" for src in sources]
    lines += ["", "## Transforms", "", "| counter | value |", "|---|---:|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in sorted(s.items())
              if k.split(".")[0] in ("html", "normalize", "gutenberg", "pii")]
    return "\n".join(lines)  # no timings here: the report is a DVC output and must not change on a rerun
