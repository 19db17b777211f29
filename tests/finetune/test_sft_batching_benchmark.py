"""The SFT batching benchmark runs end to end on CPU, measures both modes and prints the ratio last."""

import importlib.util
import sys

from tests.helpers import ROOT


def test_benchmark_smoke(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("sft_batching", ROOT / "benchmarks" / "sft_batching.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["sft_batching.py", "--preset", "tiny", "--vocab-size", "128",
                                      "--seq-len", "64", "--micro-batch", "4", "--conversations", "60",
                                      "--steps", "2", "--warmup", "1", "--device", "cpu"])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("bucket") and lines[-2].startswith("pack")
    share = [float(line.split()[4].rstrip("%")) for line in lines[-3:-1]]
    assert all(0 < s <= 100 for s in share)
    assert share[1] > share[0]  # packing wastes less of each step on padding
    assert lines[-1].startswith("ratio pack/bucket (supervised tokens/s): ")
    assert float(lines[-1].split(":")[1]) > 0
