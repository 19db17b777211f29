"""The throughput benchmark runs end to end on CPU and prints the ratio last."""

import importlib.util
import sys

from tests.helpers import ROOT


def test_benchmark_smoke(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("pretrain_throughput", ROOT / "benchmarks" / "pretrain_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["pretrain_throughput.py", "--preset", "tiny", "--vocab-size", "128",
                                      "--batch", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1",
                                      "--device", "cpu"])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("reference (nanoGPT GPT-2)") and lines[-2].startswith("llmpipe GPT")
    assert lines[-1].startswith("ratio ours/reference (tokens/s): ")
    assert float(lines[-1].split(":")[1]) > 0
