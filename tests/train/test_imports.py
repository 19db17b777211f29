"""llmpipe.model and llmpipe.train must import on a bare GPU node: torch, numpy and the stdlib only.

Every module of the two packages is probed, so a new one is checked without being listed here; the
exceptions are a training stage's own module (the registry's `run` target: config in pydantic, paths
from the registry) and the pydantic settings they share, which a GPU node never imports: torchrun runs
the stage's worker there.
"""

import pkgutil
import subprocess
import sys
from pathlib import Path

import llmpipe.model
import llmpipe.train
from llmpipe.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
STAGE_MODULES = {spec.run.split(":")[0] for spec in STAGES.values()}  # llmpipe.train.pretrain
CONFIG_MODULES = {"llmpipe.train.settings"}  # the pydantic base of the stages' configs; workers get plain JSON
BLOCKED = ["pydantic", "mlflow", "prefect", "dvc", "yaml", "tqdm", "safetensors", "sentencepiece", "pyarrow", "click"]
PROBE = """
import importlib, importlib.abc, importlib.machinery, sys
class Missing(importlib.abc.Loader):  # finding works (torch probes optional packages), importing fails
    def create_module(self, spec):
        raise ImportError(f"{{spec.name}} is not on a bare GPU node")
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            return importlib.machinery.ModuleSpec(name, Missing())
sys.meta_path.insert(0, Block())
for name in {modules!r}:
    importlib.import_module(name)
print("ok")
"""


def package_modules(*packages) -> list[str]:
    return sorted(m.name for p in packages for m in pkgutil.iter_modules(p.__path__, p.__name__ + "."))


def test_training_and_model_modules_import_without_pydantic_mlflow_tqdm_or_safetensors():
    modules = [m for m in package_modules(llmpipe.model, llmpipe.train) if m not in STAGE_MODULES | CONFIG_MODULES]
    assert {"llmpipe.train.pretrain_worker", "llmpipe.train.launch", "llmpipe.model.gpt"} <= set(modules)
    proc = subprocess.run([sys.executable, "-c", PROBE.format(blocked=BLOCKED, modules=modules)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr

