"""Throwaway projects that hold their own copy of llmpipe's code, for the tests of code-aware resume.

`llmpipe.stages.code_fingerprint` hashes a stage's code deps where DVC sees them, at the project
root; with a copy of `llmpipe/` there, editing that copy is what editing the code is to DVC (and to
the resume fingerprints), while the tests still run the installed code.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def code_project(root: Path, params: dict[str, Any] | None = None) -> Path:
    """`root` with the repository's dvc.yaml, its params.yaml (sections replaced by `params`) and llmpipe/."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    merged = yaml.safe_load((REPO / "params.yaml").read_text())
    merged.update(params or {})
    (root / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    shutil.copytree(REPO / "llmpipe", root / "llmpipe", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def stage_context(root: Path, stage: str):
    """A StageContext for calling a stage body directly in a hand-made project: the repository's
    dvc.yaml goes in first (where missing), as the stage finds its code deps there."""
    from llmpipe.stages import StageContext

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "dvc.yaml").exists():
        shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    return StageContext(root=root, name=stage)


def edit_code(root: Path, rel: str) -> None:
    """A change that alters no behaviour: the fingerprint must still see it (as DVC does)."""
    path = root / rel
    path.write_text(path.read_text() + "\n# edited by a test\n")


# Modules that run, configure, log and report a stage but do not shape its output; dvc.yaml leaves
# them out on purpose (see its header), so an edit there does not redo the data.
RUNNERS = {"llmpipe", "llmpipe.stages", "llmpipe.tracking", "llmpipe.env", "llmpipe.errors", "llmpipe.cli"}


def imported_modules(module: str) -> set[str]:
    """The llmpipe modules `module` imports at run time, transitively: module-level and function-level
    imports alike (a lazy import runs too), `if TYPE_CHECKING:` blocks excluded, runners not followed."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or _source(name) is None:
            continue
        seen.add(name)
        if name not in RUNNERS:
            todo += _imports(name)
    return seen - RUNNERS


def module_file(module: str) -> str:
    """'llmpipe.data.readers' -> 'llmpipe/data/readers.py' (a package: its __init__.py)."""
    return _source(module).relative_to(REPO).as_posix()


def _source(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(module: str) -> list[str]:
    tree = ast.parse(_source(module).read_text())
    type_checking = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and ast.unparse(block.test).endswith("TYPE_CHECKING") for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from llmpipe.data import minhash` imports the package and the submodule.
            found += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return [name for name in found if name.split(".")[0] == "llmpipe"]
