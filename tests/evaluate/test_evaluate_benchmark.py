"""The evaluation benchmark runs end to end on CPU: the adapter and the unbatched loop give the same
log-likelihoods on the same requests, random ones and ones cut from a project's held-out documents,
and the ratio comes last."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from llmpipe.data.accounting import Record, content_id, write_records
from llmpipe.tokenizer import encode
from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer
from tests.evaluate.test_adapter import project  # noqa: F401 (a fixture: tokenizer + trained pretrain)
from tests.helpers import ROOT, torch_threads
from tests.tokenizer.synthetic import make_corpus

TYPES = ("loglikelihood", "loglikelihood_rolling")
ROW = re.compile(r"^(adapter|unbatched)\s+(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("evaluate_benchmark", ROOT / "benchmarks" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def heldout_project(project) -> Path:  # noqa: F811
    """The adapter tests' project with data/tokens/{train,val} written as the tokenizer stage does."""
    tok = Tokenizer.load(project / "models" / "tokenizer")
    docs = make_corpus(24, seed=7)
    write_records(project / "data" / "dedup" / "part-00000.parquet",
                  [Record(content_id(d), "synthetic", d) for d in docs])
    encode.encode_corpus(tok, encode.input_files(project / "data" / "dedup"), project / "data" / "tokens", 0.5,
                         shard_tokens=300, num_threads=1, meta={})
    return project


def run(bench, capsys, argv: list[str]) -> tuple[int, list[str]]:
    with torch_threads(1):
        status = bench.main([*argv, "--device", "cpu"])
    return status, capsys.readouterr().out.strip().splitlines()


def check_report(status: int, lines: list[str], requests: int, documents: int) -> None:
    rows = {(m.group(1), m.group(2)): m for m in map(ROW.match, lines) if m}
    for method in ("adapter", "unbatched"):
        assert int(rows[method, "loglikelihood"].group(3)) == requests
        assert int(rows[method, "loglikelihood_rolling"].group(3)) == documents
        assert int(rows[method, "all"].group(3)) == requests + documents
        assert all(float(rows[method, kind].group(4)) > 0 for kind in (*TYPES, "all"))
    for kind in TYPES:
        (diff,) = [line for line in lines if line.startswith(f"max |difference| {kind}: ")]
        assert "FAIL" not in diff and float(diff.split(":")[1].split()[0]) < 1e-3, diff
    assert status == 0
    assert lines[-1].startswith("ratio adapter/unbatched (requests/s): ") and float(lines[-1].split(":")[1]) > 0


def test_random_requests_agree_and_the_ratio_comes_last(bench, capsys):
    status, lines = run(bench, capsys, ["--random", "--vocab-size", "128", "--seq-len", "16", "--requests", "10",
                                        "--documents", "3", "--batch-size", "4"])
    check_report(status, lines, requests=10, documents=3)
    assert any("only speed and agreement mean anything" in line for line in lines)


def test_heldout_requests_of_a_checkpoint_agree(bench, capsys, heldout_project):
    # documents of make_corpus are longer than SEQ_LEN (64) tokens: rolling takes several windows each
    status, lines = run(bench, capsys, ["--model", str(heldout_project / "models" / "pretrain"), "--project",
                                        str(heldout_project), "--requests", "12", "--documents", "3",
                                        "--batch-size", "4"])
    check_report(status, lines, requests=12, documents=3)
    assert any(str(heldout_project) in line for line in lines)  # the requests came from its held-out split
    (work,) = [line for line in lines if line.startswith("requests: ")]
    assert int(re.search(r"\((\d+) windows\)", work).group(1)) > 3


def test_a_disagreement_fails_the_run(bench, capsys, monkeypatch):
    """The check can fail: an unbatched loop that drops a continuation token is reported."""
    forward = bench.forward_logprob
    monkeypatch.setattr(bench, "forward_logprob", lambda model, c, k, n, d: forward(model, c + k[:1], k[1:] or k, n, d))
    status, lines = run(bench, capsys, ["--random", "--vocab-size", "128", "--seq-len", "16", "--requests", "6",
                                        "--documents", "2", "--batch-size", "4"])
    assert status == 1 and any("FAIL" in line for line in lines if line.startswith("max |difference| "))
    assert lines[-1].startswith("ratio adapter/unbatched (requests/s): ")
