"""Readable reports for the data stages: a markdown page with per-source accounting, reject reasons
and length distributions (PNG plots), written next to the stage's output and logged to the tracker
by `publish_report`, the one way a data stage reports.

The report is part of the stage's DVC output, so it holds no timings: a rerun that redoes nothing
must leave the output's hash as it was. Throughput goes to the metrics and the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmpipe.data.accounting import LENGTH_BINS, Counts
from llmpipe.io import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

PLOTS = ("lengths.png", "reject_reasons.png")


def publish_report(ctx: StageContext, counts: Counts, out_dir: Path, extra: str = "",
                   also: Sequence[Path] = ()) -> Path:
    """Write the stage's report and plots into `out_dir` and log them, and the files `also`, to the
    tracker as the `<stage>_report` artifacts; returns the report's path."""
    report = write_report(ctx.name, counts, out_dir, extra=extra)
    for artifact in (report, *(out_dir / plot for plot in PLOTS), *also):
        ctx.tracker.log_artifact(artifact, f"{ctx.name}_report")
    return report


def write_report(stage: str, counts: Counts, out_dir: Path, extra: str = "") -> Path:
    """Write `<out_dir>/report.md` (+ plots) and return its path. `extra` is appended markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lengths_png, reasons_png = (out_dir / plot for plot in PLOTS)
    _plot_lengths(counts, lengths_png, stage)
    _plot_reasons(counts, reasons_png, stage)
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
