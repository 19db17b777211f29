import json

import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.model import GPT, PRESETS, ModelConfig
from llmpipe.model.config import swiglu_hidden


def test_derived_fields_follow_width():
    cfg = ModelConfig.from_preset("gpt2-124m", vocab_size=50304)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (12, 768, 12, 12, 64)
    assert cfg.max_seq_len == 1024 and cfg.tie_embeddings
    assert cfg.mlp_hidden == 2048  # 8/3 * 768 = 2048 exactly
    assert swiglu_hidden(256) == 704  # 8/3 * 256 = 682.7 -> next multiple of 64


def test_width_override_rederives_heads_and_mlp():
    cfg = ModelConfig.from_preset("1b", vocab_size=1000, d_model=1024)
    assert (cfg.n_head, cfg.n_kv_head, cfg.mlp_hidden) == (16, 4, 2752)  # width/64 heads, same 4:1 grouping
    cfg = ModelConfig.from_preset("tiny", vocab_size=1000, n_head=8)
    assert (cfg.n_head, cfg.n_kv_head) == (8, 4)  # 2:1 grouping kept
    cfg = ModelConfig.from_preset("tiny", vocab_size=1000, n_layer=None)  # None means "not given"
    assert cfg.n_layer == 4


@pytest.mark.parametrize("kwargs, words", [
    (dict(d_model=100, n_head=3), "divisible by n_head"),
    (dict(d_model=96, n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(d_model=60, n_head=4), "must be even"),
    (dict(d_model=64, n_head=4, attn_backend="flash"), "attn_backend"),
    (dict(d_model=64, n_head=4, n_layer=0), "n_layer must be a positive integer"),
    (dict(d_model=64, n_head=4, norm_eps=0.0), "norm_eps"),
])
def test_validation_names_the_problem(kwargs, words):
    base = dict(vocab_size=100, n_layer=2)
    with pytest.raises(UserError, match=words):
        ModelConfig(**{**base, **kwargs})


def test_json_round_trip():
    cfg = ModelConfig.from_preset("draft", vocab_size=32000, qk_norm=True, attn_backend="sdpa", rope_theta=5e5)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.to_dict()["mlp_hidden"] == cfg.mlp_hidden


def test_from_dict_rejects_unknown_and_missing_keys():
    data = ModelConfig.from_preset("tiny", vocab_size=100).to_dict()
    with pytest.raises(UserError, match="dropout.*n_embd|n_embd.*dropout"):
        ModelConfig.from_dict({**data, "n_embd": 3, "dropout": 0.1})
    del data["vocab_size"]
    with pytest.raises(UserError, match="vocab_size"):
        ModelConfig.from_dict(data)


def test_unknown_preset_and_override():
    with pytest.raises(UserError, match="gpt2-124m"):  # lists the valid names
        ModelConfig.from_preset("gpt3", vocab_size=100)
    with pytest.raises(UserError, match="n_embd"):
        ModelConfig.from_preset("tiny", vocab_size=100, n_embd=3)


# Exact unique parameter counts (tied embeddings). gpt2-124m in the Llama layout:
#   per layer: attention 4*768^2 = 2,359,296 + SwiGLU 3*768*2048 = 4,718,592 + 2 norms 1,536 = 7,079,424
#   12 layers 84,953,088 + final norm 768 + embedding 50304*768 = 38,633,472  ->  123,587,328
EXPECTED = {"tiny": 15_829_248, "draft": 28_758_912, "gpt2-124m": 123_587_328, "350m": 355_124_224,
            "1b": 989_153_280}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_with_expected_size(name):
    cfg = ModelConfig.from_preset(name, vocab_size=50304)
    with torch.device("meta"):  # count without allocating
        model = GPT(cfg)
    assert model.num_params() == cfg.num_params() == EXPECTED[name]
    assert model.num_params(exclude_embeddings=True) == cfg.num_params(exclude_embeddings=True)


def test_preset_sizes_are_what_their_names_say():
    millions = {n: ModelConfig.from_preset(n, vocab_size=50304).num_params() / 1e6 for n in PRESETS}
    assert 120 < millions["gpt2-124m"] < 128
    assert 330 < millions["350m"] < 370
    assert 900 < millions["1b"] < 1100
    assert millions["draft"] < millions["gpt2-124m"] / 3
    assert 2 < ModelConfig.from_preset("tiny", vocab_size=4096).num_params() / 1e6 < 8


def test_untied_counts_the_head_separately():
    tied = ModelConfig.from_preset("tiny", vocab_size=1000)
    untied = ModelConfig.from_preset("tiny", vocab_size=1000, tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 1000 * 256
    assert untied.num_params(exclude_embeddings=True) == tied.num_params(exclude_embeddings=True)
