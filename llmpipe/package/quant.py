"""Weight-only int8 / int4 quantization (torchao) and the quantized checkpoint format.

    spec = QuantSpec("int4", group_size=32)
    model = quantize_model(model, spec)                  # in place: every Linear and the embedding
    save_quantized(model, spec, out_dir, tokenizer_ref, meta)
    model, cfg, meta = load_quantized(out_dir)           # or load_model(out_dir): it dispatches here

What is quantized: every nn.Linear (attention q/k/v/o, MLP gate/up/down, an untied lm_head) and the
token embedding; only the RMSNorm gains (a few thousand numbers) stay fp32. The embedding (vocab x
d_model) is a large share of a small model's weights (a quarter of the 2 x 128 test model's), so an
fp32 embedding alone would take the int4 file past its 0.18x target. When the
embedding is tied to the output head it is ONE matrix, quantized once per row (= per token for the
lookup, = per output channel for the head) and shared by both modules: stored once, the tie kept,
and the head sees exactly the weights the lookup does. (torchao's `quantize_` would untie it,
quantizing the head as a second copy.)

  int8   symmetric, one fp32 scale per output channel (row); torchao `Int8Tensor`. Run with bf16
         activations: on CPU the linears call `aten._weight_int8pack_mm`, the int8 x bf16 kernel
         (the only CPU int8 path that beats fp32: torchao's own weight-only matmuls convert the
         weight at every call, Int8Tensor 2.5x and IntxUnpackedToInt8Tensor 6.5x slower than fp32 on
         a 2048x512 linear at batch 1, where the kernel was 1.4-2.3x faster, and with fp32 inputs 7x
         slower). Elsewhere (CUDA) the linears use Int8Tensor's matmul.
  int4   symmetric, one fp32 scale per `group_size` consecutive inputs of a row; torchao
         `IntxUnpackedToInt8Tensor` (int4 values held one per int8), bf16 activations. On CPU the
         linears call the tinygemm kernel `aten._weight_int4pack_mm_for_cpu` on its own packing of
         the same values, made at load (3x faster than fp32 on the 2048x512 linear; the tensor's own
         forward dequantizes the weight each call, 33x slower). Elsewhere, that forward.

Greedy decoding through the engine (batch 1, one CPU thread, vocab 4096), tokens/s against fp32:

    preset       int8    int4    int8 with Int8Tensor's matmul    int4 with the tensor's forward
    tiny         0.97x   1.20x   0.72x                             0.25x
    draft        1.19x   1.58x   0.68x                             0.25x
    gpt2-124m    1.56x   2.05x   0.63x                             -
(the smaller the model, the more the per-token overhead outside the matmuls dominates).

torchao chooses the scales and rounds (`choose_qparams_affine`, `quantize_affine`) and holds the
quantized tensors; the file format is ours, because torchao 0.18 has no int4 tensor that is both
packed and usable on an x86 CPU:

    Int4WeightOnlyConfig, packing "plain" / "preshuffled"   ImportError: requires mslk >= 1.0.0
    Int4WeightOnlyConfig, packing "plain_int32"             NotImplementedError: no device 'cpu'
    Int4WeightOnlyConfig, packing "tile_packed_to_4d"       bf16 only, and needs CUDA
    PrototypeInt4WeightOnlyConfig (Int4OpaqueTensor)        runs Linear on CPU (bf16), but holds the
        CPU kernel's pre-packed layout (not portable), has no embedding op (the tied head cannot
        share it), and safetensors cannot save it ("invalid python storage")
    IntxWeightOnlyConfig(torch.int4)                        works, but one int4 per byte (0.29x fp32)

so int4 values are packed here, two per byte, in a layout of our own; the kernel's packing (the one
Int4OpaqueTensor would hold) is made from it at load, in memory only.

A quantized checkpoint is the one checkpoint format (llmpipe.train.checkpoint: atomic, marker with
file hashes written last) with:

    model.safetensors    per quantized weight W (e.g. "layers.0.attn.wq.weight"):
                           W.qdata       int8 (N, K); int4: uint8 (N, K/2), element 2j in the low
                                         nibble and 2j+1 in the high one, each stored as value + 8
                           W.scale       fp32 (N, 1) for int8, (N, K/group_size) for int4
                           W.zero_point  int8, the shape of W.scale (zeros: symmetric)
                         other tensors plain fp32; a tied head stored once ("aliases" metadata)
    quantization.json    {variant, bits, group_size (int4), scheme, compute_dtype, torchao, source,
                          quantized: [W, ...]}
    model_config.json, tokenizer_ref.json, checkpoint.json   as for every checkpoint

Dequantized value = (q - zero_point) * scale. Loading rebuilds the same torchao tensors, so a
loaded model computes exactly what the in-memory quantized one did.

Torch and the standard library at module level: torchao is imported where it is used, so
`is_quantized` costs nothing and the serve engine needs no torchao for unquantized models.
Quantize on CPU. To run elsewhere, load with `device=` (untested here: no GPU): `.to()` of an int4
model is IntxUnpackedToInt8Tensor.to, which rounds the scales to bf16 on the way.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmpipe.errors import UserError

if TYPE_CHECKING:
    from llmpipe.model import GPT, ModelConfig

VARIANTS = ("int8", "int4")
QUANT_FILE = "quantization.json"
PARTS = ("qdata", "scale", "zero_point")
BITS = {"int8": 8, "int4": 4}
COMPUTE_DTYPE = torch.bfloat16  # activations: what the CPU int8 and int4 kernels take


@dataclass(frozen=True)
class QuantSpec:
    """One quantization: `variant` int8 (per output channel; group_size unused) or int4 (groups of
    `group_size` inputs sharing a scale)."""

    variant: str
    group_size: int = 32

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise UserError(f"quantize.variants: unknown variant {self.variant!r}; use one of {', '.join(VARIANTS)} "
                            f"(params.yaml)")
        if self.variant == "int4" and (self.group_size < 2 or self.group_size % 2):
            raise UserError(f"quantize.group_size: {self.group_size} must be an even number >= 2 (two int4 values "
                            f"share a byte); 32 is the usual choice (params.yaml)")

    @property
    def bits(self) -> int:
        return BITS[self.variant]

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPE

    def block(self, in_features: int) -> int:
        """Inputs sharing one scale: the whole row for int8, a group for int4."""
        return in_features if self.variant == "int8" else self.group_size


# -- quantizing -----------------------------------------------------------------------------------

def quantize_model(model: GPT, spec: QuantSpec) -> GPT:
    """Quantize `model` in place (every Linear and the token embedding, a tied head once); returns it in eval mode."""
    targets = quantized_modules(model)
    _check_groups(targets, spec)
    for module in targets.values():
        module.weight = nn.Parameter(quantize_weight(module.weight.detach().float(), spec), requires_grad=False)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    _use_quantized_forwards(model)
    return model.eval()


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: module} whose weight is quantized: every Linear and Embedding, a tied head left out
    (its weight is the embedding's)."""
    embedding = model.tok_embeddings.weight
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and not (name == "lm_head" and m.weight is embedding)}


def _check_groups(targets: dict[str, nn.Module], spec: QuantSpec) -> None:
    for name, module in targets.items():
        width = module.weight.shape[1]
        if width % spec.block(width):
            raise UserError(f"quantize.group_size: {spec.group_size} does not divide the input width {width} of "
                            f"{name}.weight; choose a divisor of every layer's width (e.g. 32) in params.yaml")


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """An fp32 (N, K) weight as torchao's quantized tensor for `spec`."""
    ao = _torchao()
    if spec.variant == "int8":
        q = ao.Int8Tensor.from_hp(weight, ao.PerRow())
    else:
        q = ao.IntxUnpackedToInt8Tensor.from_hp(weight, (1, spec.group_size), torch.int4)
    return quantized_tensor(spec, q.qdata, q.scale, q.zero_point)


def quantized_tensor(spec: QuantSpec, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
                     ) -> torch.Tensor:
    """torchao's tensor for `spec` from its parts (quantizing and loading both build it here, so a
    loaded model is the quantized one), computing in the variant's activation dtype."""
    ao = _torchao()
    block = [1, spec.block(qdata.shape[1])]
    if spec.variant == "int8":
        return ao.Int8Tensor(qdata, scale, block, spec.compute_dtype, zero_point=zero_point)
    return ao.IntxUnpackedToInt8Tensor(qdata, scale, zero_point, torch.int4, tuple(block), spec.compute_dtype, None)


class Int8PackLinear(nn.Linear):
    """A Linear over torchao's per-row Int8Tensor that, on CPU with bf16 inputs, runs the int8 x bf16
    kernel `aten._weight_int8pack_mm` (scales applied inside) instead of Int8Tensor's matmul, which
    converts the whole weight at every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type != "cpu" or x.dtype != torch.bfloat16:
            return F.linear(x, w)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w.qdata, w.scale.view(-1).to(x.dtype))
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., N)


class Int4PackLinear(nn.Linear):
    """A Linear over torchao's grouped int4 IntxUnpackedToInt8Tensor that, on CPU with bf16 inputs, runs
    the tinygemm kernel `aten._weight_int4pack_mm_for_cpu` on the kernel's own packing of the same
    values (buffers made by `_int4_kernel_form`, not saved) instead of dequantizing the whole weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.bfloat16:
            return F.linear(x, self.weight)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), self.int4_packed,
                                                       self.weight.block_size[-1], self.int4_scale_zero)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., N)


def _int4_kernel_form(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, scale_and_zero) for the tinygemm kernel, which computes (u - 8) * scale + zero from
    unsigned nibbles u: u = q + 8, zero = -zero_point * scale, (K/group, N, 2) in bf16."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.qdata.to(torch.int32) + 8, 1)
    scale = w.scale.float()
    zero = -w.zero_point.float() * scale
    return packed, torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


class QuantEmbedding(nn.Embedding):
    """An Embedding over a quantized table that dequantizes only the rows looked up (torchao's embedding
    dequantizes the whole vocab x d_model table for every decoding step)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.weight
        group = w.block_size[-1]
        q = w.qdata[idx].float()  # (..., D)
        zero = w.zero_point[idx].float().repeat_interleave(group, dim=-1)  # (..., D)
        scale = w.scale[idx].float().repeat_interleave(group, dim=-1)  # (..., D)
        return ((q - zero) * scale).to(w.dtype)


def _use_quantized_forwards(model: nn.Module) -> None:
    # a class swap keeps each module's weight and hooks; only forward differs from nn.Linear / nn.Embedding
    ao = _torchao()
    for module in model.modules():
        if type(module) is nn.Linear and isinstance(module.weight, ao.Int8Tensor):
            module.__class__ = Int8PackLinear
        elif (type(module) is nn.Linear and isinstance(module.weight, ao.IntxUnpackedToInt8Tensor)
              and module.weight.device.type == "cpu"):  # the kernel's packing is a CPU one
            packed, scale_zero = _int4_kernel_form(module.weight)
            module.register_buffer("int4_packed", packed, persistent=False)
            module.register_buffer("int4_scale_zero", scale_zero, persistent=False)
            module.__class__ = Int4PackLinear
        elif type(module) is nn.Embedding and hasattr(module.weight, "qdata"):
            module.__class__ = QuantEmbedding


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], (N, K) with K even -> uint8 (N, K/2): element 2j low nibble, 2j+1 high."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 (N, K/2) -> int8 (N, K)."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


# -- the checkpoint -------------------------------------------------------------------------------

def save_quantized(model: GPT, spec: QuantSpec, out_dir: Path, tokenizer_ref: dict, meta: dict) -> Path:
    """Write the quantized `model` as a checkpoint at `out_dir` (atomic); returns it. `meta` goes into the
    marker; meta["source"] (the checkpoint it was quantized from) also into quantization.json."""
    from llmpipe.train.checkpoint import save_checkpoint, tied_aliases

    tensors, quantized = {}, []
    for name, p in model.named_parameters():  # a tied head once, under the embedding's name
        if hasattr(p, "qdata"):
            quantized.append(name)
            qdata = pack_int4(p.qdata) if spec.variant == "int4" else p.qdata
            tensors.update({f"{name}.qdata": qdata, f"{name}.scale": p.scale.float(),
                            f"{name}.zero_point": p.zero_point.to(torch.int8)})
        else:
            tensors[name] = p.detach().float()
    info = {"variant": spec.variant, "bits": spec.bits, "group_size": spec.group_size if spec.variant == "int4" else None,
            "scheme": "symmetric", "compute_dtype": str(spec.compute_dtype).removeprefix("torch."),
            "torchao": _torchao().__version__, "source": meta.get("source"), "quantized": quantized}
    return save_checkpoint(out_dir, tensors, model.config, tokenizer_ref, meta, aliases=tied_aliases(model),
                           extra_json={QUANT_FILE: info})


def is_quantized(checkpoint: Path) -> bool:
    return (Path(checkpoint) / QUANT_FILE).is_file()


def file_size(checkpoint: Path) -> int:
    """Bytes of the checkpoint's weights file (model.safetensors)."""
    from llmpipe.train.checkpoint import WEIGHTS

    return (Path(checkpoint) / WEIGHTS).stat().st_size


def read_quantization(checkpoint: Path) -> tuple[QuantSpec, dict[str, Any]]:
    """(the spec, the whole quantization.json) of a quantized checkpoint; UserError naming the file and key."""
    path = Path(checkpoint) / QUANT_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        variant, quantized = info["variant"], info["quantized"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable quantization record ({type(exc).__name__}: {exc}); rerun the "
                        f"quantize stage (llmpipe stage quantize)") from None
    if variant not in VARIANTS:
        raise UserError(f"{path}: variant {variant!r} is not one of {', '.join(VARIANTS)}; this llmpipe cannot load "
                        f"it: rerun the quantize stage")
    spec = QuantSpec(variant, info.get("group_size") or QuantSpec.group_size)
    return spec, {**info, "quantized": list(quantized)}


def load_quantized(checkpoint: Path, device="cpu") -> tuple[GPT, ModelConfig, dict]:
    """Rebuild a quantized checkpoint: (model in eval mode on `device`, its config, meta incl. the tokenizer
    reference and "quantization"); the contract of load_checkpoint. UserError naming the file if one was
    changed after the save (its hash), or a tensor is missing or of the wrong shape."""
    from safetensors.torch import load_file

    from llmpipe.model import GPT
    from llmpipe.model.gpt import rotary_tables
    from llmpipe.train.checkpoint import (WEIGHTS, find_checkpoint, read_meta, read_model_config, read_tokenizer_ref,
                                          verify_checkpoint)

    path = find_checkpoint(checkpoint)
    verify_checkpoint(path)
    spec, info = read_quantization(path)
    cfg = read_model_config(path)
    file = path / WEIGHTS
    # straight onto the device: Module.to would go through IntxUnpackedToInt8Tensor.to, which casts the
    # int4 scales to its compute dtype (bf16), and the model would no longer be the one quantized
    tensors = load_file(str(file), device=str(device))
    with torch.device("meta"):  # shapes only: every weight comes from the file
        model = GPT(cfg)
    targets = quantized_modules(model)
    if sorted(f"{name}.weight" for name in targets) != sorted(info["quantized"]):
        raise UserError(f"{path / QUANT_FILE}: lists quantized weights {sorted(info['quantized'])} but the model of "
                        f"model_config.json has {sorted(f'{n}.weight' for n in targets)}; rerun the quantize stage")
    for name, module in targets.items():
        parts = _weight_parts(file, tensors, f"{name}.weight", tuple(module.weight.shape), spec)
        module.weight = nn.Parameter(quantized_tensor(spec, *parts), requires_grad=False)
    _load_plain(model, tensors, file)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    model.rope_cos, model.rope_sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device)
    _use_quantized_forwards(model)
    model.eval()
    meta = {**read_meta(path), "tokenizer": read_tokenizer_ref(path), "path": str(path), "quantization": info}
    return model, cfg, meta


def _weight_parts(file: Path, tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], spec: QuantSpec
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qdata int8 (N, K), scale, zero_point) of `name`, popped from `tensors`, each checked against the model."""
    n, k = shape
    groups = k // spec.block(k)
    expected = {"qdata": ((n, k // 2), torch.uint8) if spec.variant == "int4" else ((n, k), torch.int8),
                "scale": ((n, groups), torch.float32), "zero_point": ((n, groups), torch.int8)}
    parts = []
    for part in PARTS:
        key = f"{name}.{part}"
        if key not in tensors:
            raise UserError(f"{file}: no tensor {key!r}, which a {spec.variant} checkpoint of this model needs; the "
                            f"file was not written by save_quantized: rerun the quantize stage")
        tensor = tensors.pop(key)
        want_shape, want_dtype = expected[part]
        if tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
            raise UserError(f"{file}: {key!r} is {tensor.dtype} {tuple(tensor.shape)}, expected {want_dtype} "
                            f"{want_shape} for {spec.variant}; rerun the quantize stage")
        # a fresh copy: safetensors hands out views into one buffer at the file's offsets, which need not
        # be 64-byte aligned, and aten._weight_int8pack_mm (AVX loads) segfaults on a misaligned weight
        parts.append(tensor.clone())
    qdata, scale, zero_point = parts
    return (unpack_int4(qdata) if spec.variant == "int4" else qdata), scale, zero_point


def _load_plain(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """The unquantized tensors (norm gains) into `model`; UserError naming a missing or unknown key."""
    result = model.load_state_dict(tensors, strict=False, assign=True)
    quantized = {name for name, p in model.named_parameters(remove_duplicate=False) if hasattr(p, "qdata")}
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    missing = sorted(set(result.missing_keys) - quantized - tied)
    if missing or result.unexpected_keys:
        raise UserError(f"{file}: missing tensors {missing}, unknown tensors {sorted(result.unexpected_keys)} for the "
                        f"model of model_config.json; rerun the quantize stage")


@contextlib.contextmanager
def _quiet(*loggers: str):
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@functools.cache
def _torchao() -> SimpleNamespace:
    """What is used of torchao, imported on first use. Its import logs a warning for each CUDA kernel
    library it cannot load (none is used here) and torch a deprecation for one of its enums: noise on
    a CPU machine."""
    with _quiet("torchao", "torch.utils._pytree"):
        import torchao
        from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor, PerRow
    return SimpleNamespace(__version__=torchao.__version__, Int8Tensor=Int8Tensor,
                           IntxUnpackedToInt8Tensor=IntxUnpackedToInt8Tensor, PerRow=PerRow)
