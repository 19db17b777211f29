"""The evaluate stage's own parts: lm-eval results into flat metrics and a report, and its errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmpipe.errors import UserError
from llmpipe.evaluate.evaluate import EvaluateConfig, flat_metrics, run, write_report
from llmpipe.stages import StageContext

RESULTS = {"results": {"llmpipe_cloze": {"alias": "llmpipe_cloze", "acc,none": 0.25, "acc_stderr,none": 0.05,
                                         "perplexity,none": 812.5, "perplexity_stderr,none": "N/A"},
                       "llmpipe_bpb": {"bits_per_byte,none": 2.5, "word_perplexity,none": math.nan}}}


def test_lm_eval_results_become_one_metric_per_model_task_and_metric():
    assert flat_metrics("sft", RESULTS) == {"eval/sft/llmpipe_cloze/acc": 0.25, "eval/sft/llmpipe_cloze/acc_stderr": 0.05,
                                            "eval/sft/llmpipe_cloze/perplexity": 812.5,
                                            "eval/sft/llmpipe_bpb/bits_per_byte": 2.5}  # no text, no nan


def test_the_report_compares_the_models_with_stderr_and_names_the_contamination(tmp_path: Path):
    other = {"results": {"llmpipe_cloze": {"acc,none": 0.5, "acc_stderr,none": 0.07},
                         "llmpipe_bpb": {"bits_per_byte,none": 2.0}}}
    contamination = {"llmpipe_cloze": {"docs": 10, "contaminated": 3, "fraction": 0.3, "excluded": 3, "n": 13}}
    write_report(tmp_path, ["pretrain", "sft"], ["llmpipe_cloze", "llmpipe_bpb"],
                 {"pretrain": RESULTS, "sft": other}, contamination)
    report = (tmp_path / "report.md").read_text()
    assert "| metric | pretrain | sft |" in report
    assert "| acc | 0.25 ± 0.05 | 0.5 ± 0.07 |" in report and "| bits_per_byte | 2.5 | 2 |" in report
    assert "3 of 10 examples share a 13-gram with the training data; 3 excluded." in report
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_a_model_the_stage_does_not_read_is_a_clear_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"evaluate.models: draft is not a model this stage reads; choose among "
                                        r"pretrain, sft, dpo"):
        run(EvaluateConfig(models=["pretrain", "draft"]), StageContext(root=tmp_path, name="evaluate"))


def test_lm_eval_bootstraps_its_stderrs_in_process_and_the_environment_is_restored(monkeypatch, tmp_path):
    """lm-eval's fork Pool for bootstrapped stderrs deadlocked in CI (a worker waiting for ever on its
    queue's lock at Pool.terminate): score() runs lm-eval with DISABLE_MULTIPROC, offline for local tasks."""
    import os

    import lm_eval
    import lm_eval.tasks

    from llmpipe.evaluate import adapter, evaluate

    class NoModel:
        stats: dict = {}

        def __init__(self, **_kwargs):
            pass

    seen = {}

    def simple_evaluate(**_kwargs):
        seen.update({k: os.environ.get(k) for k in ("DISABLE_MULTIPROC", "HF_DATASETS_OFFLINE")})
        return {"results": {}}

    monkeypatch.setattr(adapter, "LlmpipeLM", NoModel)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **_kwargs: None)
    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    evaluate.score(tmp_path, ["llmpipe_bpb"], tmp_path, device="cpu")
    assert seen == {"DISABLE_MULTIPROC": "1", "HF_DATASETS_OFFLINE": "1"}
    assert "DISABLE_MULTIPROC" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
