"""Typed sections of params.yaml: loading and validation.

Each stage owns one pydantic model derived from `StageConfig` (it lives next to the stage's code)
and reads only its own section. Errors name the file, the key path and what is allowed, because
"validation error" alone sends users on a hunt through a long YAML file.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from llmpipe.errors import UserError
from llmpipe.io import fingerprint


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(UserError):
    """A user error in params.yaml; the message is meant to be shown as is."""


C = TypeVar("C", bound=BaseModel)


def read_params(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (params.yaml holds every stage's settings)") from None
    try:
        params = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of stage names to sections")
    return params


def load_section(cls: type[C], params: dict[str, Any], section: str, source: Path | str) -> C:
    """Validate `params[section]` as `cls`; a missing section means all defaults."""
    raw = params.get(section)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {section}: expected a mapping, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe_error(cls, section, err) for err in exc.errors()]
        raise ConfigError(f"{source}: invalid settings in section '{section}':\n  " + "\n  ".join(lines)) from None


def load_stage_config(cls: type[C], section: str, params_path: Path) -> C:
    return load_section(cls, read_params(params_path), section, params_path)


def params_hash(section: BaseModel | dict) -> str:
    return fingerprint(section.model_dump(mode="json") if isinstance(section, BaseModel) else section)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, lists indexed: for logging params to a tracker."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list):
        out = {}
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): data}


def _describe_error(cls: type[BaseModel], section: str, err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    key_path = ".".join([section, *loc])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(cls, err["loc"][:-1])
        if allowed:
            msg = f"unknown key; allowed keys here: {', '.join(sorted(allowed))}"
        else:
            msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return f"{key_path}: {msg}"


def _allowed_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the model found at `loc` inside `cls` (best effort through lists/unions)."""
    model: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        model = _field_model(model, part)
        if model is None:
            return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _field_model(model: Any, name: str) -> Any:
    if isinstance(model, type) and issubclass(model, BaseModel):
        field = model.model_fields.get(name)
        return _unwrap(field.annotation) if field else None
    return None


def _unwrap(annotation: Any) -> Any:
    """list[X] / X | None / Annotated[X, ...] -> X when it is a single model."""
    origin = typing.get_origin(annotation)
    if origin is None:
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    models = [_unwrap(a) for a in args]
    models = [m for m in models if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if len(models) == 1 else None
