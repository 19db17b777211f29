"""The dependency rules of docs/architecture.md, checked on the source (imports read with ast).

- llmpipe.model and llmpipe.train import only torch, numpy and the standard library at module level
  (transitively), so they run on a GPU node that has nothing else; the stage module of a training
  stage (the registry's `run` target) and the pydantic settings those share are the exceptions.
- flows/ only wires: Prefect, the standard library and llmpipe's orchestration modules, no ML code.
- Shared parts (config, errors, env, io, tracking) depend on no stage package.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from llmpipe.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
BARE_NODE = {"torch", "numpy"}
SHARED = {"llmpipe.config", "llmpipe.errors", "llmpipe.env", "llmpipe.io", "llmpipe.tracking"}
# llmpipe.ops.deploy: a stage on a work pool (the DVC exchange, the records back), orchestration too
ORCHESTRATION = SHARED | {"llmpipe", "llmpipe.pipeline", "llmpipe.stages", "llmpipe.ops.deploy"}


def module_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports(module: str, module_level_only: bool) -> set[str]:
    """Absolute names `module` imports (`from a.b import c` gives a.b, and a.b.c when that is a module)."""
    tree = ast.parse(module_file(module).read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def package_modules(package: str) -> list[str]:
    folder = ROOT / Path(*package.split("."))
    return sorted(f"{package}.{p.stem}" if p.stem != "__init__" else package for p in folder.glob("*.py"))


def stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names or name == "__future__"


STAGE_MODULES = {spec.run.split(":")[0] for spec in STAGES.values()}
STAGE_CONFIG_MODULES = {"llmpipe.train.settings"}  # pydantic settings the training stages' configs share


def bare_node_violations(module: str, seen: set[str]) -> list[str]:
    """Module-level imports of `module`, followed through llmpipe, that a bare GPU node lacks."""
    if module in seen:
        return []
    seen.add(module)
    bad = []
    for name in sorted(imports(module, module_level_only=True)):
        if stdlib(name) or name.split(".")[0] in BARE_NODE:
            continue
        if name.split(".")[0] == "llmpipe" and module_file(name):
            bad += [f"{module} -> {v}" for v in bare_node_violations(name, seen)]
            continue
        bad.append(f"{module} imports {name}")
    return bad


@pytest.mark.parametrize("module", [m for p in ("llmpipe.model", "llmpipe.train") for m in package_modules(p)
                                    if m not in STAGE_MODULES | STAGE_CONFIG_MODULES])
def test_model_and_train_import_only_torch_numpy_and_the_stdlib(module: str):
    assert bare_node_violations(module, set()) == []


@pytest.mark.parametrize("module", package_modules("flows"))
def test_flows_only_wire_stages(module: str):
    for name in imports(module, module_level_only=False):
        top = name.split(".")[0]
        assert stdlib(name) or top == "prefect" or name in ORCHESTRATION or top == "flows", (
            f"{module} imports {name}: flows wire stages through llmpipe.pipeline/llmpipe.stages, "
            f"the work lives in the stage modules")


@pytest.mark.parametrize("module", sorted(SHARED))
def test_shared_parts_depend_on_no_stage_package(module: str):
    inside = {n for n in imports(module, module_level_only=False) if n.split(".")[0] == "llmpipe"}
    assert inside <= SHARED | {"llmpipe"}, f"{module} imports {sorted(inside - SHARED)}"


def test_the_checks_see_a_violation(tmp_path: Path, monkeypatch):
    # a rule that cannot fail proves nothing: plant an import and watch it caught
    fake = tmp_path / "llmpipe" / "model"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("import torch\nimport pydantic\n\ndef f():\n    import mlflow\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert bare_node_violations("llmpipe.model.bad", set()) == ["llmpipe.model.bad imports pydantic"]
