"""Fixtures for the chat data tests: a tiny tokenizer (trained in-process, about a second), throwaway
projects, a miniature chitchat wheel with the real one's layout, and the `chat_data` registry entry.

Import the fixtures into a test module (`from tests.finetune.chat_fixtures import *`): a conftest.py
here would be shared with the other fine-tuning tests.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer
from tests.tokenizer.synthetic import make_corpus, write_small_tokenizer

WHEEL = "data/sources/chitchat_dataset-0.9.0-py3-none-any.whl"
ALICE, BOB = "alice-uuid", "bob-uuid"


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    return write_small_tokenizer(tmp_path_factory.mktemp("chat_tokenizer"), make_corpus(200))


@pytest.fixture(scope="session")
def chat_tok(chat_tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(chat_tokenizer_dir)


@pytest.fixture
def chat_project(tmp_path, chat_tokenizer_dir) -> Path:
    """A project root with the tokenizer at models/tokenizer."""
    root = tmp_path / "project"
    shutil.copytree(chat_tokenizer_dir, root / "models" / "tokenizer")
    return root


def run_chat_data(root: Path, **settings) -> dict[str, float]:
    from llmpipe.finetune import chat_data
    from llmpipe.stages import StageContext

    cfg = chat_data.ChatDataConfig.model_validate(settings)
    return chat_data.run(cfg, StageContext(root=root, name="chat_data"))


def chitchat_message(sender: str, text: str) -> dict[str, str]:
    return {"sender": sender, "text": text, "timestamp": "2018-05-02T19:38:15Z"}


def chitchat_conversation(*groups: tuple[str, list[str]]) -> dict[str, Any]:
    """groups: (sender, [texts]) in order, each one group of the real file's `messages` list."""
    return {"messages": [[chitchat_message(s, t) for t in texts] for s, texts in groups],
            "prompt": "a prompt", "ratings": {"witty": 5}, "start": "2018-05-03T01:38:01Z"}


def make_wheel(path: Path, conversations: dict[str, Any]) -> Path:
    """A zip with the real wheel's layout: chitchat_dataset/dataset.json = {key: conversation}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("chitchat_dataset/__init__.py", "")
        wheel.writestr("chitchat_dataset/dataset.json", json.dumps(conversations))
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def conv(*contents: str, system: str | None = None) -> list[dict[str, str]]:
    """user/assistant alternating from the first content, with an optional system message first."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user" if k % 2 == 0 else "assistant", "content": c} for k, c in enumerate(contents)]
