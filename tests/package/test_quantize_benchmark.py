"""The quantization speed benchmark runs on CPU: every variant decodes, and the ratios come last."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from tests.helpers import ROOT, torch_threads


def test_every_variant_decodes_and_the_ratios_come_last(trained_project: Path, capsys):
    spec = importlib.util.spec_from_file_location("quantize_benchmark", ROOT / "benchmarks" / "quantize.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
        with torch_threads(1):
            status = bench.main(["--tokenizer", str(trained_project / "models" / "tokenizer"), "--new-tokens", "8",
                                 "--repeats", "1"])
    finally:
        del sys.modules[spec.name]
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 0
    speeds = {m.group(1): float(m.group(2)) for m in map(re.compile(r"^tiny\s+(\w+)\s+([\d.]+) tokens/s$").match, lines)
              if m}
    assert set(speeds) == {"fp32", "int8", "int4"} and all(v > 0 for v in speeds.values())
    ratios = re.fullmatch(r"tiny: int8 / fp32 ([\d.]+)x, int4 / fp32 ([\d.]+)x", lines[-1])
    assert ratios, lines[-1]
    assert abs(float(ratios.group(1)) - speeds["int8"] / speeds["fp32"]) < 0.006
    assert abs(float(ratios.group(2)) - speeds["int4"] / speeds["fp32"]) < 0.006
