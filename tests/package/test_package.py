"""The package stage's own parts: what makes two packages the same, the lineage and metrics a version is
tagged with, and its errors. (The stage end to end, registering and promoting: tests/e2e/test_pipeline.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmpipe.errors import UserError
from llmpipe.package.package import PackageConfig, _model_stage, content_sha256, lineage, packaged_metrics, run
from llmpipe.stages import StageContext


def test_the_content_hash_follows_the_files_users_get(tmp_path: Path):
    weights, hf = tmp_path / "int8", tmp_path / "hf"
    for d in (weights, hf):
        d.mkdir()
    (weights / "model.safetensors").write_bytes(b"w1")
    (hf / "config.json").write_text("{}")
    first = content_sha256(weights, hf)
    assert content_sha256(weights, hf) == first
    (hf / "config.json").write_text('{"x": 1}')
    assert content_sha256(weights, hf) != first


def test_the_lineage_is_every_earlier_output_hash_in_dvc_lock(tmp_path: Path):
    lock = {"stages": {"tokenizer": {"outs": [{"path": "models/tokenizer", "md5": "t.dir"},
                                              {"path": "data/tokens", "md5": "d.dir"}]},
                       "dpo": {"outs": [{"path": "models/dpo", "md5": "p.dir"}, {"path": "metrics/dpo.json", "md5": "m"}]},
                       "package": {"outs": [{"path": "models/package", "md5": "self.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert lineage(tmp_path) == {"lineage.models/tokenizer": "t.dir", "lineage.data/tokens": "d.dir",
                                 "lineage.models/dpo": "p.dir"}


def test_a_version_carries_the_packaged_models_metrics_only(tmp_path: Path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({
        "eval/dpo/llmpipe_bpb/bits_per_byte": 2.5, "eval/sft/llmpipe_bpb/bits_per_byte": 2.4,
        "decontamination/llmpipe_bpb/fraction": 0.3}))
    (tmp_path / "metrics" / "quantize.json").write_text(json.dumps({
        "quantize/int8/bpb_change": 0.001, "quantize/int4/bpb_change": 0.01}))
    assert packaged_metrics(tmp_path, "dpo", "int8") == {"eval/dpo/llmpipe_bpb/bits_per_byte": 2.5,
                                                         "decontamination/llmpipe_bpb/fraction": 0.3,
                                                         "quantize/int8/bpb_change": 0.001}


def test_the_model_stage_comes_from_the_quantized_checkpoints_source():
    assert _model_stage("models/dpo/final") == "dpo"
    with pytest.raises(UserError, match="not a stage's model under models/"):
        _model_stage("/elsewhere/final")


def test_a_variant_the_quantize_stage_did_not_write_names_both_settings(tmp_path: Path):
    (tmp_path / "models" / "quantized" / "int8").mkdir(parents=True)
    with pytest.raises(UserError, match=r"add int4 to quantize.variants .* or set package.variant"):
        run(PackageConfig(variant="int4"), StageContext(root=tmp_path, name="package"))
