"""Toxicity filter: any `ToxicityScorer` (score(text) -> float in [0, 1]) behind one threshold.

The default `WordListScorer` scores the fraction of words found in a small shipped list
(`resources/toxic_words.txt`); a classifier plugs in through `toxicity.scorer` (a dotted path
"package.module:Class", constructed with `toxicity.scorer_args`). The threshold is on the scorer's own
scale: a fraction of words for the word list, a probability for a typical classifier.
"""

from __future__ import annotations

import importlib
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import Field

from llmpipe.config import StageConfig
from llmpipe.data.accounting import Record
from llmpipe.data.steps import Reject
from llmpipe.errors import UserError

DEFAULT_SCORER = "llmpipe.data.toxicity:WordListScorer"
# UTF-8 bytes -> lowercase ASCII letters, other ASCII -> space, non-ASCII bytes kept (inside words):
# then bytes.split() tokenizes several times faster than a regex over str.
_WORD_BYTES = bytes(b + 32 if 65 <= b <= 90 else b if 97 <= b <= 122 or b >= 128 else 32 for b in range(256))


@runtime_checkable
class ToxicityScorer(Protocol):
    def score(self, text: str) -> float: ...


def default_words_path() -> Path:
    return Path(str(resources.files("llmpipe.data") / "resources" / "toxic_words.txt"))


class WordListScorer:
    """Fraction of the text's words (runs of letters, lowercased) that are on the list."""

    def __init__(self, words_path: str | Path | None = None) -> None:
        path = Path(words_path) if words_path else default_words_path()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UserError(f"toxicity word list {path} not found: fix clean.toxicity.scorer_args.words_path "
                            f"in params.yaml") from None
        self.words = frozenset(w.strip().lower().encode() for w in lines if w.strip() and not w.startswith("#"))

    def score(self, text: str) -> float:
        words = text.encode("utf-8", "surrogatepass").translate(_WORD_BYTES).split()
        found = self.words.intersection(words)  # C-speed; nearly always empty
        if not found:
            return 0.0
        return sum(words.count(w) for w in found) / len(words)


def load_scorer(target: str, args: dict[str, Any], root: Path) -> ToxicityScorer:
    """Import "module:Class" (or "module.Class") and construct it with `args`."""
    module, sep, attr = target.partition(":")
    if not sep:
        module, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"clean.toxicity.scorer in params.yaml: cannot import '{target}' ({exc}); give "
                        f"'package.module:Class' of an installed package") from None
    if isinstance(args.get("words_path"), str) and not Path(args["words_path"]).is_absolute():
        args = {**args, "words_path": str(root / args["words_path"])}  # project paths, never the cwd
    scorer = cls(**args)
    if not isinstance(scorer, ToxicityScorer):
        raise UserError(f"clean.toxicity.scorer in params.yaml: {target} has no score(text) -> float method; "
                        f"give a class that has one")
    return scorer


class ToxicityConfig(StageConfig):
    scorer: str = Field(DEFAULT_SCORER, description="dotted path of a ToxicityScorer class")
    scorer_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the scorer")
    threshold: float = Field(0.01, ge=0, le=1, description="reject when score > threshold; 1 turns the filter off")


class ToxicityFilter:
    name = "toxicity"

    def __init__(self, cfg: ToxicityConfig, root: Path) -> None:
        self.scorer = load_scorer(cfg.scorer, dict(cfg.scorer_args), root)
        self.threshold = cfg.threshold
        self.stats: Counter = Counter(scored=0, nonzero=0)

    def __call__(self, record: Record) -> Record | Reject:
        score = float(self.scorer.score(record.text))
        self.stats["scored"] += 1
        self.stats["nonzero"] += score > 0
        if score > self.threshold:
            return Reject("toxicity", f"score {score:.4f} > threshold {self.threshold}")
        return record
