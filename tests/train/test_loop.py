"""The training loop in one process: golden losses, the NaN guard, resume checks, accumulation errors."""

import json
import math
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from llmpipe.model import ModelConfig
from llmpipe.train import checkpoint as ckpt
from llmpipe.train.data import TokenWindows
from llmpipe.train.loop import NonFiniteError, TrainConfig, Trainer
from llmpipe.train.task import pretraining_task
from llmpipe.train.pretrain_worker import train
from llmpipe.errors import UserError
from tests.train.synthetic import markov_tokens, resolved_config, write_split, write_tokens

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pretrain_tiny_cpu.json"


def golden_run(root: Path) -> dict:
    """30 steps of the reduced tiny model on the fixed synthetic stream: what the golden file holds."""
    write_tokens(root)
    resolved = resolved_config(root, train={"max_steps": 30, "eval_every": 10, "checkpoint_every": 30})
    result = train(resolved)
    records = [json.loads(line) for line in (root / "models/pretrain/metrics.jsonl").read_text().splitlines()]
    # every TrainConfig field, defaults included: a change of the default recipe shows as a setup change
    return {"model": resolved["model"], "train": asdict(TrainConfig(**resolved["train"])),
            "losses": [r["train/loss"] for r in records if "train/loss" in r],
            "val_losses": [r["val/loss"] for r in records if "val/loss" in r], "final_val_loss": result["val_loss"]}


def test_golden_losses_of_the_tiny_model_are_reproduced(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = golden_run(tmp_path)
    assert got["model"] == golden["model"] and got["train"] == golden["train"], "the golden setup changed"
    assert len(got["losses"]) == 30 and got["losses"][-1] < got["losses"][0] - 1.0  # it learns
    assert got["losses"] == pytest.approx(golden["losses"], abs=1e-6, rel=0)
    assert got["val_losses"] == pytest.approx(golden["val_losses"], abs=1e-6, rel=0)


def small_trainer(out: Path, **overrides) -> Trainer:
    vocab = 256
    stream = markov_tokens(20_000, vocab, seed=3)
    cfg = TrainConfig(**{"seq_len": 32, "micro_batch": 4, "global_batch_tokens": 128, "max_steps": 12, "lr": 3e-3,
                         "warmup_steps": 2, "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4,
                         "sample_tokens": 0, **overrides})
    model_cfg = ModelConfig.from_preset("tiny", vocab, n_layer=1, d_model=64, max_seq_len=32)
    task = pretraining_task(TokenWindows([stream], 32), TokenWindows([stream[:2000]], 32), cfg, bytes_per_token=3.0)
    return Trainer(model_cfg, cfg, task, out, {"hash": "tok", "vocab_size": vocab})


def test_a_nan_loss_stops_before_the_update_and_names_the_step_and_last_checkpoint(tmp_path):
    trainer = small_trainer(tmp_path)
    # poison the forward pass from the 7th step on
    trainer.model.norm.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step >= 6 else out)
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    assert "step 7:" in str(err.value) and "step-000004" in str(err.value)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters()), "the NaN update was applied"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-000004"]
    assert ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-000004")[2]["step"] == 4


def test_a_finite_loss_with_an_infinite_gradient_stops_before_the_update(tmp_path):
    trainer = small_trainer(tmp_path)
    for _ in range(6):
        trainer.train_step()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {k: v.clone() for k, v in trainer.opt.state[trainer.model.norm.weight].items()}
    # autograd hands the final norm an infinite gradient; the forward pass, and so the loss, stay finite
    trainer.model.norm.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(NonFiniteError) as err:
        trainer.train_step()
    loss, norm = re.search(r"step 7: loss (\S+), grad norm (\S+);", str(err.value)).groups()
    assert math.isfinite(float(loss)) and float(norm) == math.inf
    assert trainer.step == 6
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), f"{name} was updated"
    for key, value in trainer.opt.state[trainer.model.norm.weight].items():
        assert torch.equal(value, moments[key]), f"optimizer {key} was updated"


def test_resume_with_another_model_shape_or_tokenizer_is_refused_with_the_differences(tmp_path):
    small_trainer(tmp_path, max_steps=4).fit()
    wider = small_trainer(tmp_path, max_steps=8)
    wider.model_cfg = ModelConfig.from_preset("tiny", 256, n_layer=1, d_model=128, max_seq_len=32)
    wider.tokenizer_ref = {"hash": "other-tok", "vocab_size": 256}
    with pytest.raises(UserError, match="cannot resume") as err:
        wider.fit()
    assert "d_model: checkpoint 64 != config 128" in str(err.value)
    assert "tokenizer hash: checkpoint 'tok' != data 'other-tok'" in str(err.value)


@pytest.mark.parametrize("n_tokens", [60_000, 50_000], ids=["same-length", "shorter"])
def test_resuming_on_other_token_shards_is_refused_naming_what_changed(tmp_path, n_tokens):
    write_tokens(tmp_path)
    every = {"warmup_steps": 1, "checkpoint_every": 2, "eval_every": 2}
    train(resolved_config(tmp_path, train={"max_steps": 2, **every}))
    # the tokenizer stage rewrote the shards with other tokens under the same tokenizer (same meta hashes)
    train_dir = tmp_path / "data" / "tokens" / "train"
    shutil.rmtree(train_dir)
    write_split(train_dir, markov_tokens(n_tokens, 256, seed=9), 256)
    with pytest.raises(UserError) as err:
        train(resolved_config(tmp_path, train={"max_steps": 4, **every}))
    msg = str(err.value)
    assert "cannot resume from" in msg and "step-000002" in msg
    assert "training data sha256 (data/tokens/train): checkpoint '" in msg
    assert ("training data num_examples" in msg) == (n_tokens != 60_000)
    assert f"delete {tmp_path / 'models' / 'pretrain'} to start from scratch" in msg


def test_a_crashed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    straight = small_trainer(tmp_path / "a")
    straight.fit()
    crashing = small_trainer(tmp_path / "b")
    original_step = crashing.train_step

    def crash_at_step_10():
        if crashing.step == 9:
            raise RuntimeError("power cut")
        return original_step()

    crashing.train_step = crash_at_step_10
    with pytest.raises(RuntimeError, match="power cut"):
        crashing.fit()
    resumed = small_trainer(tmp_path / "b")
    assert resumed.resume() == 8
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r] == list(range(1, 13))  # step 9's partial log dropped


def test_each_eval_logs_a_sample_that_is_reproducible_and_leaves_the_rng_alone(tmp_path):
    from llmpipe.train.loop import EvalPrompts

    def with_sampler(out):
        trainer = small_trainer(out, max_steps=4, eval_every=2, sample_tokens=8)
        trainer.sampler = EvalPrompts([[5, 6, 7], [9]], lambda ids: "-".join(map(str, ids)), eos_id=None)
        return trainer

    torch.manual_seed(123)
    with_sampler(tmp_path / "a").fit()
    after = torch.rand(1)
    torch.manual_seed(123)
    with_sampler(tmp_path / "b").fit()
    assert torch.equal(torch.rand(1), after)  # sampling used a forked RNG
    samples = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(2, 0), (2, 1), (4, 0), (4, 1)]  # each prompt, each eval
    assert all(s["text"].startswith("5-6-7-") and len(s["text"].split("-")) == 11 for s in samples[::2])
    assert all(s["text"].startswith("9-") and len(s["text"].split("-")) == 9 for s in samples[1::2])
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()


def test_global_batch_that_does_not_divide_is_a_clear_error():
    with pytest.raises(UserError, match=r"multiple of micro_batch x seq_len x world_size = 4 x 32 x 2 = 256"):
        TrainConfig(seq_len=32, micro_batch=4, global_batch_tokens=384).accum_steps(2)
    assert TrainConfig(seq_len=32, micro_batch=4, global_batch_tokens=512).accum_steps(2) == 2


if __name__ == "__main__":  # regenerate: .venv/bin/python -m tests.train.test_loop (only for an intended change)
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = golden_run(Path(tmp))
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {GOLDEN}: final loss {data['losses'][-1]!r}")


def test_a_run_can_start_from_a_checkpoints_weights_with_a_fresh_optimizer(tmp_path):
    first = small_trainer(tmp_path / "first", max_steps=4)
    first.fit()
    start = tmp_path / "first" / "final"
    # lr ~ 0: what the run ends with is what it started from, so the start was the checkpoint's weights
    again = small_trainer(tmp_path / "again", max_steps=2, lr=1e-12, muon_lr=1e-12, warmup_steps=0)
    init = Trainer(again.model_cfg, again.cfg, again.task, tmp_path / "again", again.tokenizer_ref, init_from=start)
    assert init.step == 0 and not init.opt.state  # a new run: step 0, no optimizer moments carried over
    init.fit()
    ours, theirs = ckpt.load_weights(tmp_path / "again" / "final"), ckpt.load_weights(start)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
    assert not torch.allclose(ours["tok_embeddings.weight"], again.model.state_dict()["tok_embeddings.weight"])
    assert ckpt.read_meta(tmp_path / "again" / "final")["data"]["init"] == ckpt.weights_hash(start)
    other_tokenizer = {**again.tokenizer_ref, "hash": "another"}
    with pytest.raises(UserError, match=r"(?s)cannot start from .*tokenizer hash: checkpoint 'tok' != data 'another'"):
        Trainer(again.model_cfg, again.cfg, again.task, tmp_path / "x", other_tokenizer, init_from=start)
