"""The packaged model as an MLflow pyfunc: `mlflow.pyfunc.load_model(uri).predict(df, params=...)`
and `mlflow models serve` generate with llmpipe's own engine.

Input: a DataFrame with one request per row, either a `prompt` (text to continue) or `messages` (a
chat: a list of {role, content}, rendered with the tokenizer's chat template and a generation prompt;
the reply ends at the model's end of turn). Output: one reply per row, a DataFrame column `text`.
Params (the signature's ParamSchema, so `mlflow models serve` passes them through):
max_new_tokens, temperature (0 = greedy), top_k (0 = all), seed.

The signature is explicit: MLflow 3.17 infers one from a type-hinted `predict` but drops the params,
and overrides an explicit signature given on top of the hints (with a warning only), so `predict`
carries no type hints.

`registry_checkpoint(uri, root)` is what `llmpipe.serve.load.load_model("models:/name@alias")` uses:
it downloads only the version's checkpoint and tokenizer (not the HF export or GGUF files) into
<project>/.llmpipe/registry/<name>/<version>/.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

from llmpipe.errors import UserError

CHECKPOINT, TOKENIZER = "checkpoint", "tokenizer"
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 128, "temperature": 0.0, "top_k": 0, "seed": 0}
_PARAM_TYPES = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "seed": "long"}
REGISTRY_CACHE = Path(".llmpipe") / "registry"
_COMPLETE = ".complete"  # written last: a cache folder without it was cut short and is fetched again


class LlmpipeModel(mlflow.pyfunc.PythonModel):
    """Generation with the engine, on the checkpoint and tokenizer logged as this model's artifacts."""

    def load_context(self, context) -> None:
        from llmpipe.serve.engine import Engine, default_device
        from llmpipe.serve.load import load_model

        device = default_device()
        model, tok, _ = load_model(context.artifacts[CHECKPOINT], device, tokenizer=context.artifacts[TOKENIZER])
        self.engine = Engine(model, tok, device)

    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"text": generate_rows(self.engine, _frame(model_input), params or {})})


def generate_rows(engine, frame: pd.DataFrame, params: dict[str, Any]) -> list[str]:
    """One reply per row: prompts continue as text, messages as a chat turn ending at end of turn."""
    settings = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    prompts, chats = _split_rows(frame)
    replies: dict[int, str] = {}
    tok = engine.tokenizer
    for rows, ids, end_ids in ((prompts, engine.encode([p for _, p in prompts]), ()),
                               (chats, [tok.apply_chat_template(m, add_generation_prompt=True) for _, m in chats],
                                (tok.end_of_turn_id,))):
        if rows:
            done = engine.generate(ids, [_sampling(settings, engine.max_seq_len - len(i)) for i in ids],
                                   end_ids=end_ids)
            replies.update({k: c.text for (k, _), c in zip(rows, done)})
    return [replies[k] for k in range(len(frame))]


def _frame(model_input) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input.reset_index(drop=True)
    if isinstance(model_input, dict):
        return pd.DataFrame(model_input)
    if isinstance(model_input, list) and all(isinstance(x, str) for x in model_input):
        return pd.DataFrame({"prompt": model_input})
    return pd.DataFrame(list(model_input))


def _split_rows(frame: pd.DataFrame) -> tuple[list[tuple[int, str]], list[tuple[int, list[dict[str, str]]]]]:
    """(row, prompt) and (row, messages) pairs; a row with neither is a UserError naming it."""
    prompts, chats = [], []
    for k in range(len(frame)):
        messages = frame["messages"].iloc[k] if "messages" in frame else None
        prompt = frame["prompt"].iloc[k] if "prompt" in frame else None
        if isinstance(messages, (list, tuple)) or hasattr(messages, "tolist"):
            chats.append((k, [{"role": str(m["role"]), "content": str(m["content"])} for m in list(messages)]))
        elif isinstance(prompt, str):
            prompts.append((k, prompt))
        else:
            raise UserError(f"input row {k}: give a `prompt` (text) or `messages` (a list of {{role, content}}); "
                            f"it has neither")
    return prompts, chats


def _sampling(settings: dict[str, Any], room: int):
    """SamplingParams for one row; max_new_tokens shrinks to the room the prompt leaves in the context
    (a served request should get a shorter reply, not an error, as `llmpipe chat` does)."""
    from llmpipe.serve.sampling import SamplingParams

    return SamplingParams(temperature=float(settings["temperature"]), top_k=int(settings["top_k"]),
                          seed=int(settings["seed"]), max_new_tokens=max(1, min(int(settings["max_new_tokens"]), room)))


def signature() -> ModelSignature:
    message = Object([Property("role", "string"), Property("content", "string")])
    inputs = Schema([ColSpec("string", "prompt", required=False), ColSpec(Array(message), "messages", required=False)])
    params = ParamSchema([ParamSpec(name, _PARAM_TYPES[name], default) for name, default in DEFAULT_PARAMS.items()])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "text")]), params=params)


def input_example() -> pd.DataFrame:
    return pd.DataFrame({"prompt": ["Once upon a time"]})


def log_packaged_model(checkpoint: Path, tokenizer_dir: Path, extra_artifacts: dict[str, Path] | None = None,
                       name: str = "model") -> mlflow.models.model.ModelInfo:
    """Log the model into the active MLflow run: the checkpoint and tokenizer it generates with, and
    `extra_artifacts` (e.g. "hf": the export dir, "gguf": a file, "card": README.md) beside them.
    Returns MLflow's ModelInfo (its model_uri is what to register)."""
    artifacts = {CHECKPOINT: str(checkpoint), TOKENIZER: str(tokenizer_dir),
                 **{key: str(path) for key, path in (extra_artifacts or {}).items()}}
    missing = [f"{key}={path}" for key, path in artifacts.items() if not Path(path).exists()]
    if missing:
        raise UserError(f"cannot package the model: missing {', '.join(missing)}; run the stages that write them")
    # explicit requirements: inferring them would load the model once more in a subprocess; serving
    # with --env-manager local uses this environment, where llmpipe itself is installed
    return mlflow.pyfunc.log_model(name=name, python_model=LlmpipeModel(), artifacts=artifacts,
                                   signature=signature(), input_example=input_example(),
                                   pip_requirements=_requirements())


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "numpy", "pandas", "sentencepiece", "safetensors")]


def registry_checkpoint(uri: str, root: Path) -> tuple[Path, Path]:
    """(checkpoint dir, tokenizer dir) of the registered version `uri` (models:/name@alias or
    models:/name/N), downloaded once into root/.llmpipe/registry/<name>/<version>/."""
    from llmpipe.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(root))
    name, version = _resolve(uri, mlflow.MlflowClient())
    cache = root / REGISTRY_CACHE / name / str(version)
    if not (cache / _COMPLETE).exists():
        _download(f"models:/{name}/{version}", cache)
    paths = json.loads((cache / _COMPLETE).read_text(encoding="utf-8"))
    return cache / paths[CHECKPOINT], cache / paths[TOKENIZER]


def _resolve(uri: str, client) -> tuple[str, int]:
    """(registered model name, version number) of models:/name@alias or models:/name/N."""
    from mlflow.exceptions import MlflowException

    body = uri[len("models:/"):]
    name, alias = body.split("@", 1) if "@" in body else (body, None)
    number = None
    if alias is None:
        name, _, number = body.rpartition("/")
    if not name or not (alias or (number or "").isdigit()):
        raise UserError(f"{uri}: a registry model is models:/<name>@<alias> or models:/<name>/<version>")
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as exc:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise UserError(f"{uri}: not in the registry at {mlflow.get_tracking_uri()} ({exc.message.splitlines()[0]}); "
                        f"registered models: {known}; `llmpipe models` lists versions and aliases") from None
    return name, int(found.version)


def _download(model_uri: str, cache: Path) -> None:
    """Only the checkpoint and tokenizer artifacts, into a temporary folder renamed into place."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        mlmodel = Path(mlflow.artifacts.download_artifacts(f"{model_uri}/MLmodel", dst_path=str(tmp)))
        artifacts = _mlmodel_artifacts(mlmodel, model_uri)
        for key in (CHECKPOINT, TOKENIZER):
            # a models:/ subpath lands at its own relative path under dst_path
            mlflow.artifacts.download_artifacts(f"{model_uri}/{artifacts[key]}", dst_path=str(tmp))
        (tmp / _COMPLETE).write_text(json.dumps({key: artifacts[key] for key in (CHECKPOINT, TOKENIZER)}))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mlmodel_artifacts(mlmodel: Path, model_uri: str) -> dict[str, str]:
    """The relative artifact paths the pyfunc flavor recorded, e.g. {"checkpoint": "artifacts/final"}."""
    import yaml

    flavor = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}).get("flavors", {}).get("python_function", {})
    artifacts = {key: spec.get("path") for key, spec in (flavor.get("artifacts") or {}).items()}
    missing = [key for key in (CHECKPOINT, TOKENIZER) if not artifacts.get(key)]
    if missing:
        raise UserError(f"{model_uri} has no {' or '.join(missing)} artifact: it was not logged by llmpipe's "
                        f"log_packaged_model, so llmpipe cannot load it")
    return artifacts
