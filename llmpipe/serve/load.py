"""One loader for every later stage and command: `load_model(source) -> (model, tokenizer, info)`.

`source` is one of

    a checkpoint directory       holding checkpoint.json (a step-* folder, or a stage's final/)
    a quantized checkpoint       one with quantization.json too (models/quantized/int8, .../int4): its
                                 int8/int4 weights, through llmpipe.package.quant (which needs torchao)
    a stage output directory     its final/, else its newest checkpoints/step-* (find_checkpoint)
    a stage name                 "pretrain": that stage's "model" output in the current project

    a registered version       models:/<name>@<alias> or models:/<name>/<version>: its checkpoint and
                                 tokenizer, downloaded once into <project>/.llmpipe/registry/ (pyfunc.py)

and, once the issue that adds it lands, a Hugging Face export (refused today with a message naming
what is supported; see `_refuse_unsupported`).

The tokenizer is the project's (the tokenizer stage's output), or the directory given. It must be
the one the checkpoint was trained with: its sha256 equals the checkpoint's tokenizer_ref.json hash,
otherwise token ids would silently mean other text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmpipe.errors import UserError

if TYPE_CHECKING:
    from llmpipe.model import GPT
    from llmpipe.tokenizer.sentencepiece_bpe import Tokenizer

REGISTRY_PREFIX = "models:/"
SUPPORTED = ("a checkpoint directory, a stage output directory (e.g. models/pretrain), a stage name (e.g. pretrain) "
             "or a registered version (models:/name@alias, models:/name/N)")


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from."""

    source: str  # what the caller asked for
    path: str  # the checkpoint directory loaded
    step: int | None
    val_loss: float | None
    tokenizer_hash: str
    tokenizer_dir: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model(source: str | Path, device: str = "cpu", tokenizer: str | Path | None = None
               ) -> tuple[GPT, Tokenizer, ModelInfo]:
    """(model in eval mode on `device`, its tokenizer, info). UserError if `source` names no model or
    the tokenizer is not the one the checkpoint was trained with."""
    from llmpipe.train.checkpoint import find_checkpoint, read_tokenizer_ref

    _refuse_unsupported(source)
    if str(source).startswith(REGISTRY_PREFIX):
        source_dir, tokenizer = _registry_source(str(source), tokenizer)
    else:
        source_dir = _checkpoint_source(source)
    checkpoint = find_checkpoint(source_dir)
    tok_dir = Path(tokenizer) if tokenizer is not None else _project_tokenizer(checkpoint)
    tok = _load_tokenizer(tok_dir)
    _check_tokenizer(checkpoint, read_tokenizer_ref(checkpoint), tok, tok_dir)  # before reading the weights
    model, cfg, meta = _load_weights(checkpoint, device)
    if cfg.vocab_size != tok.vocab_size:
        raise UserError(f"{checkpoint}: model vocab_size {cfg.vocab_size} != tokenizer vocab_size {tok.vocab_size} "
                        f"({tok_dir}); load the tokenizer it was trained with")
    info = ModelInfo(source=str(source), path=str(checkpoint), step=meta.get("step"), val_loss=meta.get("val_loss"),
                     tokenizer_hash=tok.hash, tokenizer_dir=str(tok_dir))
    return model, tok, info


def _load_weights(checkpoint: Path, device: str) -> tuple[GPT, Any, dict[str, Any]]:
    """load_checkpoint, or load_quantized for a quantized checkpoint (the only path that imports torchao)."""
    from llmpipe.package.quant import is_quantized, load_quantized
    from llmpipe.train.checkpoint import load_checkpoint

    return load_quantized(checkpoint, device) if is_quantized(checkpoint) else load_checkpoint(checkpoint, device)


def _refuse_unsupported(source: str | Path) -> None:
    """The sources later issues add: a clear refusal now, in one place to replace then."""
    if str(source).startswith(REGISTRY_PREFIX):
        return
    path = Path(source)
    if (path / "config.json").exists() and not (path / "checkpoint.json").exists():
        config = _read_json(path / "config.json")
        if "model_type" in config or "architectures" in config:  # what transformers writes
            raise UserError(f"{path} is a Hugging Face export ({config.get('model_type', 'config.json')}); loading "
                            f"those is not supported yet: give {SUPPORTED}")


def _registry_source(uri: str, tokenizer: str | Path | None) -> tuple[Path, str | Path]:
    """(checkpoint dir, tokenizer dir) of a registered version, cached under the current project;
    a tokenizer given explicitly wins (and is still checked against the checkpoint)."""
    from llmpipe.io import project_root
    from llmpipe.serve.pyfunc import registry_checkpoint  # imports MLflow: only for a registry source

    checkpoint, registered_tokenizer = registry_checkpoint(uri, project_root())
    return checkpoint, tokenizer if tokenizer is not None else registered_tokenizer


def _checkpoint_source(source: str | Path) -> Path:
    """An existing path as it is; otherwise a stage name, resolved to that stage's model output."""
    path = Path(source)
    if path.exists():
        return path
    from llmpipe.io import project_root
    from llmpipe.stages import STAGES

    name = str(source)
    if name not in STAGES:
        raise UserError(f"{source}: no such directory and no such stage; give {SUPPORTED} "
                        f"(stages with a model: {', '.join(_model_stages()) or 'none'})")
    outputs = STAGES[name].outputs
    if "model" not in outputs:
        raise UserError(f"stage {name!r} produces no model (its outputs: {', '.join(outputs) or 'none'}); "
                        f"stages with a model: {', '.join(_model_stages())}")
    root = project_root()
    model_dir = root / outputs["model"]
    if not model_dir.exists():
        raise UserError(f"{model_dir} does not exist: run the {name} stage first (llmpipe stage {name})")
    return model_dir


def _model_stages() -> list[str]:
    from llmpipe.stages import STAGES

    return [name for name, spec in STAGES.items() if "model" in spec.outputs]


def _project_tokenizer(checkpoint: Path) -> Path:
    """The tokenizer stage's output in the project holding `checkpoint` (or $LLMPIPE_PROJECT, or the cwd's)."""
    from llmpipe.io import project_root
    from llmpipe.stages import STAGES

    try:
        root = project_root(checkpoint)
    except UserError as exc:
        raise UserError(f"{checkpoint} is not inside an llmpipe project, so its tokenizer is not known ({exc}); "
                        f"pass the tokenizer directory it was trained with explicitly") from None
    return root / STAGES["tokenizer"].outputs["tokenizer"]


def _load_tokenizer(directory: Path) -> Tokenizer:
    from llmpipe.tokenizer import Tokenizer

    return Tokenizer.load(directory)


def _check_tokenizer(checkpoint: Path, ref: dict[str, Any], tok: Tokenizer, tok_dir: Path) -> None:
    trained_with = ref.get("hash")
    if trained_with != tok.hash:
        raise UserError(f"{checkpoint} was trained with tokenizer {trained_with} (its tokenizer_ref.json), but "
                        f"{tok_dir} holds tokenizer {tok.hash}: pass the tokenizer directory it was trained with, "
                        f"or retrain the model on this tokenizer's tokens (rerun the tokenizer and pretrain stages)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
