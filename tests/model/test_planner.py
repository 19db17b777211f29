"""FLOPs, MFU and the planner against numbers worked out by hand."""

import math

import pytest
import torch
from click.testing import CliRunner

from llmpipe import cli
from llmpipe.errors import UserError
from llmpipe.model import PRESETS, ModelConfig
from llmpipe.model.flops import PEAK_BF16_FLOPS, detect_peak_flops, flops_per_token, gpu_kind, mfu
from llmpipe.model.planner import GiB, activation_bytes, format_plan, parse_count, plan

# The hand-computed config: vocab 1000, 2 layers, d_model 128, 4 heads of 32, 2 kv heads, tied.
#   mlp_hidden = 64 * ceil(8*128/3 / 64) = 64 * ceil(5.33) = 384
#   per layer: wq 128*128 = 16384, wk 128*64 = 8192, wv 8192, wo 16384        -> 49,152
#              w_gate, w_up, w_down 3*128*384                                 -> 147,456
#              2 norms of 128                                                 -> 256
#              = 196,864;  2 layers = 393,728
#   total = 393,728 + final norm 128 + embedding 1000*128 = 128,000          -> 521,856
#   N for FLOPs = all but the input embedding, plus the lm_head (the tied matrix, once) = 521,856
#   FLOPs/token at T=64 = 6 * 521,856 + 12 * L2 * H4 * Q32 * T64 = 3,131,136 + 196,608 = 3,327,744
HAND = ModelConfig(vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=64)


def test_flops_per_token_by_hand():
    assert HAND.mlp_hidden == 384
    assert HAND.num_params() == 521_856
    assert HAND.num_params(exclude_embeddings=True) == 393_856
    assert flops_per_token(HAND, 64) == 3_327_744
    untied = ModelConfig(**{**HAND.to_dict(), "tie_embeddings": False})
    assert flops_per_token(untied, 64) == 3_327_744  # the lm_head matmul costs the same either way


def test_gpt2_flops_per_token():
    cfg = ModelConfig.from_preset("gpt2-124m", vocab_size=50304)
    # 6 * 123,587,328 + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(cfg, 1024) == 741_523_968 + 113_246_208


def test_mfu():
    # 100k tokens/s * 3,327,744 FLOPs/token / 312e12 FLOP/s
    assert mfu(1e5, HAND, 64, PEAK_BF16_FLOPS["A100"]) == pytest.approx(1e5 * 3_327_744 / 312e12)
    assert math.isnan(mfu(1e5, HAND, 64, None))


@pytest.mark.parametrize("name, kind", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA L4", "L4"), ("NVIDIA H100 NVL", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_gpu_kind_from_device_name(name, kind):
    assert gpu_kind(name) == kind


def test_no_peak_on_cpu():
    assert detect_peak_flops(torch.device("cpu")) is None


def test_plan_by_hand():
    p = plan(HAND, tokens=1_000_000, gpu="A100", num_gpus=2, mfu=0.5, micro_batch=4, seq_len=64, gpu_memory_gb=None)
    assert p.n_params == 521_856 and p.n_params_matmul == 521_856
    assert p.total_flops == 3_327_744 * 1_000_000
    # 3.327744e12 FLOPs / (2 GPUs * 312e12 * 0.5) = 0.010666 s
    assert p.wall_time_s == pytest.approx(3.327744e12 / 312e12)
    assert p.gpu_hours == pytest.approx(p.wall_time_s / 3600 * 2)
    assert p.tokens_chinchilla == 20 * 521_856
    assert p.tokens_per_step == 4 * 64 * 2 and p.steps == 1954  # ceil(1e6 / 512)
    # memory: 16 B/param state, replicated (DDP) or halved (FSDP2 on 2 GPUs)
    assert p.state_gib_ddp * GiB == pytest.approx(16 * 521_856)
    assert p.state_gib_fsdp * GiB == pytest.approx(8 * 521_856)
    assert p.working_gib_ddp * GiB == pytest.approx(2 * 521_856)
    assert p.working_gib_fsdp * GiB == pytest.approx(2 * 196_864 * 6)  # two unsharded blocks (largest unit)
    # activations per token: per layer h(16 + 4g) + 6f = 128*18 + 6*384 = 4608 (g = 2/4 kv heads per head);
    # head 6h + 10V = 768 + 10,000; total 2*4608 + 10,768 = 19,984 bytes; x (4 * 64) tokens = 5,115,904
    assert activation_bytes(HAND, 4, 64) == 5_115_904
    assert p.total_gib_ddp == pytest.approx((16 + 2) * 521_856 / GiB + 5_115_904 / GiB + 1.0)
    assert p.gpu_memory_gib == 80 and p.warnings == []


def test_default_tokens_are_chinchilla_and_warnings_fire():
    p = plan(HAND, tokens=None, gpu="L4", num_gpus=1, mfu=0.4, micro_batch=4, seq_len=128, gpu_memory_gb=0.5)
    assert p.tokens == 20 * HAND.num_params()
    text = " ".join(p.warnings)
    assert "DDP needs" in text and "FSDP2 needs" in text and "max_seq_len 64" in text
    shown = format_plan(p)
    assert "Chinchilla" in shown and "WARNING" in shown and "NO" in shown


def test_plan_rejects_bad_input():
    with pytest.raises(UserError, match="H100-SXM"):
        plan(HAND, 1000, "V100", 1, 0.4, 1, 64, None)
    with pytest.raises(UserError, match="mfu"):
        plan(HAND, 1000, "A100", 1, 1.5, 1, 64, None)


@pytest.mark.parametrize("text, value", [("10B", 10_000_000_000), ("1.5m", 1_500_000), ("300K", 300_000),
                                         ("2T", 2_000_000_000_000), ("1e9", 1_000_000_000), ("12345", 12_345)])
def test_parse_count(text, value):
    assert parse_count(text) == value


def test_parse_count_rejects_garbage():
    with pytest.raises(UserError, match="K/M/B/T"):
        parse_count("10X")


def test_cli_plan():
    result = CliRunner().invoke(cli.main, ["plan", "--preset", "gpt2-124m", "--vocab-size", "50304", "--tokens", "10B",
                                           "--gpu", "H100-SXM", "--gpus", "8", "--mfu", "0.4", "--micro-batch", "16",
                                           "--seq-len", "1024"])
    assert result.exit_code == 0, result.output
    assert "123,587,328" in result.output and "8.548e+18" in result.output and "GPU-hours" in result.output
    bad = CliRunner().invoke(cli.main, ["plan", "--gpu", "V100"])
    assert bad.exit_code != 0 and "unknown GPU" in bad.output


def test_cli_help_lists_what_exists():
    assert [s.strip() for s in cli.PLAN_PRESETS.split(",")] == list(PRESETS)
    assert [s.strip() for s in cli.PLAN_GPUS.split(",")] == list(PEAK_BF16_FLOPS)
