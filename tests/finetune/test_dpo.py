"""The dpo stage on a throwaway project: held-out preferences are learnt, the reference is the SFT model
(cached or live, same training), LoRA uses the policy with its adapter off as the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmpipe.stages import run_stage
from llmpipe.train import checkpoint as ckpt
from tests.finetune.tuned import chat_tokenizer_dir, make_tuning_project, metrics, set_params, tuned  # noqa: F401

pytestmark = pytest.mark.slow


def test_dpo_learns_the_held_out_preferences_and_logs_the_reward_trends(tuned: Path):
    dpo = metrics(tuned, "dpo")
    # the policy starts as the reference: every margin 0, accuracy 0 (a pair counts when chosen wins)
    assert dpo["val_dpo_reward_accuracy"] > 0.9 and dpo["val_dpo_reward_margin"] > 1
    assert dpo["val_dpo_chosen_reward"] > dpo["val_dpo_rejected_reward"]
    records = [json.loads(line) for line in (tuned / "models/dpo/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val/dpo/reward_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 60, 120] and evals[0]["val/dpo/reward_accuracy"] == 0  # from SFT
    trained = [r for r in records if "train/dpo/reward_margin" in r]
    assert len(trained) == 120 and trained[-1]["train/dpo/reward_margin"] > trained[0]["train/dpo/reward_margin"]
    assert {"train/dpo/chosen_logp", "train/dpo/rejected_logp"} <= set(trained[0])
    start = ckpt.read_meta(tuned / "models/dpo/final")["data"]["init"]
    assert start == ckpt.weights_hash(tuned / "models/sft/final")  # DPO starts from (and is measured against) SFT
    assert "user: tell me about the sun" in (tuned / "models/dpo/samples.txt").read_text()


def test_cached_and_live_reference_log_probs_train_the_same_policy(tmp_path, chat_tokenizer_dir):  # noqa: F811
    short = {"max_steps": 3, "eval_every": 3, "checkpoint_every": 3, "sample_tokens": 0}
    finals = {}
    for reference in ("cached", "live"):
        root = make_tuning_project(tmp_path / reference, chat_tokenizer_dir, sft=short, dpo={**short, "reference": reference})
        run_stage("sft", root)
        run_stage("dpo", root)
        finals[reference] = ckpt.load_weights(root / "models/dpo/final")
    for name, weight in finals["cached"].items():
        torch.testing.assert_close(weight, finals["live"][name], atol=1e-5, rtol=0)


def test_lora_dpo_uses_the_policy_with_its_adapter_off_as_the_reference(tmp_path, chat_tokenizer_dir):  # noqa: F811
    short = {"max_steps": 3, "eval_every": 3, "checkpoint_every": 3, "sample_tokens": 0}
    root = make_tuning_project(tmp_path, chat_tokenizer_dir, sft=short,
                               dpo={**short, "method": "lora", "reference": "live", "lr": 1e-2})
    run_stage("sft", root)
    dpo = run_stage("dpo", root)
    assert 0 < dpo["trainable_params"] < dpo["params"] / 10
    assert (root / "models/dpo/adapter/adapter_config.json").exists()
    sft, tuned_ = (ckpt.load_checkpoint(root / f"models/{s}/final")[0] for s in ("sft", "dpo"))
    idx = torch.randint(0, sft.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(sft(idx)[0], tuned_(idx)[0])  # the merged adapter moved the policy
    set_params(root, "dpo", beta=0.5)  # another beta: refused, the checkpoints are of beta 0.1
    with pytest.raises(Exception, match=r"dpo.beta: checkpoints 0.1 != params.yaml 0.5"):
        run_stage("dpo", root)
