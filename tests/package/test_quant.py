"""Weight-only int8/int4 quantization on a model trained on real text: the size and held-out loss
targets of the issue, loading through load_model, generation, and refusals that name what to fix."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig
from llmpipe.package.quant import (QUANT_FILE, QuantSpec, file_size, is_quantized, load_quantized, pack_int4,
                                   quantize_model, save_quantized, unpack_int4)
from llmpipe.serve.engine import Engine
from llmpipe.serve.load import load_model
from llmpipe.serve.sampling import SamplingParams
from llmpipe.train.checkpoint import load_checkpoint, read_tokenizer_ref
from tests.helpers import torch_threads
from tests.package.conftest import SEQ_LEN

# (max file size / the fp32 file's, max held-out loss / fp32's): the issue's targets. The loss ratio is
# the bits-per-byte ratio: same tokens, same bytes, so bpb = mean loss * tokens / bytes / ln 2 scales alike.
TARGETS = {"int8": (0.30, 1.005), "int4": (0.18, 1.03)}
PROMPTS = ["ROMEO:\nWhat", "Now is the winter of our", ""]


@pytest.fixture(scope="module")
def project(trained_project: Path, tmp_path_factory) -> Path:
    """A project of its own (the trained one's tokenizer and fp32 model) to write quantized models into."""
    root = tmp_path_factory.mktemp("quant")
    (root / "dvc.yaml").write_text("stages: {}\n")
    for part in ("tokenizer", "pretrain/final"):
        shutil.copytree(trained_project / "models" / part, root / "models" / part)
    return root


@pytest.fixture(scope="module")
def quantized(project: Path) -> dict[str, tuple[torch.nn.Module, Path]]:
    """{variant: (the in-memory quantized model, its saved checkpoint)}."""
    source = project / "models" / "pretrain" / "final"
    fp32, _, _ = load_checkpoint(source)
    out = {}
    for variant in TARGETS:
        spec = QuantSpec(variant)
        model = quantize_model(copy.deepcopy(fp32), spec)
        path = save_quantized(model, spec, project / "models" / "quantized" / variant, read_tokenizer_ref(source),
                              {"source": "models/pretrain/final"})
        out[variant] = (model, path)
    return out


@pytest.fixture(scope="module")
def heldout(project: Path, corpus_text: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(inputs, targets) of the held-out windows (the last tenth of the token stream, which the model
    never trained on) and the unigram cross-entropy there (counts from the training nine tenths)."""
    from llmpipe.tokenizer import Tokenizer

    tok = Tokenizer.load(project / "models" / "tokenizer")
    stream = np.array(tok.encode(corpus_text), dtype=np.int64)
    cut = len(stream) * 9 // 10
    train, held = stream[:cut], stream[cut:]
    n = (len(held) - 1) // SEQ_LEN
    windows = torch.from_numpy(held[: n * SEQ_LEN + 1])
    inputs = windows[:-1].view(n, SEQ_LEN)
    targets = windows[1:].view(n, SEQ_LEN)
    counts = np.bincount(train, minlength=tok.vocab_size) + 1.0
    unigram = float(-np.log(counts / counts.sum())[targets.numpy()].mean())
    return inputs, targets, unigram


def mean_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad(), torch_threads(1):
        total = sum(F.cross_entropy(model(x)[0].float().flatten(0, 1), y.flatten(), reduction="sum")
                    for x, y in zip(inputs.split(8), targets.split(8)))
    return float(total) / targets.numel()


def test_quantized_files_meet_the_size_targets(project: Path, quantized):
    fp32 = file_size(project / "models" / "pretrain" / "final")
    for variant, (max_ratio, _) in TARGETS.items():
        path = quantized[variant][1]
        assert is_quantized(path)
        ratio = file_size(path) / fp32
        assert ratio <= max_ratio, f"{variant}: {ratio:.3f} x the fp32 file, target {max_ratio}"
    from safetensors import safe_open

    with safe_open(str(quantized["int4"][1] / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
    assert "tok_embeddings.weight.qdata" in names and not any(n.startswith("lm_head") for n in names)  # tied: once


def test_heldout_loss_within_the_targets(project: Path, quantized, heldout):
    inputs, targets, unigram = heldout
    fp32, _, _ = load_checkpoint(project / "models" / "pretrain" / "final")
    base = mean_loss(fp32, inputs, targets)
    # a model that learnt nothing beyond token frequencies would meet a ratio bound for free: this one
    # predicts from context (5.6 nats against the unigram's 6.1 here), through the weights quantized
    assert base < unigram - 0.4, f"fp32 held-out loss {base:.3f} vs unigram {unigram:.3f}: the model is not trained"
    for variant, (_, max_ratio) in TARGETS.items():
        loaded, _, _ = load_quantized(quantized[variant][1])
        ratio = mean_loss(loaded, inputs, targets) / base
        print(f"{variant}: held-out loss {ratio:.4f} x fp32 ({base:.3f}; unigram {unigram:.3f})")
        assert ratio <= max_ratio, f"{variant}: held-out loss {ratio:.4f} x fp32's, target {max_ratio}"


def test_every_loaded_weight_is_within_half_a_step_of_the_fp32_one(project: Path, quantized):
    """Per element, the exact guard of what a loss ratio on a small model sees only in aggregate: on this
    model even int2 would move the held-out loss by just 1 %, so a wrong nibble order, group layout or
    scale must show here."""
    fp32 = dict(load_checkpoint(project / "models" / "pretrain" / "final")[0].named_parameters())
    for variant, (_, path) in quantized.items():
        model, _, meta = load_quantized(path)
        for name in meta["quantization"]["quantized"]:
            w = model.get_parameter(name)
            step = w.scale.float().repeat_interleave(w.block_size[-1], dim=-1)  # (N, K)
            zero = w.zero_point.float().repeat_interleave(w.block_size[-1], dim=-1)
            error = ((w.qdata.float() - zero) * step - fp32[name].detach()).abs()  # in fp32, not the compute dtype
            assert bool((error <= step * (0.5 + 1e-4)).all()), f"{variant} {name}: max error {error.max():.3g}"
            assert float(error.max()) > 0, f"{variant} {name}: not quantized"
        for name, linear in model.named_modules():  # each one's forward: the CPU kernels on their own packing
            if isinstance(linear, torch.nn.Linear):
                x = torch.randn(4, linear.in_features, dtype=QuantSpec(variant).compute_dtype)
                reference = x.float() @ linear.weight.dequantize().float().T
                assert torch.allclose(linear(x).float(), reference, rtol=0.02,
                                      atol=0.02 * float(reference.abs().max())), f"{variant} {name}"


def test_load_model_gives_the_quantized_model_and_it_generates(quantized):
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    for variant, (in_memory, path) in quantized.items():
        model, tok, info = load_model(path)
        assert info.path == str(path)
        assert all(hasattr(model.get_submodule(n.removesuffix(".weight")).weight, "qdata")
                   for n in json.loads((path / QUANT_FILE).read_text())["quantized"])
        assert model.lm_head.weight is model.tok_embeddings.weight
        ids = torch.tensor([tok.encode("ROMEO:\nWhat say you, my lord? 1234")])
        with torch.no_grad(), torch_threads(1):
            assert torch.equal(model(ids)[0], in_memory(ids)[0]), f"{variant}: loading changed the model"
        with torch_threads(1):
            loaded = Engine(model, tok).generate(PROMPTS, params)
            expected = Engine(in_memory, tok).generate(PROMPTS, params)
        assert [c.token_ids for c in loaded] == [c.token_ids for c in expected], variant
        assert all(c.completion_tokens > 0 and c.text.strip() for c in loaded), variant


def test_loaded_weights_are_aligned_for_the_cpu_kernels(quantized):
    """safetensors gives tensors at the file's offsets; aten._weight_int8pack_mm segfaulted (SIGSEGV, the
    quantize stage on the demo model) on a weight 8 bytes off a 64-byte boundary."""
    for variant, (_, path) in quantized.items():
        model, _, _ = load_model(path)
        for name in json.loads((path / QUANT_FILE).read_text())["quantized"]:
            weight = model.get_submodule(name.removesuffix(".weight")).weight
            assert weight.qdata.data_ptr() % 64 == 0 and weight.scale.data_ptr() % 64 == 0, f"{variant} {name}"


def test_a_changed_weights_file_is_refused_by_name(quantized, tmp_path: Path):
    path = shutil.copytree(quantized["int4"][1], tmp_path / "int4")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # inside the packed weights: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.safetensors.*sha256"):
        load_model(path, tokenizer=quantized["int4"][1].parents[1] / "tokenizer")


def test_a_bad_variant_or_group_size_names_the_key(quantized):
    with pytest.raises(UserError, match=r"quantize\.variants.*'int3'.*int8, int4"):
        QuantSpec("int3")
    model = GPT(ModelConfig.from_preset("tiny", 1024, n_layer=1, d_model=128))
    with pytest.raises(UserError, match=r"quantize\.group_size: 48 does not divide .* 128 of tok_embeddings\.weight"):
        quantize_model(model, QuantSpec("int4", group_size=48))
    assert not any(hasattr(p, "qdata") for p in model.parameters())  # refused before any weight changed


def test_int4_packing_round_trips_every_value():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)[:, torch.randperm(32)]  # (3, 32)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), values)


def test_the_engine_loads_unquantized_models_without_torchao(project: Path):
    code = ("import sys; from llmpipe.serve.load import load_model; "
            f"load_model({str(project / 'models' / 'pretrain')!r}); print('torchao' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False"
