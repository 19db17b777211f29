"""The model card shows exactly the numbers and hashes the project's files hold, and "not measured"
where a file or a metric is missing."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from llmpipe.package.card import NOT_MEASURED, render_card

MODEL_CONFIG = {"vocab_size": 96, "n_layer": 2, "n_head": 2, "n_kv_head": 1, "d_model": 32, "mlp_hidden": 64,
                "max_seq_len": 64, "tie_embeddings": True}
LOCK = """schema: '2.0'
stages:
  dedup:
    cmd: llmpipe stage dedup
    outs:
    - path: data/dedup
      hash: md5
      md5: 11111111111111111111111111111111.dir
  tokenizer:
    cmd: llmpipe stage tokenizer
    deps:
    - path: data/dedup
      md5: 11111111111111111111111111111111.dir
    outs:
    - path: data/tokens
      md5: 22222222222222222222222222222222.dir
    - path: models/tokenizer
      md5: 33333333333333333333333333333333.dir
  pretrain:
    cmd: llmpipe stage pretrain
    outs:
    - path: models/pretrain
      md5: 44444444444444444444444444444444.dir
  dpo:
    cmd: llmpipe stage dpo
    outs:
    - path: models/dpo
      md5: 66666666666666666666666666666666.dir
"""
PARAMS = """pretrain:
  preset: tiny
  max_steps: 812
sft:
  lr: 0.00051
dpo:
  beta: 0.137
evaluate:
  decontamination: {n: 11, mode: flag}
quantize:
  model: dpo
"""
EVALUATE = {"eval/pretrain/llmpipe_bpb/bits_per_byte": 2.5140398, "eval/sft/llmpipe_bpb/bits_per_byte": 2.887983,
            "eval/dpo/llmpipe_bpb/bits_per_byte": 3.2220308,
            "eval/dpo/llmpipe_chat_reply/acc": 0.3131313, "eval/dpo/llmpipe_chat_reply/acc_stderr": 0.0468476,
            "eval/pretrain/llmpipe_chat_reply/acc": 0.2929293, "eval/dpo/llmpipe_chat_reply/sample_len": 99.0,
            "eval/dpo/loglikelihood_requests_per_s": 133.02,
            "decontamination/llmpipe_bpb/fraction": 0.84, "decontamination/llmpipe_chat_reply/fraction": 0.0123}
QUANTIZE = {"quantize/fp32/size_bytes": 16003624.0, "quantize/fp32/bpb": 3.2220308,
            "quantize/int8/size_bytes": 4123456.0, "quantize/int8/size_ratio": 0.2576587,
            "quantize/int8/bpb": 3.2291234, "quantize/int8/bpb_change": 0.0022011,
            "quantize/int8/tokens_per_s": 812.5, "quantize/int8/speed_ratio": 0.9312}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    final = tmp_path / "models" / "dpo" / "final"
    final.mkdir(parents=True)
    (final / "model_config.json").write_text(json.dumps(MODEL_CONFIG))
    (final / "checkpoint.json").write_text(json.dumps(
        {"step": 137, "tokens_seen": 23281, "files": {"model.safetensors": {"sha256": "ab" * 32}}}))
    (tmp_path / "dvc.lock").write_text(LOCK)
    (tmp_path / "params.yaml").write_text(PARAMS)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps(EVALUATE))
    (tmp_path / "metrics" / "quantize.json").write_text(json.dumps(QUANTIZE))
    (tmp_path / "metrics" / "dpo.json").write_text(json.dumps({"params": 4000.0}))
    (tmp_path / "metrics" / "pretrain.json").write_text(json.dumps({"tokens_seen": 819200.0}))
    return tmp_path


def _row(card: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell`."""
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in the card:\n{card}")


def _section(card: str, title: str) -> str:
    return re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", card, re.S | re.M).group(1)


def test_the_card_shows_the_parameter_count_of_the_real_model(project: Path):
    import torch

    from llmpipe.model import GPT, ModelConfig

    with torch.device("meta"):  # counted, never allocated
        expected = sum(p.numel() for p in GPT(ModelConfig.from_dict(MODEL_CONFIG)).parameters())
    card = render_card(project, "dpo", "llmpipe-chat")
    assert card.startswith("# llmpipe-chat\n")
    assert _row(card, "parameters")[1] == f"{expected:,}"
    assert _row(card, "layers")[1] == "2" and _row(card, "attention heads (kv heads)")[1] == "2 (1)"
    assert _row(card, "training steps")[1] == "137" and _row(card, "tokens seen")[1] == "23,281"
    assert _row(card, "weights (model.safetensors) sha256")[1] == "ab" * 32


def test_the_lineage_is_the_dvc_lock_hashes_and_the_git_commit(project: Path):
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=project, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    card = render_card(project, "dpo", "llmpipe-chat")
    assert _row(card, "`data/dedup`")[2] == "`11111111111111111111111111111111.dir`"
    assert _row(card, "`data/tokens`")[2] == "`22222222222222222222222222222222.dir`"
    assert _row(card, "`models/tokenizer`")[2] == "`33333333333333333333333333333333.dir`"
    assert _row(card, "`models/pretrain`")[2] == "`44444444444444444444444444444444.dir`"
    assert _row(card, "`models/dpo`")[2] == "`66666666666666666666666666666666.dir`"
    assert _row(card, "`models/sft`")[2] == NOT_MEASURED  # not in this dvc.lock
    assert _row(card, "git commit")[2] == f"`{head}`"


def test_the_params_are_the_training_stages_sections(project: Path):
    params = _section(render_card(project, "dpo", "llmpipe-chat"), "Params")
    assert "max_steps: 812" in params and "lr: 0.00051" in params and "beta: 0.137" in params
    assert "quantize" not in params and "decontamination" not in params


def test_the_eval_table_shows_base_sft_and_dpo_as_measured(project: Path):
    card = render_card(project, "dpo", "llmpipe-chat")
    header = _row(card, "task")
    assert header[2:] == ["base (pretrain)", "SFT (sft)", "DPO (dpo)"]
    assert _row(card, "llmpipe_bpb")[1:] == ["bits_per_byte", "2.5140", "2.8880", "3.2220"]
    # SFT has no chat_reply score in this file: it is not measured, not zero
    assert _row(card, "llmpipe_chat_reply")[1:] == ["acc", "0.2929", NOT_MEASURED, "0.3131 (±0.0468)"]
    assert "sample_len" not in card and "requests_per_s" not in card


def test_the_quantization_and_decontamination_tables(project: Path):
    card = render_card(project, "dpo", "llmpipe-chat")
    assert _row(card, "variant")[1:] == ["size_bytes", "size_ratio", "bpb", "bpb_change", "tokens_per_s",
                                         "speed_ratio"]
    assert _row(card, "fp32")[1:] == ["16,003,624", NOT_MEASURED, "3.2220", NOT_MEASURED, NOT_MEASURED,
                                      NOT_MEASURED]
    assert _row(card, "int8")[1:] == ["4,123,456", "0.2577", "3.2291", "0.0022", "812.5000", "0.9312"]
    decontamination = _section(card, "Decontamination")
    assert "11-gram" in decontamination and "mode: flag" in decontamination
    assert _row(decontamination, "llmpipe_bpb")[1] == "0.8400"
    assert _row(decontamination, "llmpipe_chat_reply")[1] == "0.0123"


def test_intended_use_quotes_the_measured_size_and_bpb(project: Path):
    use = _section(render_card(project, "dpo", "llmpipe-chat"), "Intended use and limitations")
    assert "4,000 parameters" in use and "819,200 tokens" in use and "bits per byte: 3.2220" in use


def test_how_to_load_names_the_registered_model_and_the_exports(project: Path):
    gguf = project / "models" / "export" / "gguf"
    gguf.mkdir(parents=True)
    (gguf / "dpo-q8_0.gguf").write_bytes(b"GGUF")
    load = _section(render_card(project, "dpo", "my-model"), "How to load it")
    assert "llmpipe chat --model models:/my-model@production" in load
    assert 'AutoModelForCausalLM.from_pretrained("models/export/hf")' in load
    assert "llama-cli -m models/export/gguf/dpo-q8_0.gguf" in load


def test_a_project_with_nothing_measured_says_so_and_invents_nothing(tmp_path: Path):
    card = render_card(tmp_path, "dpo", "llmpipe-chat")
    for title in ("Architecture and size", "Evaluation", "Quantization", "Decontamination"):
        assert NOT_MEASURED in _section(card, title), title
    assert all(cells[2] == NOT_MEASURED for cells in (_row(card, f"`{p}`") for p in ("data/dedup", "models/dpo")))
    use = _section(card, "Intended use and limitations")
    assert f"Size: {NOT_MEASURED} parameters" in use and f"bits per byte: {NOT_MEASURED}" in use
    # no digit in the card but those of fixed names (llmpipe_bpb, q8_0, 64 tokens to generate)
    numbers = set(re.findall(r"(?<![\w.-])\d[\d,.]*(?![\w-])", card))
    assert numbers <= {"64"}, numbers


def test_a_checkpoint_without_its_marker_is_not_measured(project: Path):
    (project / "models" / "dpo" / "final" / "checkpoint.json").unlink()
    architecture = _section(render_card(project, "dpo", "llmpipe-chat"), "Architecture and size")
    assert NOT_MEASURED in architecture and "parameters" not in architecture


def test_a_broken_metrics_file_is_an_error_naming_it(project: Path):
    from llmpipe.errors import UserError

    (project / "metrics" / "evaluate.json").write_text('{"eval/dpo/llmpipe_bpb/bits_per_byte": ')
    with pytest.raises(UserError, match=r"metrics/evaluate.json: not valid JSON .*dvc repro"):
        render_card(project, "dpo", "llmpipe-chat")
