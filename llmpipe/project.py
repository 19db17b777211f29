"""A project's DVC pipeline written from the stage registry, and `llmpipe init` for a user's own data.

`dvc.yaml` is generated, never hand-kept: each stage's deps are its declared inputs (ingest's are the
source paths in params.yaml) plus its code, its outs the declared outputs, its params its own
section, its metrics `metrics/<stage>.json`. This repository's dvc.yaml is exactly what
`render_dvc_yaml` writes for its params.yaml (a test keeps the two equal).

Code deps are where DVC can hash them: relative `llmpipe/...` paths in a project that carries
llmpipe's code (this repository), else absolute paths into the installed package, so that in a user's
project a new llmpipe version still reruns exactly the stages whose code changed.
"""

from __future__ import annotations

import glob
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from llmpipe.errors import UserError
from llmpipe.stages import STAGES, PipelineConfig, StageSpec, installed_package

HEADER = """\
# Generated from llmpipe's stage registry (llmpipe/stages.py) and params.yaml by llmpipe.project;
# a test keeps this repository's copy equal to what the registry writes. Every cmd is
# `llmpipe stage <name>`; `dvc repro` runs what is stale, `llmpipe run` runs the same stages as
# tasks of a Prefect flow. Data and model outputs are `persist: true` so a killed stage resumes
# (each stage checks its own completion markers and fingerprints).
# Code deps are every llmpipe module the stage imports at run time, and they are also the stage's
# resume fingerprint (llmpipe.stages.code_fingerprint): edit one and DVC reruns the stage and no
# finished shard of the old code is reused. io.py (writes the bytes, hashes the inputs) and
# config.py (turns params.yaml into settings) shape every output; stages.py, tracking.py, env.py,
# errors.py and cli.py only run, configure, log and report a stage, so they are not listed.
"""


# -- dvc.yaml ---------------------------------------------------------------------------------------

def render_dvc_yaml(root: Path, params: dict[str, Any]) -> str:
    """The dvc.yaml of the project at `root` with these params (the parsed params.yaml)."""
    stages = {}
    for spec in STAGES.values():
        if spec.optional and not (params.get(spec.name) or {}).get("enabled"):
            continue
        inputs = [*spec.inputs.values(), *(source_deps(params, spec.name) if spec.reads_sources else [])]
        stages[spec.name] = _stage_entry(spec, inputs, _code_paths(root, spec))
    # a stage that only fetches (the demo corpus, the chat data) runs when a stage reads what it fetches
    read = {dep for entry in stages.values() for dep in entry["deps"]}
    stages = {name: entry for name, entry in stages.items()
              if STAGES[name].inputs or STAGES[name].reads_sources or set(STAGES[name].outputs.values()) & read}
    return HEADER + yaml.safe_dump({"stages": stages}, sort_keys=False, default_flow_style=False, width=110)


def _stage_entry(spec: StageSpec, inputs: list[str], code: list[str]) -> dict[str, Any]:
    outs = [{path: {"persist": True}} if spec.persist else path for path in spec.outputs.values()]
    entry: dict[str, Any] = {"cmd": f"llmpipe stage {spec.name}", "deps": [*inputs, *code], "params": [spec.name],
                             "outs": outs, "metrics": [{spec.metrics_file: {"cache": False}}]}
    if spec.plots:
        entry["plots"] = [{path: {"cache": False, **props}} for path, props in spec.plots.items()]
    return entry


def _code_paths(root: Path, spec: StageSpec) -> list[str]:
    if carries_code(root):
        return list(spec.code)
    base = installed_package().parent
    return [str(base / dep) for dep in spec.code]


def carries_code(root: Path) -> bool:
    """Whether the project holds llmpipe's own code (this repository, or a copy of it)."""
    return (root / "llmpipe" / "stages.py").is_file()


SOURCE_LISTS = ("sources", "preferences")  # the keys of a section that list sources with paths


def source_deps(params: dict[str, Any], section: str = "ingest") -> list[str]:
    """What DVC should watch for a stage's sources (`<section>.sources` / `.preferences`, defaults
    included): each path, or a glob's fixed leading directory; a Hugging Face source's data_files."""
    deps: list[str] = []
    for source in _source_entries(params, section):
        paths = source.get("data_files") or [] if source.get("type") == "hf" else [source.get("path")]
        for path in filter(None, paths):
            dep = _glob_base(str(path))
            if dep not in deps:
                deps.append(dep)
    return deps


def _source_entries(params: dict[str, Any], section: str) -> list[dict[str, Any]]:
    values = params.get(section) or {}
    fields = STAGES[section].load()[0].model_fields if section in STAGES else {}
    entries = []
    for key in SOURCE_LISTS:
        if key in values:
            entries += values[key] or []
        elif key in fields:  # not in params.yaml: the stage's default sources
            default = fields[key].get_default(call_default_factory=True) or []
            entries += [e.model_dump(mode="json") if isinstance(e, BaseModel) else e for e in default]
    return entries


def _glob_base(pattern: str) -> str:
    if not glob.has_magic(pattern):
        return pattern.rstrip("/")
    fixed = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    if not fixed:
        raise UserError(f"ingest source {pattern!r}: a glob needs a fixed leading directory for DVC to watch "
                        f"(e.g. corpus/**/*.txt, not **/*.txt)")
    return str(Path(*fixed))


# -- params.yaml ------------------------------------------------------------------------------------

def render_params(sources: list[dict[str, Any]] | None) -> str:
    """A params.yaml with every stage's defaults, each key commented; `sources` replace the demo."""
    sections = [("pipeline", PipelineConfig, "how `llmpipe run` (the Prefect flow) executes the DVC stages")]
    for spec in STAGES.values():
        if spec.name == "demo" and sources:
            continue
        sections.append((spec.name, spec.load()[0], spec.summary))
    from llmpipe.package.gate import GateSettings

    sections.append(("promote", GateSettings, "the gate of `llmpipe promote`: a registered version becomes production"))
    text = ["# llmpipe settings, one section per stage (the same names in dvc.yaml, the CLI, MLflow and",
            "# metrics/). Written by `llmpipe init` with every default; unknown keys are errors.", ""]
    for name, cls, summary in sections:
        values = cls().model_dump(mode="json")
        if name == "ingest" and sources:
            values["sources"] = sources
        text += [f"{name}:  # {summary}", *_render_fields(cls, values, indent=2), ""]
    return "\n".join(text)


def _render_fields(cls: type[BaseModel], values: dict[str, Any], indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    for key, value in values.items():
        field = cls.model_fields[key]
        note = f"  # {field.description}" if field.description else ""
        nested = _single_model(field.annotation)
        if isinstance(value, dict) and nested is not None:
            lines += [f"{pad}{key}:{note}", *_render_fields(nested, value, indent + 2)]
        elif isinstance(value, (dict, list)) and value:
            block = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, width=100)
            lines += [pad + line for line in block.rstrip("\n").splitlines()]
            lines[-len(block.rstrip("\n").splitlines())] += note
        elif value is None:  # unset optional: shown for reference, commented out so it stays unset
            lines.append(f"{pad}# {key}: null{note}")
        else:
            lines.append(f"{pad}{key}: {json.dumps(value)}{note}")
    return lines


def _single_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


# -- llmpipe init -----------------------------------------------------------------------------------

def sources_from_paths(paths: list[str], dest: Path) -> list[dict[str, Any]]:
    """`--source` arguments -> ingest sources of type files, named after the path, relative to `dest`
    where they lie inside it and absolute otherwise (DVC watches paths outside a project too)."""
    sources, names = [], set()
    for raw in paths:
        path = Path(raw).expanduser()
        absolute = path if path.is_absolute() else Path.cwd() / path
        base = Path(_glob_base(str(absolute)))
        if not base.exists():
            raise UserError(f"--source {raw}: {base} does not exist; give a file, a directory or a glob under "
                            f"an existing directory")
        try:
            where = str(absolute.relative_to(dest.resolve()))
        except ValueError:
            where = str(absolute)
        name = _unique(re.sub(r"[^A-Za-z0-9_.-]+", "-", base.stem or "source").strip("-.") or "source", names)
        sources.append({"name": name, "type": "files", "path": where})
    return sources


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


README = """# {name}

An llmpipe project: your text in, a trained model out, every step a DVC stage.

```bash
dvc repro                # every stage that is stale (all of them, the first time)
llmpipe run              # the same stages as a Prefect flow, tracked in MLflow (mlruns/)
llmpipe status           # what is stale, and the last run of each stage
```

Sources: `ingest.sources` in params.yaml ({sources}). After adding one there, run
`llmpipe init --update .` so dvc.yaml watches it too. Settings: params.yaml, one section per stage.
"""


def init_project(dest: Path, source_paths: list[str]) -> Path:
    """Create an llmpipe project at `dest`: git and DVC initialized, params.yaml and dvc.yaml written
    from the registry (with these sources, or the demo corpus), a README, all staged in git."""
    dest = dest.resolve()
    if (dest / "dvc.yaml").exists() or (dest / "params.yaml").exists():
        raise UserError(f"{dest} already holds an llmpipe project (dvc.yaml or params.yaml); use "
                        f"`llmpipe init --update {dest}` to rewrite its dvc.yaml, or pick an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    sources = sources_from_paths(source_paths, dest) if source_paths else None
    (dest / "params.yaml").write_text(render_params(sources), encoding="utf-8")
    update_dvc_yaml(dest)
    named = ", ".join(s["path"] for s in sources) if sources else "the demo corpus, fetched by the demo stage"
    (dest / "README.md").write_text(README.format(name=dest.name, sources=named), encoding="utf-8")
    # the MLflow store, killed writes, and the registry download cache of models:/ sources
    (dest / ".gitignore").write_text("/mlruns/\n.tmp-*\n__pycache__/\n/.llmpipe/\n", encoding="utf-8")
    _run(dest, ["git", "init", "-q"])
    _run(dest, [_dvc(), "init", "-q"])
    _run(dest, [_dvc(), "config", "core.analytics", "false"])
    _run(dest, ["git", "add", "-A"])  # staged, not committed: the first commit is the user's, under their name
    return dest


def update_dvc_yaml(root: Path) -> Path:
    """Rewrite `root/dvc.yaml` from the registry and the project's params.yaml."""
    from llmpipe.config import read_params
    from llmpipe.io import write_text_atomic

    path = root / "dvc.yaml"
    write_text_atomic(path, render_dvc_yaml(root, read_params(root / "params.yaml")))
    return path


def _dvc() -> str:
    from llmpipe.pipeline import dvc_executable

    return dvc_executable()


def _run(cwd: Path, cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed in {cwd}: {(proc.stderr or proc.stdout).strip()}")
