from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from llmpipe.config import ConfigError, StageConfig, flatten, load_section, load_stage_config, params_hash


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    kind: Literal["txt", "jsonl"] = "txt"


class Example(StageConfig):
    min_words: int = Field(50, ge=1, le=10_000)
    mode: Literal["fast", "exact"] = "fast"
    sources: list[Source] = []


def test_defaults_when_section_missing():
    cfg = load_section(Example, {}, "example", "params.yaml")
    assert cfg.min_words == 50 and cfg.mode == "fast"


def test_unknown_key_names_file_path_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_section(Example, {"example": {"min_wrods": 3}}, "example", "params.yaml")
    msg = str(err.value)
    assert "params.yaml" in msg and "example.min_wrods" in msg
    assert "min_words" in msg and "mode" in msg and "sources" in msg


def test_unknown_nested_key_names_list_index_and_allowed_keys():
    params = {"example": {"sources": [{"path": "a"}, {"path": "b", "glob": "*"}]}}
    with pytest.raises(ConfigError) as err:
        load_section(Example, params, "example", "p.yaml")
    assert "example.sources.1.glob" in str(err.value)
    assert "kind, path" in str(err.value)


def test_wrong_type_and_out_of_range_and_bad_choice():
    for bad, needle in [({"min_words": "many"}, "example.min_words"),
                        ({"min_words": 0}, "greater than or equal to 1"),
                        ({"mode": "slow"}, "'fast' or 'exact'")]:
        with pytest.raises(ConfigError) as err:
            load_section(Example, {"example": bad}, "example", "params.yaml")
        assert needle in str(err.value)


def test_missing_required_key_is_reported():
    with pytest.raises(ConfigError, match=r"example.sources.0.path: required key is missing"):
        load_section(Example, {"example": {"sources": [{"kind": "txt"}]}}, "example", "params.yaml")


def test_config_is_frozen():
    cfg = Example()
    with pytest.raises(Exception):
        cfg.min_words = 3  # type: ignore[misc]


def test_load_from_file_and_yaml_errors(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("example:\n  min_words: 7\n")
    assert load_stage_config(Example, "example", path).min_words == 7
    path.write_text("example: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_stage_config(Example, "example", path)
    with pytest.raises(ConfigError, match="file not found"):
        load_stage_config(Example, "example", tmp_path / "nope.yaml")


def test_params_hash_changes_with_values_only():
    assert params_hash(Example()) == params_hash(Example(min_words=50))
    assert params_hash(Example()) != params_hash(Example(min_words=51))


def test_flatten():
    cfg = Example(sources=[Source(path="a")])
    assert flatten(cfg) == {"min_words": 50, "mode": "fast", "sources.0.path": "a", "sources.0.kind": "txt"}
