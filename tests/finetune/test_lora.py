"""LoRA through peft on our GPT: what trains, what merging and saving keep, what disabling gives back."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llmpipe.errors import UserError
from llmpipe.train.task import lm_loss
from llmpipe.finetune.lora import LoraAdapter, LoraSettings, apply_lora, load_adapter, merged, save_adapter
from llmpipe.model.config import ModelConfig
from llmpipe.model.gpt import GPT
from tests.helpers import ROOT, torch_threads

CFG = ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=16)
ALL_LINEAR = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def batch(seed: int = 0, rows: int = 4, T: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (rows, T + 1), generator=g)
    return {"idx": ids[:, :-1], "targets": ids[:, 1:]}


def base_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def logits(model, b: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(b["idx"])[0]


def trained_adapter(settings: LoraSettings = LoraSettings(target_modules=ALL_LINEAR), steps: int = 5):
    """(untouched copy of the base, the adapted model after a few steps: a clearly non-zero update)."""
    base = base_model()
    reference = copy.deepcopy(base)
    peft_model = apply_lora(base, settings)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        loss, _ = lm_loss(peft_model, batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return reference, peft_model


def test_merged_weights_give_the_adapted_models_logits():
    base, peft_model = trained_adapter()
    b = batch(99)
    adapted = logits(peft_model, b)
    assert (adapted - logits(base, b)).abs().max() > 1e-3  # the adapter really changes the model
    model = merged(peft_model)
    assert type(model) is GPT
    assert list(model.state_dict()) == list(base.state_dict())
    assert model.lm_head.weight is model.tok_embeddings.weight
    torch.testing.assert_close(logits(model, b), adapted, rtol=0, atol=1e-5)


def test_only_adapter_parameters_train_and_a_step_changes_only_them():
    base = base_model()
    peft_model = apply_lora(base, LoraSettings())
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the default targets are the attention projections: 2 layers x 4 projections x (A, B)
    assert len(trainable) == 2 * 4 * 2
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    # every parameter handed to the optimizer, as a careless caller would: frozen ones get no grad
    opt = torch.optim.AdamW(peft_model.parameters(), lr=1e-2, weight_decay=0.1)
    loss, _ = lm_loss(peft_model, batch())
    loss.backward()
    opt.step()
    for name, p in peft_model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in trainable), name


def test_disabled_adapter_gives_the_base_models_logits_exactly():
    base, peft_model = trained_adapter()
    b = batch(7)
    assert not torch.equal(logits(peft_model, b), logits(base, b))
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, b), logits(base, b))
    assert not torch.equal(logits(peft_model, b), logits(base, b))  # re-enabled on leaving


def test_saved_adapter_reloads_into_a_fresh_base_with_the_same_logits(tmp_path):
    base, peft_model = trained_adapter()
    out = tmp_path / "adapter"
    save_adapter(peft_model, out)
    save_adapter(peft_model, out)  # rewriting an existing adapter directory replaces it
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)  # the adapter alone, not the base weights
    reloaded = load_adapter(copy.deepcopy(base), out)
    b = batch(3)
    assert torch.equal(logits(reloaded, b), logits(peft_model, b))


def test_a_target_that_names_no_linear_layer_lists_the_real_ones():
    with pytest.raises(UserError) as err:
        apply_lora(base_model(), LoraSettings(target_modules=("wq", "q_proj")))
    message = str(err.value)
    assert "q_proj" in message
    for name in ALL_LINEAR:
        assert name in message
    with pytest.raises(UserError, match="linear layers are"):  # a block, not a linear layer
        apply_lora(base_model(), LoraSettings(target_modules=("attn",)))


def test_lora_on_the_tied_lm_head_is_refused():
    with pytest.raises(UserError, match="tie_embeddings"):
        apply_lora(base_model(), LoraSettings(target_modules=("wq", "lm_head")))


def test_settings_reject_what_lora_cannot_use():
    with pytest.raises(UserError) as err:
        LoraSettings(r=0, dropout=1.0, target_modules=())
    assert "r must be" in str(err.value) and "dropout" in str(err.value) and "target_modules" in str(err.value)


def test_losses_and_lora_import_without_peft():
    # peft is needed only once adapters are applied: a full fine-tune runs where it is not installed
    probe = ("import sys; sys.modules['peft'] = None\n"
             "import llmpipe.finetune.losses, llmpipe.finetune.lora\n"
             "from llmpipe.finetune.lora import LoraSettings; LoraSettings()\n"
             "print('ok')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_trainers_adapter_saves_the_adapter_and_exports_the_merged_model(tmp_path):
    base = base_model()
    adapter = LoraAdapter(LoraSettings(target_modules=ALL_LINEAR))
    module = adapter.wrap(copy.deepcopy(base))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # what training would have made of the zero-initialised update
    b = batch(5)
    adapted = logits(module, b)
    assert (adapted - logits(base, b)).abs().max() > 1e-3
    model = adapter.export(module, tmp_path)
    assert type(model) is GPT and list(model.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(logits(model, b), adapted, rtol=0, atol=1e-5)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, b), adapted, rtol=0, atol=1e-6)
