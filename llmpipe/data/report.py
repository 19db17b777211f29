"""Readable reports for the data stages: a markdown page with per-source accounting, reject reasons
and length distributions (PNG plots), logged as an MLflow artifact by each stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmpipe.data.accounting import LENGTH_BINS, Counts
from llmpipe.io import atomic_path, write_text_atomic


def write_report(stage: str, counts: Counts, out_dir: Path, extra: str = "") -> Path:
    """Write `<out_dir>/report.md` (+ plots) and return its path. `extra` is appended markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_lengths(counts, out_dir / "lengths.png", stage)
    _plot_reasons(counts, out_dir / "reject_reasons.png", stage)
    lines = [f"# {stage}: data report", "",
             f"Read {sum(counts.read.values()):,} records ({counts.chars_read:,} characters); kept "
             f"{sum(counts.kept.values()):,} ({counts.chars_kept:,} characters); rejected {counts.rejected_total():,}.",
             "", "## Per source", "", "| source | read | kept | rejected | top reasons |", "|---|---:|---:|---:|---|"]
    for source in sorted(counts.read):
        reasons = counts.rejected.get(source, {})
        top = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:3])
        lines.append(f"| {source} | {counts.read[source]:,} | {counts.kept[source]:,} | "
                     f"{counts.rejected_total(source):,} | {top} |")
    lines += ["", "## Reject reasons", "", "| reason | records |", "|---|---:|"]
    lines += [f"| {reason} | {n:,} |" for reason, n in counts.reasons().most_common()]
    lines += ["", "![lengths](lengths.png)", "", "![reject reasons](reject_reasons.png)", ""]
    if extra:
        lines += [extra, ""]
    path = out_dir / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def _plot_lengths(counts: Counts, path: Path, stage: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    centers = np.maximum(LENGTH_BINS, 1)
    for hist, label in ((counts.length_hist_kept, "kept"), (counts.length_hist_rejected, "rejected")):
        if hist.sum():
            ax.step(centers, hist, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("record length (characters)")
    ax.set_ylabel("records")
    ax.set_title(f"{stage}: length distribution")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    _save(fig, path)


def _plot_reasons(counts: Counts, path: Path, stage: str) -> None:
    plt = _pyplot()
    reasons = counts.reasons().most_common()
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(reasons), 2) + 1))
    ax.barh([r for r, _ in reasons][::-1], [n for _, n in reasons][::-1])
    ax.set_xlabel("records rejected")
    ax.set_title(f"{stage}: reject reasons" + ("" if reasons else " (none)"))
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
