"""The generation benchmark runs end to end on CPU, finds the three greedy outputs identical and
prints the ratios last."""

import importlib.util
import sys

from tests.helpers import ROOT


def test_generation_benchmark_smoke(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("generation_benchmark", ROOT / "benchmarks" / "generation.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    status = bench.main(["--preset", "tiny", "--draft-preset", "tiny", "--draft-layers", "1", "--vocab-size", "128",
                         "--new-tokens", "12", "--prompts", "2", "--prompt-len", "6", "--k", "3", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 0 and "outputs identical: yes" in lines
    assert any("MEANINGLESS" in line for line in lines)  # random weights must say so
    assert lines[-3].startswith("acceptance rate: ")
    assert lines[-2].startswith("ratio KV cache/no cache (tokens/s): ") and float(lines[-2].split(":")[1]) > 0
    assert lines[-1].startswith("ratio speculative/KV cache (tokens/s): ") and float(lines[-1].split(":")[1]) > 0
