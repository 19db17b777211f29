"""The `tokenizer` stage (tokenizer.py) and its public interface: `Tokenizer` (sentencepiece_bpe.py;
train.py trains it) and the token shards (shards.py; encode.py writes them).

Kept light on purpose: the training loop imports `llmpipe.tokenizer.shards` (numpy only) on GPU
machines without sentencepiece, so nothing here is imported until it is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Tokenizer", "open_split", "TokenSplit"]


def __getattr__(name: str) -> Any:
    if name == "Tokenizer":
        from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer

        return Tokenizer
    if name in ("open_split", "TokenSplit"):
        from llmpipe.tokenizer import shards

        return getattr(shards, name)
    raise AttributeError(f"module 'llmpipe.tokenizer' has no attribute {name!r}")
