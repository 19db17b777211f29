"""Checkpoints: one format for every stage (pretrain, sft, dpo, evaluate, package).

A checkpoint is a directory:

    model.safetensors    weights (fp32 as trained; a tied matrix is stored once, aliases in the metadata)
    model_config.json    the ModelConfig (`ModelConfig.from_dict` rebuilds the model)
    tokenizer_ref.json   a reference to the tokenizer it was trained with: {"hash", "vocab_size", ...}
    trainer_state.pt     only for resumable checkpoints: optimizer, schedule, RNG states, data position, step
    checkpoint.json      the completion marker (step, val loss, training data, ...), written last, with the
                         sha256 and size of every other file ("files")

The config and the tokenizer reference are llmpipe's own formats; their names keep them apart from
the Hugging Face `config.json` and `tokenizer.json` an export may write next to them. Checkpoints
written before that rename (with those two names) still load: `checkpoint_file` finds each file
under the name its checkpoint's marker says it was saved with.

It is written under a `.tmp-*` name and renamed into place, so a crash mid-save leaves the previous
checkpoints untouched; a `step-*` folder without its marker is ignored anyway. Loading checks every
file against the marker's hashes, so a file truncated or changed after the save (a full disk, a bad
copy) is refused by name instead of crashing deep inside safetensors or torch.load; resuming then
falls back to the newest checkpoint that is intact.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmpipe.errors import UserError
from llmpipe.io import atomic_path, sha256_file
from llmpipe.model import GPT, ModelConfig

log = logging.getLogger("llmpipe.train")

WEIGHTS, MODEL_CONFIG, TOKENIZER_REF, STATE, MARKER = (
    "model.safetensors", "model_config.json", "tokenizer_ref.json", "trainer_state.pt", "checkpoint.json")
LEGACY_NAMES = {MODEL_CONFIG: "config.json", TOKENIZER_REF: "tokenizer.json"}  # before the rename
STEP_DIR = re.compile(r"^step-(\d+)$")
CORRUPT_SUFFIX = ".corrupt"  # a corrupt step-* folder set aside: no longer a checkpoint to resume or keep


class CorruptCheckpoint(UserError):
    """A checkpoint file is missing or differs from the hash its marker recorded."""

    def __init__(self, problem: str):
        self.problem = problem  # what and where, without the advice (the resume warning gives its own)
        super().__init__(f"{problem}; this checkpoint cannot be used: load an older one, or rerun the stage "
                         f"that wrote it")


def step_dir(checkpoints: Path, step: int) -> Path:
    return Path(checkpoints) / f"step-{step:06d}"


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias name: first name} for parameters registered twice (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def save_checkpoint(directory: Path | str, state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig,
                    tokenizer: dict[str, Any], meta: dict[str, Any], trainer_state: dict[str, Any] | None = None,
                    aliases: dict[str, str] | None = None, extra_json: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint to `directory` atomically (replacing an existing one); returns `directory`.

    `state_dict` is the full model state on CPU (see distributed.full_model_state); `aliases` names tied
    entries to store once (`tied_aliases(model)`); `meta` goes into the completion marker; `extra_json`
    ({file name: data}) adds JSON files that the marker hashes like the others (a quantized checkpoint's
    quantization.json).
    """
    from safetensors.torch import save_file

    directory, aliases = Path(directory), aliases or {}
    with atomic_path(directory) as tmp:  # temp sibling, renamed into place (replacing an old one) on success
        tmp.mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k not in aliases}
        # one metadata key: safetensors writes its metadata in a Rust HashMap's order, random per process,
        # so two keys would give two runs different bytes for the same weights
        save_file(tensors, str(tmp / WEIGHTS), metadata={"aliases": json.dumps(aliases, sort_keys=True)})
        _write_json(tmp / MODEL_CONFIG, model_cfg.to_dict())
        _write_json(tmp / TOKENIZER_REF, tokenizer)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE)
        for name, data in (extra_json or {}).items():
            _write_json(tmp / name, data)
        _write_json(tmp / MARKER, {**meta, "resumable": trainer_state is not None, "files": _file_records(tmp)})
    return directory


def _file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """{name: {"sha256", "bytes"}} of every file of a checkpoint but its marker."""
    return {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
            for f in sorted(directory.iterdir()) if f.is_file() and f.name != MARKER}


_unverifiable_warned: set[str] = set()


def verify_checkpoint(path: Path | str) -> dict[str, Any]:
    """The marker of `path`, after checking every file it lists; CorruptCheckpoint names the first bad one.

    A marker without "files" (written before checkpoints recorded hashes) is accepted with a warning."""
    path = Path(path)
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as exc:  # missing, or JSON cut short
        raise CorruptCheckpoint(f"{path / MARKER}: unreadable ({exc})") from exc
    records = meta.get("files")
    if records is None:
        if str(path) not in _unverifiable_warned:
            _unverifiable_warned.add(str(path))
            log.warning("%s: saved before checkpoints recorded file hashes; its files cannot be verified", path)
        return meta
    for name, record in sorted(records.items()):
        problem = _file_problem(path / name, record)
        if problem:
            raise CorruptCheckpoint(problem)
    return meta


def _file_problem(file: Path, record: dict[str, Any]) -> str | None:
    if not file.is_file():
        return f"{file}: missing, but {MARKER} lists it"
    size = file.stat().st_size
    if size != record["bytes"]:  # the cheap check first: a truncated file needs no hashing
        return f"{file}: {size} bytes, but {MARKER} recorded {record['bytes']} (truncated or replaced after the save)"
    digest = sha256_file(file)
    if digest != record["sha256"]:
        return f"{file}: sha256 {digest[:16]}... differs from {record['sha256'][:16]}... recorded in {MARKER}"
    return None


def newest_intact_checkpoint(checkpoints: Path | str) -> Path | None:
    """The newest `step-*` checkpoint whose files match its marker, or None.

    Each newer corrupt one is renamed to `step-XXXXXX.corrupt` with a warning naming it: it cannot be
    resumed, and left in place it would count as one of the newest for `prune_checkpoints`, which could
    then delete the intact checkpoint the run resumed from."""
    for path in reversed(list_checkpoints(checkpoints)):
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpoint as exc:
            aside = path.with_name(path.name + CORRUPT_SUFFIX)
            shutil.rmtree(aside, ignore_errors=True)  # an older copy set aside at the same step
            path.rename(aside)
            log.warning("skipping corrupt checkpoint %s (%s): moved it to %s, delete that when you no longer "
                        "need it; resuming from an older checkpoint", path, exc.problem, aside.name)
    return None


def list_checkpoints(checkpoints: Path | str) -> list[Path]:
    """Complete `step-*` checkpoints (marker present), oldest first; half-written folders are skipped."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / MARKER).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints: Path | str) -> Path | None:
    found = list_checkpoints(checkpoints)
    return found[-1] if found else None


def prune_checkpoints(checkpoints: Path | str, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` and the best by val loss; returns what was deleted."""
    found = list_checkpoints(checkpoints)
    keep = set(found[-keep_last:]) if keep_last > 0 else set()
    scored = [(m["val_loss"], p) for p in found if (m := read_meta(p)).get("val_loss") is not None]
    if scored:
        keep.add(min(scored, key=lambda t: t[0])[1])
    deleted = [p for p in found if p not in keep]
    for p in deleted:
        shutil.rmtree(p, ignore_errors=True)
    return deleted


def read_meta(path: Path | str) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


def checkpoint_file(path: Path | str, name: str) -> Path:
    """Where the checkpoint `path` keeps the file `name` (MODEL_CONFIG, TOKENIZER_REF, ...).

    A checkpoint written before the rename has the LEGACY_NAMES instead. Its marker tells: the
    current writer lists MODEL_CONFIG among its files, an older one listed "config.json" or, before
    file hashes, no files at all. The marker decides rather than which file exists, because a Hugging
    Face export may put its own config.json into the same folder."""
    path = Path(path)
    if name in LEGACY_NAMES and MODEL_CONFIG not in read_meta(path).get("files", {}):
        return path / LEGACY_NAMES[name]
    return path / name


def weights_hash(path: Path | str) -> str:
    """The sha256 of a checkpoint's weights file, as its marker records it (computed for an old marker)."""
    record = (read_meta(path).get("files") or {}).get(WEIGHTS)
    return record["sha256"] if record else sha256_file(Path(path) / WEIGHTS)


def read_model_config(path: Path | str) -> ModelConfig:
    return ModelConfig.from_dict(json.loads(checkpoint_file(path, MODEL_CONFIG).read_text()))


def read_tokenizer_ref(path: Path | str) -> dict[str, Any]:
    return json.loads(checkpoint_file(path, TOKENIZER_REF).read_text())


def load_weights(path: Path | str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The full state dict of a checkpoint (aliases restored)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = str(Path(path) / WEIGHTS)
    with safe_open(file, framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    state = load_file(file, device=str(device))
    state.update({alias: state[name] for alias, name in aliases.items()})
    return state


def find_checkpoint(path: Path | str) -> Path:
    """The checkpoint `path` names: itself, or in a stage output dir its final/, else its newest checkpoints/step-*."""
    path = Path(path)
    if (path / MARKER).exists():
        return path
    if (path / "final" / MARKER).exists():
        return path / "final"
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise UserError(f"{path}: no complete checkpoint here (expected {MARKER}, final/ or checkpoints/step-*)")
    return latest


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> tuple[GPT, ModelConfig, dict[str, Any]]:
    """Rebuild the model of a checkpoint: (model in eval mode, its config, meta incl. the tokenizer reference).

    CorruptCheckpoint (a UserError naming the file) if a file differs from what its marker recorded."""
    path = find_checkpoint(path)
    verify_checkpoint(path)
    cfg = read_model_config(path)
    model = GPT(cfg)
    model.load_state_dict(load_weights(path))
    model.to(device).eval()
    meta = {**read_meta(path), "tokenizer": read_tokenizer_ref(path), "path": str(path)}
    return model, cfg, meta


def check_compatible(path: Path, model_cfg: ModelConfig, tokenizer_hash: str, data: dict[str, Any] | None = None,
                     start_over: Path | None = None, action: str = "resume from") -> None:
    """UserError listing every difference that makes resuming `path` with this model, tokenizer and data wrong.

    `data` is what the run records about its training data (`{"sha256": ..., "num_examples": ...}`);
    `start_over` is the folder the message tells the user to delete (default: the checkpoints folder)."""
    saved = read_model_config(path).to_dict()
    wanted = model_cfg.to_dict()
    # the attention kernel is a runtime choice; everything else changes the function or the shapes
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != config {wanted.get(k)!r}"
             for k in sorted(set(saved) | set(wanted)) if k != "attn_backend" and saved.get(k) != wanted.get(k)]
    saved_hash = read_tokenizer_ref(path).get("hash")
    if saved_hash != tokenizer_hash:
        diffs.append(f"tokenizer hash: checkpoint {saved_hash!r} != data {tokenizer_hash!r}")
    diffs += _data_diffs(path, data or {})
    if diffs:
        fix = (f"Restore the old settings and data to continue it, or delete {start_over or path.parent} to start "
               f"from scratch." if action == "resume from" else "Train on the data and tokenizer of that checkpoint, "
               "or start from another one.")
        raise UserError(f"cannot {action} {path}: it was trained with a different setup:\n  " + "\n  ".join(diffs)
                        + "\n" + fix)


def _data_diffs(path: Path, data: dict[str, Any]) -> list[str]:
    saved = read_meta(path).get("data")
    if saved is None:
        if data:
            log.warning("%s: saved before checkpoints recorded their training data; cannot check that it is the same",
                        path)
        return []
    where = f" ({data['dir']})" if data.get("dir") else ""
    return [f"training data {key}{where}: checkpoint {saved.get(key)!r} != now {data[key]!r}"
            for key in sorted(data) if key != "dir" and saved.get(key) != data[key]]


# -- RNG state (weights_only-loadable: tensors and plain Python values only) -----------------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_trainer_state(path: Path | str) -> dict[str, Any]:
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
