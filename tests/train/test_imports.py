"""llmpipe.train (all but stage.py) must import on a bare GPU node: torch, numpy and the stdlib only."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ["pydantic", "mlflow", "prefect", "dvc", "yaml", "tqdm", "safetensors", "sentencepiece", "pyarrow", "click"]
PROBE = f"""
import importlib.abc, importlib.machinery, sys
class Missing(importlib.abc.Loader):  # finding works (torch probes optional packages), importing fails
    def create_module(self, spec):
        raise ImportError(f"{{spec.name}} is not on a bare GPU node")
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return importlib.machinery.ModuleSpec(name, Missing())
sys.meta_path.insert(0, Block())
import llmpipe.train.checkpoint, llmpipe.train.data, llmpipe.train.distributed, llmpipe.train.loop
import llmpipe.train.pretrain, llmpipe.train.schedule
print("ok")
"""


def test_training_modules_import_without_pydantic_mlflow_tqdm_or_safetensors():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
