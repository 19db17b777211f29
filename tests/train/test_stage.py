"""`run_stage("pretrain", root)` end to end on synthetic token shards in a throwaway project."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from llmpipe.config import ConfigError
from llmpipe.errors import UserError
from llmpipe.stages import StageContext, load_config, run_stage
from llmpipe.train import checkpoint as ckpt
from tests.train.synthetic import markov_tokens, write_split, write_tokens

ROOT = Path(__file__).resolve().parents[2]
VOCAB, BYTES_PER_TOKEN = 256, 3.5  # what write_tokens writes by default
SMALL = {"n_layer": 2, "d_model": 128, "seq_len": 64, "micro_batch": 4, "global_batch_tokens": 512, "max_steps": 6,
         "warmup_steps": 2, "eval_every": 3, "eval_batches": 2, "checkpoint_every": 3, "sample_tokens": 0,
         "device": "cpu"}


def project(tmp_path: Path, **overrides) -> Path:
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pretrain": {**SMALL, **overrides}}))
    write_tokens(tmp_path)
    (tmp_path / "models" / "tokenizer").mkdir(parents=True)
    (tmp_path / "models" / "tokenizer" / "tokenizer.json").write_text(json.dumps({"hash": "synthetic-tok"}))
    return tmp_path


def mlflow_run(root: Path):
    from llmpipe.tracking import configure_mlflow

    mlflow = configure_mlflow(root)
    runs = mlflow.search_runs(filter_string="tags.stage = 'pretrain'", order_by=["start_time DESC"], output_format="list")
    return mlflow, runs[0]


@pytest.mark.slow
def test_pretrain_stage_trains_checkpoints_plots_and_tracks(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPIPE_TRACKING", "on")
    root = project(tmp_path)
    metrics = run_stage("pretrain", root)
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 512
    # untrained, the model is near uniform over the 256 ids (val loss 5.60 measured with lr 1e-12); six
    # steps reach 5.17 on this stream
    assert metrics["val_loss"] < math.log(VOCAB) - 0.3 and metrics["params"] > 0
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / math.log(2) / BYTES_PER_TOKEN)
    assert json.loads((root / "metrics/pretrain.json").read_text()) == metrics
    model, cfg, meta = ckpt.load_checkpoint(root / "models/pretrain")  # final/
    assert meta["path"].endswith("final") and cfg.n_layer == 2 and meta["tokenizer"]["hash"] == "synthetic-tok"
    assert [p.name for p in ckpt.list_checkpoints(root / "models/pretrain/checkpoints")] == ["step-000003", "step-000006"]
    rows = list(csv.DictReader((root / "plots/pretrain_loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert rows[2]["val_loss"] and not rows[1]["val_loss"] and float(rows[0]["lr"]) > 0
    mlflow, run = mlflow_run(root)
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6
    assert run.data.params["preset"] == "tiny" and run.data.params["resolved.model.n_layer"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"final", "samples.txt", "resolved_config.json"} <= artifacts
    assert "final/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "final")}


@pytest.mark.slow
def test_a_rerun_with_more_steps_resumes_under_torchrun_and_forwards_rank0_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPIPE_TRACKING", "on")
    root = project(tmp_path, max_steps=4, checkpoint_every=2, eval_every=2)
    assert run_stage("pretrain", root)["steps"] == 4  # in-process
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain"].update(max_steps=6, distributed="ddp", nproc_per_node=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = run_stage("pretrain", root)  # torchrun, 2 gloo ranks, continuing from step 4
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 512
    mlflow, run = mlflow_run(root)  # the newest run
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [5, 6]
    lines = (root / "models/pretrain/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "train/loss" in x] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_rerun_under_torchrun_on_other_token_shards_is_refused_as_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    root = project(tmp_path, max_steps=2, checkpoint_every=2, eval_every=2)
    run_stage("pretrain", root)
    train_dir = root / "data" / "tokens" / "train"
    shutil.rmtree(train_dir)
    write_split(train_dir, markov_tokens(60_000, VOCAB, seed=9), VOCAB)  # other tokens, same tokenizer
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain"].update(distributed="ddp", nproc_per_node=2)  # settings a rerun may change
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError) as err:  # rank 0's refusal, not "torchrun exited with status 1"
        run_stage("pretrain", root)
    assert "training data sha256 (data/tokens/train)" in str(err.value)
    assert f"delete {root / 'models' / 'pretrain'}" in str(err.value)


@pytest.mark.slow
def test_a_rerun_with_other_training_settings_refuses_the_old_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    root = project(tmp_path, max_steps=2, checkpoint_every=2, eval_every=2)
    run_stage("pretrain", root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain"].update(lr=params["pretrain"].get("lr", 2e-3) / 2, seed=7)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError) as err:
        run_stage("pretrain", root)
    assert "pretrain.lr" in str(err.value) and "pretrain.seed" in str(err.value) and "delete" in str(err.value)
    shutil.rmtree(root / "models" / "pretrain")  # what the message says: then it trains from scratch
    assert run_stage("pretrain", root)["steps"] == 2


@pytest.mark.slow
def test_a_rerun_with_other_pretrain_code_refuses_the_old_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPIPE_TRACKING", "off")
    root = project(tmp_path, max_steps=2, checkpoint_every=2, eval_every=2)
    for dep in ("llmpipe/model", "llmpipe/train"):  # the project's own copy of the code deps dvc.yaml hashes
        shutil.copytree(ROOT / dep, root / dep, ignore=shutil.ignore_patterns("__pycache__"))
    run_stage("pretrain", root)
    loop = root / "llmpipe" / "train" / "loop.py"
    original = loop.read_text()
    loop.write_text(original + "\n# an edit to the training code\n")
    with pytest.raises(UserError) as err:
        run_stage("pretrain", root)
    msg = str(err.value)
    assert "code (llmpipe/model, llmpipe/train, the pretrain code deps in dvc.yaml)" in msg
    assert f"delete {root / 'models' / 'pretrain'} to train from scratch" in msg
    loop.write_text(original)
    (root / "llmpipe" / "tokenizer").mkdir()
    (root / "llmpipe" / "tokenizer" / "stage.py").write_text("# another stage's code: not a pretrain dep\n")
    assert run_stage("pretrain", root)["steps"] == 2  # the same code again: it continues


def test_config_errors_name_the_key(tmp_path):
    root = project(tmp_path, nproc_per_node=2)
    with pytest.raises(ConfigError, match="nproc_per_node > 1 needs distributed"):
        load_config("pretrain", root)
    (root / "params.yaml").write_text(yaml.safe_dump({"pretrain": {**SMALL, "max_steps": 5, "train_tokens": 100}}))
    with pytest.raises(ConfigError, match="max_steps or train_tokens, not both"):
        load_config("pretrain", root)
    (root / "params.yaml").write_text(yaml.safe_dump({"pretrain": {"schedule": "linear"}}))
    with pytest.raises(ConfigError, match="pretrain.schedule"):
        load_config("pretrain", root)


def test_a_batch_that_does_not_divide_fails_before_training(tmp_path):
    root = project(tmp_path, global_batch_tokens=500)
    from llmpipe.train.pretrain import resolve_config

    with pytest.raises(UserError, match="global_batch_tokens \\(500\\) must be a multiple"):
        resolve_config(load_config("pretrain", root), StageContext(root=root, name="pretrain"))


def test_the_stage_takes_its_paths_from_the_registry(tmp_path, monkeypatch):
    import dataclasses

    from llmpipe.stages import STAGES
    from llmpipe.train.pretrain import resolve_config

    root = project(tmp_path)
    (root / "data" / "tokens").rename(root / "data" / "tokens-b")
    (root / "models" / "tokenizer").rename(root / "models" / "tokenizer-b")
    spec = dataclasses.replace(STAGES["pretrain"], inputs={"tokens": "data/tokens-b", "tokenizer": "models/tokenizer-b"},
                               outputs={"model": "models/pretrain-b"})
    monkeypatch.setitem(STAGES, "pretrain", spec)
    resolved = resolve_config(load_config("pretrain", root), StageContext(root=root, name="pretrain"))
    assert {k: resolved[k] for k in ("train_dir", "val_dir", "tokenizer_dir", "out_dir")} == {
        "train_dir": "data/tokens-b/train", "val_dir": "data/tokens-b/val", "tokenizer_dir": "models/tokenizer-b",
        "out_dir": "models/pretrain-b"}


def test_python_m_the_stage_module_writes_the_config_every_nodes_torchrun_reads(tmp_path):
    import subprocess
    import sys

    from llmpipe.train.pretrain import resolve_config

    root = project(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "llmpipe.train.pretrain"], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    config_file = root / "models" / "pretrain" / "resolved_config.json"
    assert proc.stdout.strip() == str(config_file)
    expected = resolve_config(load_config("pretrain", root), StageContext(root=root, name="pretrain"))
    assert json.loads(config_file.read_text()) == expected


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_gpu_configs_validate_and_their_batch_divides(path):
    from llmpipe.config import load_section
    from llmpipe.stages import STAGES

    sections = yaml.safe_load(path.read_text())
    for name in sections:
        cfg = load_section(STAGES[name].load()[0], sections, name, path)
        if hasattr(cfg, "train_settings"):
            cfg.train_settings()  # a batch that does not divide raises here


def test_the_draft_stage_is_in_dvc_yaml_only_when_enabled(tmp_path):
    from llmpipe.config import read_params
    from llmpipe.project import render_dvc_yaml

    params = read_params(ROOT / "params.yaml")
    assert "pretrain_draft" not in yaml.safe_load(render_dvc_yaml(ROOT, params))["stages"]
    params["pretrain_draft"]["enabled"] = True
    stage = yaml.safe_load(render_dvc_yaml(ROOT, params))["stages"]["pretrain_draft"]
    assert stage["outs"] == [{"models/pretrain_draft": {"persist": True}}]
    assert stage["deps"][:2] == ["data/tokens", "models/tokenizer"] and stage["params"] == ["pretrain_draft"]


def test_the_draft_stage_refuses_to_run_while_off(tmp_path):
    root = project(tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "pretrain_draft": {"enabled": False}}))
    with pytest.raises(UserError, match=r"pretrain_draft is off: set pretrain_draft.enabled: true"):
        run_stage("pretrain_draft", root)
    assert not (root / "models/pretrain_draft").exists()


@pytest.mark.slow
def test_the_draft_stage_trains_a_smaller_model_on_the_same_tokens_and_serves_as_a_draft(tmp_path, monkeypatch):
    from llmpipe.serve.engine import newest_model

    root = project(tmp_path, max_steps=3, eval_every=3)
    params = yaml.safe_load((root / "params.yaml").read_text())
    draft = {**params["pretrain"], "enabled": True, "n_layer": 1, "d_model": 64}
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "pretrain_draft": draft}))
    monkeypatch.setenv("LLMPIPE_PROJECT", str(root))
    run_stage("pretrain", root)
    metrics = run_stage("pretrain_draft", root)  # written after pretrain's: still not the default model
    assert json.loads((root / "metrics/pretrain_draft.json").read_text()) == metrics
    assert (root / "plots/pretrain_draft_loss.csv").exists()
    _, target_cfg, _ = ckpt.load_checkpoint(root / "models/pretrain")
    model, cfg, meta = ckpt.load_checkpoint(root / "models/pretrain_draft")
    assert (cfg.n_layer, cfg.d_model) == (1, 64) and (target_cfg.n_layer, target_cfg.d_model) == (2, 128)
    assert cfg.vocab_size == target_cfg.vocab_size and meta["tokenizer"]["hash"] == "synthetic-tok"
    assert newest_model(root) == "pretrain"
