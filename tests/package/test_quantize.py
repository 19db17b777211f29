"""The quantize stage's own parts: the table against fp32, the report with its targets, and its errors.
(The stage end to end, through `dvc repro` on the real demo slice: tests/e2e/test_pipeline.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpipe.config import ConfigError, load_section
from llmpipe.errors import UserError
from llmpipe.package.quantize import QuantizeConfig, run, table_metrics, write_report
from llmpipe.stages import StageContext

ROWS = {"fp32": {"size_bytes": 1000.0, "bpb": 2.0, "tokens_per_s": 100.0},
        "int8": {"size_bytes": 260.0, "bpb": 2.004, "tokens_per_s": 120.0},
        "int4": {"size_bytes": 190.0, "bpb": 2.05, "tokens_per_s": 50.0}}


def test_each_variant_is_measured_against_fp32_from_the_same_run():
    metrics = table_metrics(ROWS)
    assert metrics["quantize/int8/size_ratio"] == pytest.approx(0.26)
    assert metrics["quantize/int8/bpb_change"] == pytest.approx(0.002)
    assert metrics["quantize/int4/speed_ratio"] == pytest.approx(0.5)
    assert metrics["quantize/fp32/bpb"] == 2.0 and "quantize/fp32/size_ratio" not in metrics


def test_the_report_says_which_target_each_variant_met_or_missed(tmp_path: Path):
    write_report(tmp_path, "dpo", ROWS)
    report = (tmp_path / "report.md").read_text()
    int8 = next(line for line in report.splitlines() if line.startswith("| int8 |"))
    int4 = next(line for line in report.splitlines() if line.startswith("| int4 |"))
    assert "| 0.260 | 2.0040 | +0.20% |" in int8 and "met (≤ 0.3×, ≤ +0.5%)" in int8
    assert "MISSED (≤ 0.18×, ≤ +3.0%)" in int4  # 0.19x the size: over the int4 target
    assert (tmp_path / "quantize.png").read_bytes()[:4] == b"\x89PNG"


def test_without_the_bpb_task_the_stage_says_which_setting_to_restore(tmp_path: Path):
    (tmp_path / "data" / "eval" / "tasks").mkdir(parents=True)
    ctx = StageContext(root=tmp_path, name="quantize")
    with pytest.raises(UserError, match=r"no llmpipe_bpb task.*keep llmpipe_bpb in evaluate.tasks"):
        run(QuantizeConfig(model="pretrain"), ctx)


def test_an_unknown_variant_is_rejected_with_its_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"quantize\.variants\.1"):
        load_section(QuantizeConfig, {"quantize": {"variants": ["int8", "int3"]}}, "quantize", tmp_path / "params.yaml")
