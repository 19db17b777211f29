"""The tokenizer stage end to end on small synthetic Parquet input, through `run_stage` in a
throwaway project: outputs and their metadata, determinism, reuse after a crash, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from llmpipe.errors import UserError
from llmpipe.stages import STAGES, run_stage
from llmpipe.tokenizer import Tokenizer, encode, open_split
from llmpipe.tokenizer.encode import RoundTripError, is_val
from tests.data.code_project import code_project, edit_code
from tests.tokenizer.synthetic import doc_id, make_corpus, write_dedup_parts

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"vocab_size": 600, "val_ratio": 0.1, "train_max_chars": 1_000_000, "shard_tokens": 5000}
# metrics/tokenizer.json: each one can vary (a round-trip failure stops the stage, so it has no count)
METRICS = {
    "vocab_size", "tokenizer_reused", "train_time_s", "train_sample_documents", "train_sample_chars",
    "train_documents", "val_documents", "train_tokens", "val_tokens", "train_bytes", "val_bytes",
    "bytes_per_token_val", "vocab_utilization_val", "vocab_utilization_train", "byte_fallback_rate_val",
    "byte_fallback_rate_train", "roundtrip_checked_documents", "encode_time_s", "encode_mb_per_s",
    "ref_train_time_s", "ref_bytes_per_token_val", "compression_vs_ref",
}


def make_project(root: Path, docs: list[str], **settings) -> Path:
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenizer"] = {**SETTINGS, **settings}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_dedup_parts(root, docs)
    return root


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    monkeypatch.setenv("LLMPIPE_WORKERS", "2")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_corpus(300, seed=7)


def _outputs(root: Path) -> dict[str, bytes]:
    files = [*(root / "models" / "tokenizer").rglob("*"), *(root / "data" / "tokens").rglob("*")]
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(files) if p.is_file()}


def _documents(split) -> list[list[int]]:
    """The split's token stream cut at each eos (which follows every document)."""
    tokens = np.concatenate(split.shards).tolist()
    assert tokens[-1] == split.eos_id
    docs, start = [], 0
    for k, t in enumerate(tokens):
        if t == split.eos_id:
            docs.append(tokens[start:k])
            start = k + 1
    return docs


def test_stage_trains_and_writes_shards_that_decode_to_the_corpus(tmp_path, docs):
    root = make_project(tmp_path, docs)
    metrics = run_stage("tokenizer", root)

    tok = Tokenizer.load(root / "models" / "tokenizer")
    info = json.loads((root / "models" / "tokenizer" / "tokenizer.json").read_text())
    assert info["hash"] == tok.hash == hashlib.sha256((root / "models/tokenizer/tokenizer.model").read_bytes()).hexdigest()
    assert info["vocab_size"] == tok.vocab_size == 600
    assert info["special_tokens"]["eos"] == {"piece": "<|eos|>", "id": tok.eos_id}
    assert info["special_tokens"]["end_of_turn"]["id"] == tok.end_of_turn_id
    assert info["training_params"]["byte_fallback"] is True and len(info["training_data_hash"]) == 64

    # parts are read in file order; documents go to val by the hash of their id
    in_order = [d for k in range(3) for d in docs[k::3]]
    expected = {"train": [d for d in in_order if not is_val(doc_id(d), 0.1)],
                "val": [d for d in in_order if is_val(doc_id(d), 0.1)]}
    assert 0 < len(expected["val"]) < len(expected["train"])
    for name in ("train", "val"):
        split = open_split(root / "data" / "tokens" / name)
        meta = split.meta
        assert meta["format"] == "llmpipe.tokens/1" and meta["dtype"] == "uint16" and split.dtype == np.uint16
        assert (meta["eos_id"], meta["bos_id"], meta["pad_id"], meta["vocab_size"]) == (2, 1, 3, 600)
        assert meta["tokenizer_hash"] == tok.hash and meta["source_hash"] == info["source_hash"]
        assert meta["num_documents"] == len(expected[name])
        assert meta["num_bytes"] == sum(len(d.encode()) for d in expected[name])
        assert [s["num_tokens"] for s in meta["shards"]][:-1] == [5000] * (len(meta["shards"]) - 1)
        assert tok.decode_batch(_documents(split)) == expected[name]
        assert metrics[f"{name}_tokens"] == split.num_tokens and metrics[f"{name}_documents"] == len(expected[name])
    assert len(open_split(root / "data" / "tokens" / "train").shards) > 1

    assert json.loads((root / "metrics" / "tokenizer.json").read_text()) == metrics
    assert set(metrics) == METRICS
    assert metrics["roundtrip_checked_documents"] == len(expected["val"])  # every val document, decoded again
    assert 2 < metrics["bytes_per_token_val"] < 8 and 1 < metrics["ref_bytes_per_token_val"] < 8
    assert 0.2 < metrics["vocab_utilization_val"] <= metrics["vocab_utilization_train"] <= 1
    assert 0 < metrics["byte_fallback_rate_val"] < 0.1  # the emoji and CJK extras fall back to bytes
    assert metrics["train_time_s"] > 0 and metrics["tokenizer_reused"] == 0
    assert not list(root.rglob(".tmp-*"))


def test_stage_reads_and_writes_the_paths_the_registry_declares(tmp_path, docs, monkeypatch):
    """The stage asks the registry for its paths (ctx.input/ctx.output): paths moved there move its I/O."""
    root = make_project(tmp_path, docs, reference=False)
    (root / "data" / "dedup").rename(root / "corpus")
    moved = {"inputs": {"dedup": "corpus"}, "outputs": {"tokenizer": "out/tok", "tokens": "out/tokens"}}
    monkeypatch.setitem(STAGES, "tokenizer", dataclasses.replace(STAGES["tokenizer"], **moved))
    metrics = run_stage("tokenizer", root)
    assert Tokenizer.load(root / "out" / "tok").vocab_size == 600
    assert open_split(root / "out" / "tokens" / "train").num_tokens == metrics["train_tokens"] > 0
    assert not (root / "models").exists() and not (root / "data" / "tokens").exists()


def test_stage_output_is_byte_identical_across_runs_and_thread_counts(tmp_path, docs, monkeypatch):
    root = make_project(tmp_path, docs)
    run_stage("tokenizer", root)
    first = _outputs(root)
    shutil.rmtree(root / "models")
    shutil.rmtree(root / "data" / "tokens")
    monkeypatch.setenv("LLMPIPE_WORKERS", "1")
    run_stage("tokenizer", root)
    assert _outputs(root) == first

    # a rerun (say, after a crash while encoding) reuses the finished tokenizer and gives the same bytes
    assert run_stage("tokenizer", root)["tokenizer_reused"] == 1
    assert _outputs(root) == first

    # a changed setting retrains
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenizer"]["vocab_size"] = 500
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = run_stage("tokenizer", root)
    assert metrics["tokenizer_reused"] == 0 and Tokenizer.load(root / "models" / "tokenizer").vocab_size == 500


def _assert_no_outputs(root: Path) -> None:
    assert not (root / "models" / "tokenizer").exists() and not (root / "data" / "tokens").exists()
    assert not list(root.rglob(".tmp-*"))


@pytest.mark.parametrize("docs_in, settings, message", [
    ([], {}, "holds no documents: the corpus is empty"),
    (["", "", ""], {"val_ratio": 0.01}, "has no text"),
    (make_corpus(3, seed=1), {"val_ratio": 0.001}, "put none of the 3 documents"),
    (make_corpus(20, seed=1), {"vocab_size": 4096},
     r"Vocabulary size too high \(4096\).*Lower tokenizer.vocab_size in params.yaml to at most \d+"),
    (make_corpus(20, seed=1), {"vocab_size": 50}, r"Raise tokenizer.vocab_size in params.yaml to at least \d+"),
])
def test_bad_input_stops_with_what_to_change_and_leaves_no_outputs(tmp_path, docs_in, settings, message):
    root = make_project(tmp_path, docs_in, **settings)
    with pytest.raises(UserError, match=message):
        run_stage("tokenizer", root)
    _assert_no_outputs(root)


def test_missing_input_points_at_the_dedup_stage(tmp_path, docs):
    root = make_project(tmp_path, docs)
    shutil.rmtree(root / "data" / "dedup")
    with pytest.raises(UserError, match="no part-.*parquet files: run the dedup stage first"):
        run_stage("tokenizer", root)


def test_round_trip_failure_names_the_document_and_leaves_no_tokens(tmp_path, docs, monkeypatch):
    root = make_project(tmp_path, docs)
    run_stage("tokenizer", root)  # a good run first: its tokens must not outlive its tokenizer
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenizer"]["vocab_size"] = 500
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    original = Tokenizer.decode_batch
    monkeypatch.setattr(Tokenizer, "decode_batch", lambda self, batch, num_threads=None:
                        [t.replace("e", "E", 1) for t in original(self, batch, num_threads)])
    with pytest.raises(RoundTripError, match=r"document '[0-9a-f]{32}' at character \d+"):
        run_stage("tokenizer", root)
    assert Tokenizer.load(root / "models" / "tokenizer").vocab_size == 500
    assert not (root / "data" / "tokens").exists() and not list(root.rglob(".tmp-*"))


def test_rerun_after_a_crash_while_encoding_finishes_with_the_same_bytes(tmp_path, docs, monkeypatch):
    (tmp_path / "clean").mkdir()
    (tmp_path / "crashed").mkdir()
    clean, root = make_project(tmp_path / "clean", docs), make_project(tmp_path / "crashed", docs)
    run_stage("tokenizer", clean)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C (or SIGTERM through tracking.Terminated) looks like

    with monkeypatch.context() as patch:
        patch.setattr(encode.TokenShardWriter, "write", killed)
        with pytest.raises(KeyboardInterrupt):
            run_stage("tokenizer", root)
    assert (root / "models" / "tokenizer" / "tokenizer.model").exists()  # finished before the crash
    assert not (root / "data" / "tokens").exists() and not list(root.rglob(".tmp-*"))
    assert run_stage("tokenizer", root)["tokenizer_reused"] == 1
    assert _outputs(root) == _outputs(clean)


def test_an_edit_of_the_stages_code_trains_anew_and_an_edit_elsewhere_reuses(tmp_path, docs):
    """The reuse fingerprint holds the code dvc.yaml lists for the stage, hashed in the project
    (where DVC sees it): DVC reruns the stage for such an edit, and the old tokenizer must not pass."""
    root = code_project(tmp_path / "proj", {"tokenizer": {**SETTINGS, "reference": False}})
    write_dedup_parts(root, docs)
    assert run_stage("tokenizer", root)["tokenizer_reused"] == 0
    model = (root / "models" / "tokenizer" / "tokenizer.model").read_bytes()
    edit_code(root, "llmpipe/train/loop.py")
    assert run_stage("tokenizer", root)["tokenizer_reused"] == 1
    edit_code(root, "llmpipe/tokenizer/encode.py")
    assert run_stage("tokenizer", root)["tokenizer_reused"] == 0
    assert (root / "models" / "tokenizer" / "tokenizer.model").read_bytes() == model  # same code, same model
