"""The sft stage on a throwaway project: it learns the assistant turns, writes pretraining's checkpoint
format, trains LoRA adapters, resumes after kill -9 exactly, and `llmpipe chat` then takes turns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmpipe.finetune.batches import read_sft_examples, sft_val_batches
from llmpipe.serve.load import load_model
from llmpipe.stages import run_stage
from llmpipe.train import checkpoint as ckpt
from llmpipe.train.task import lm_loss
from tests.finetune.tuned import SEQ, chat_tokenizer_dir, make_tuning_project, metrics, set_params, tuned  # noqa: F401
from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def val_loss(root: Path, model_dir: Path) -> float:
    model = ckpt.load_checkpoint(model_dir)[0]
    batches = sft_val_batches(read_sft_examples(root / "data/chat/sft/val.parquet"), 8, SEQ)
    with torch.no_grad():
        return sum(lm_loss(model, b)[0].item() for b in batches) / len(batches)


def test_sft_learns_the_assistant_turns_and_saves_what_every_later_stage_loads(tuned: Path):
    sft = metrics(tuned, "sft")
    assert sft["steps"] == 120 and sft["trainable_params"] == sft["params"]  # full fine-tuning
    base_loss, tuned_loss = val_loss(tuned, tuned / "models/pretrain/final"), val_loss(tuned, tuned / "models/sft")
    # the random base is near ln(vocab 600) = 6.4 on the replies; the pattern is learnt to well below
    assert base_loss > 6 and tuned_loss < base_loss - 3 and tuned_loss == pytest.approx(sft["val_loss"], abs=0.05)
    os.environ["LLMPIPE_PROJECT"] = str(tuned)
    try:
        model, tok, info = load_model("sft", "cpu")  # the one loader: checkpoint + the project's tokenizer
    finally:
        del os.environ["LLMPIPE_PROJECT"]
    assert info.path.endswith("final") and tok.hash == ckpt.read_tokenizer_ref(tuned / "models/sft/final")["hash"]
    samples = (tuned / "models/sft/samples.txt").read_text()
    assert samples.count("=== step") == 3 and samples.count("user: what colour is the cat?") == 3
    assert samples.startswith("=== step 0 ===")  # the base model's replies first: the progression to read
    final_sample = samples.rsplit("=== step 120 ===", 1)[1]
    assert re.search(r"assistant: \S", final_sample), final_sample  # a reply to each fixed prompt, step by step


def test_lora_trains_only_the_adapters_and_saves_merged_weights_and_the_adapter(tmp_path, chat_tokenizer_dir):  # noqa: F811
    from llmpipe.finetune.lora import load_adapter

    root = make_tuning_project(tmp_path, chat_tokenizer_dir,
                               sft={"method": "lora", "lora": {"r": 4, "target_modules": ["wq", "wv"]}, "max_steps": 6,
                                    "eval_every": 3, "checkpoint_every": 3, "lr": 1e-2})
    sft = run_stage("sft", root)
    assert 0 < sft["trainable_params"] < sft["params"] / 20
    final = ckpt.load_checkpoint(root / "models/sft/final")[0]
    base = ckpt.load_checkpoint(root / "models/pretrain/final")[0]
    assert set(final.state_dict()) == set(base.state_dict())  # merged: a plain model, the original keys
    adapted = load_adapter(base, root / "models/sft/adapter")  # the adapter alone, on the base weights
    idx = torch.randint(0, final.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(final(idx)[0], adapted(idx)[0], atol=1e-5, rtol=0)
        assert not torch.allclose(final(idx)[0], ckpt.load_checkpoint(root / "models/pretrain/final")[0](idx)[0])


# Runs the real stage command, but SIGKILLs itself (no handler runs) when `at_step` steps are done.
SELF_KILL = """
import os, signal, sys
from llmpipe.train import loop
at_step = int(sys.argv[1])
original = loop.Trainer.train_step
def train_step(self):
    if self.step == at_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self)
loop.Trainer.train_step = train_step
from llmpipe.cli import main
main(["stage", "sft"])
"""


def stage_process(root: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LLMPIPE_TRACKING": "off"}
    args = ["-c", SELF_KILL, str(kill_at)] if kill_at is not None else ["-m", "llmpipe.cli", "stage", "sft"]
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_sft_killed_with_sigkill_resumes_to_bit_identical_weights(tmp_path, chat_tokenizer_dir):  # noqa: F811
    settings = {"max_steps": 12, "eval_every": 4, "checkpoint_every": 4, "sample_tokens": 0}
    straight = make_tuning_project(tmp_path / "straight", chat_tokenizer_dir, sft=settings)
    killed = make_tuning_project(tmp_path / "killed", chat_tokenizer_dir, sft=settings)
    assert stage_process(straight).returncode == 0
    died = stage_process(killed, kill_at=6)
    assert died.returncode == -9, died.stderr
    assert [p.name for p in ckpt.list_checkpoints(killed / "models/sft/checkpoints")] == ["step-000004"]
    resumed = stage_process(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step-000004" in resumed.stderr
    a, b = ckpt.load_weights(straight / "models/sft/final"), ckpt.load_weights(killed / "models/sft/final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_base_model_restarts_sft_and_other_settings_are_refused(tmp_path, chat_tokenizer_dir):  # noqa: F811
    from llmpipe.errors import UserError
    from tests.finetune.tuned import base_checkpoint

    root = make_tuning_project(tmp_path, chat_tokenizer_dir, sft={"max_steps": 4, "eval_every": 2,
                                                                   "checkpoint_every": 2, "sample_tokens": 0})
    run_stage("sft", root)
    set_params(root, "sft", lr=1e-3)  # other settings on the same base: refused, as in pretraining
    with pytest.raises(UserError, match=r"sft.lr: checkpoints 0.003 != params.yaml 0.001"):
        run_stage("sft", root)
    new_base = base_checkpoint(root, seed=99)  # pretrain ran again: the old checkpoints belong to a model that is gone
    assert run_stage("sft", root)["steps"] == 4
    assert ckpt.read_meta(root / "models/sft/final")["data"]["init"] == ckpt.weights_hash(new_base)


def test_llmpipe_chat_with_the_sft_model_answers_in_turns(tuned: Path):
    from tests.serve.test_chat_cli import Terminal

    term = Terminal(tuned, "chat", "--model", "sft", "--temperature", "0", "--max-new-tokens", "40")
    try:
        term.expect(r"you> ")
        term.send("what colour is the dog?")
        reply = term.expect(r"bot> (.+?)\r?\nyou> ").group(1)
        # the reply is the assistant's turn and ends there (end of turn), not a run-on continuation
        assert re.match(r"the \S.* is \S", reply) and len(reply.split()) < 10, reply
        term.send("/exit")
        assert term.proc.wait(timeout=60) == 0
    finally:
        term.close()
