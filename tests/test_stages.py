"""The stage registry, the stage runner, and the params.yaml / dvc.yaml contract for every stage."""

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from llmpipe import stages
from llmpipe.config import ConfigError, StageConfig
from llmpipe.project import source_deps
from llmpipe.stages import STAGES, StageSpec, code_deps, load_config, run_stage

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"] or {}
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_dvc_stages_are_registered_in_pipeline_order():
    enabled = [name for name, spec in STAGES.items() if not spec.optional or (PARAMS.get(name) or {}).get("enabled")]
    assert list(DVC) == enabled, "dvc.yaml must list every registered stage (optional ones when on), in registry order"


@pytest.mark.parametrize("name", list(DVC))
def test_dvc_stage_declares_exactly_its_own_params_section(name: str):
    stage = DVC[name]
    assert stage["cmd"] == f"llmpipe stage {name}"
    assert stage.get("params") == [name], f"{name} reads params section '{name}' and nothing else"
    assert name in PARAMS, f"params.yaml has no '{name}' section"
    load_config(name, ROOT)  # the shipped section validates


@pytest.mark.parametrize("name", list(DVC))
def test_dvc_stage_writes_its_metrics_file_and_deps_come_from_earlier_stages(name: str):
    stage = DVC[name]
    metrics = [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
    assert metrics == [f"metrics/{name}.json"]
    outs_before: dict[str, str] = {}
    for other in DVC:
        if other == name:
            break
        for out in DVC[other].get("outs", []):
            outs_before[next(iter(out)) if isinstance(out, dict) else out] = other
    later_outs = {next(iter(o)) if isinstance(o, dict) else o for s in list(DVC)[list(DVC).index(name):] for o in DVC[s].get("outs", [])}
    for dep in stage.get("deps", []):
        assert dep not in later_outs, f"{name} depends on {dep}, produced by itself or a later stage"


def _names(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


@pytest.mark.parametrize("name", list(DVC))
def test_registry_and_dvc_yaml_agree_on_inputs_outputs_and_code(name: str):
    spec, stage = STAGES[name], DVC[name]
    inputs = [*spec.inputs.values(), *(source_deps(PARAMS, name) if spec.reads_sources else [])]
    assert _names(stage.get("deps", [])) == [*inputs, *spec.code]
    assert _names(stage.get("outs", [])) == list(spec.outputs.values())
    assert code_deps(ROOT, name) == sorted(spec.code)


def _code_strings(module: str) -> set[str]:
    """String literals of a module's code, docstrings and comments left out."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings}


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_modules_take_their_paths_from_the_registry(name: str):
    declared = {p for spec in STAGES.values() for p in [*spec.inputs.values(), *spec.outputs.values()]}
    module = STAGES[name].run.split(":")[0]
    repeated = sorted(_code_strings(module) & declared)
    assert not repeated, f"{module} repeats declared paths {repeated}: use ctx.input()/ctx.output()"


class FakeConfig(StageConfig):
    factor: float = Field(2.0, gt=0)


def fake_run(cfg: FakeConfig, ctx: stages.StageContext) -> dict[str, float]:
    assert ctx.root.is_dir() and ctx.name == "fake"
    return {"doubled": 21 * cfg.factor, "n": 3}


class FakeSpec(StageSpec):
    def load(self):
        return FakeConfig, fake_run


@pytest.fixture
def fake_project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setitem(STAGES, "fake", FakeSpec("fake", "", "", "a test stage"))
    (tmp_path / "dvc.yaml").write_text("stages:\n  fake:\n    cmd: llmpipe stage fake\n")
    (tmp_path / "params.yaml").write_text("fake:\n  factor: 1.0\n")
    monkeypatch.setenv("LLMPIPE_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LLMPIPE_PARENT_RUN_ID", raising=False)
    return tmp_path


def test_run_stage_writes_metrics_and_tracks_a_tagged_run(fake_project: Path):
    metrics = run_stage("fake", fake_project)
    assert metrics == {"doubled": 21.0, "n": 3.0}
    assert json.loads((fake_project / "metrics" / "fake.json").read_text()) == metrics
    from llmpipe.tracking import configure_mlflow

    run = configure_mlflow(fake_project).search_runs(filter_string="tags.stage = 'fake'", output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["doubled"] == 21.0 and run.data.params["factor"] == "1.0"
    assert {"git_commit", "params_hash", "stage"} <= set(run.data.tags)


def test_run_stage_rejects_bad_params_before_any_work(fake_project: Path):
    (fake_project / "params.yaml").write_text("fake:\n  factor: -1\n  extra: 1\n")
    with pytest.raises(ConfigError) as err:
        run_stage("fake", fake_project)
    assert "fake.factor" in str(err.value) and "fake.extra" in str(err.value)
    assert not (fake_project / "metrics").exists()


def test_unknown_stage_lists_the_stages():
    with pytest.raises(ValueError, match="ingest"):
        stages.get_stage("nope")
