"""benchmarks/quality_per_compute.py on a tiny synthetic project: both models, both budgets, the ratio last."""

import importlib.util
import json
import math
import sys

import pytest
import yaml

from llmpipe.errors import UserError
from tests.helpers import ROOT
from tests.train.synthetic import markov_tokens, write_split

VOCAB, BYTES_PER_TOKEN = 256, 3.5
PRETRAIN = {"preset": "tiny", "n_layer": 1, "d_model": 64, "seq_len": 32, "micro_batch": 2, "global_batch_tokens": 64,
            "warmup_steps": 2, "lr": 0.005, "device": "cpu"}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("quality_per_compute", ROOT / "benchmarks" / "quality_per_compute.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up while being defined
    spec.loader.exec_module(bench)
    return bench


@pytest.fixture(scope="module")
def bench():
    return load_benchmark()


@pytest.fixture
def project(tmp_path):
    tokens = tmp_path / "data" / "tokens"
    write_split(tokens / "train", markov_tokens(20_000, VOCAB, seed=1), VOCAB, bytes_per_token=BYTES_PER_TOKEN)
    write_split(tokens / "val", markov_tokens(3_000, VOCAB, seed=2), VOCAB, bytes_per_token=BYTES_PER_TOKEN)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pretrain": PRETRAIN}))
    return tmp_path


def parse_rows(lines):
    """{(budget, model): (steps, tokens, train_s, bpb)} from the printed table."""
    start = next(i for i, line in enumerate(lines) if line.startswith("budget"))
    rows = {}
    for line in lines[start + 1:start + 5]:
        budget, rest = line[:18].strip(), line[18:]
        model, fields = rest[:28].strip(), rest[28:].split()
        rows[budget, model] = (int(fields[0]), int(fields[1].replace(",", "")), float(fields[2]), float(fields[4]))
    return rows


def test_both_models_both_budgets_ratio_last(bench, project, capsys):
    seconds, tokens = 3.0, 2560
    result = bench.main(["--project", str(project), "--seconds", str(seconds), "--tokens", str(tokens),
                         "--ref-lr", "0.005", "--json", str(project / "out.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = parse_rows(lines)
    ours, ref = "llmpipe GPT", "reference (nanoGPT GPT-2)"
    assert set(rows) == {(b, m) for b in ("equal tokens", "equal wall clock") for m in (ours, ref)}
    for model in (ours, ref):
        steps, trained, _, _ = rows["equal tokens", model]
        assert (steps, trained) == (40, 2560)  # 2560 tokens at 64 per step
        _, _, train_s, _ = rows["equal wall clock", model]
        # the calibrated step count fills the budget (loosely: 2 shared cores make timings noisy)
        assert seconds / 2 < train_s < seconds * 2, (model, train_s)
    uniform = math.log(VOCAB) / math.log(2) / BYTES_PER_TOKEN
    assert all(row[3] < uniform for row in rows.values()), rows  # every model learned something
    # longer training beats 10 steps: the two budgets' figures are not mixed up
    assert rows["equal wall clock", ours][3] < rows["equal tokens", ours][3]

    assert lines[-1].startswith("ratio reference/llmpipe (bits per byte, equal wall clock): ")
    ratio = float(lines[-1].rsplit(":", 1)[1])
    assert ratio == pytest.approx(rows["equal wall clock", ref][3] / rows["equal wall clock", ours][3], rel=1e-3)
    for budget in ("equal tokens", "equal wall clock"):
        gain = (rows[budget, ref][3] - rows[budget, ours][3]) / rows[budget, ref][3] * 100
        word = "better" if gain >= 0 else "worse"
        assert f"llmpipe {word} than reference by {abs(gain):.1f}% (bits per byte, {budget})" in lines

    saved = json.loads((project / "out.json").read_text())
    assert saved["ratios"] == pytest.approx(result["ratios"])
    assert saved["ratios"]["time"] == pytest.approx(ratio, rel=1e-3)
    assert {(r["budget"], r["model"]) for r in saved["runs"]} == {("tokens", ours), ("tokens", ref), ("time", ours),
                                                                  ("time", ref)}


def test_set_overrides_llmpipe_only_and_token_ratio_last(bench, project, capsys):
    bench.main(["--project", str(project), "--budget", "tokens", "--tokens", "320", "--set", "global_batch_tokens=128",
                "--set", "micro_batch=4"])
    lines = capsys.readouterr().out.strip().splitlines()
    table_start = next(i for i, line in enumerate(lines) if line.startswith("budget"))
    rows = [line.split() for line in lines[table_start + 1:table_start + 3]]
    trained = {row[2]: (int(row[-5]), int(row[-4].replace(",", ""))) for row in rows}  # model's first word -> steps, tokens
    # 320 tokens: 64 per step as written (the reference's), 128 with --set (llmpipe's, rounded up to whole steps)
    assert trained == {"reference": (5, 320), "llmpipe": (3, 384)}
    assert lines[-1].startswith("ratio reference/llmpipe (bits per byte, equal tokens): ")


def test_set_unknown_key_is_named(bench, project):
    tiny = ["--project", str(project), "--budget", "tokens", "--tokens", "64"]  # a broken check costs a step, not minutes
    with pytest.raises(UserError, match="pretrain.no_such_key"):
        bench.main([*tiny, "--set", "no_such_key=1"])
    with pytest.raises(UserError, match="pretrain.lr"):
        bench.main([*tiny, "--set", "lr=-1"])  # a known key, an invalid value: validated too
    with pytest.raises(UserError, match="KEY=VALUE"):
        bench.main([*tiny, "--set", "lr"])
