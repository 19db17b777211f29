"""The packaged model in MLflow: logged and registered in a project's SQLite store, it generates
exactly what the engine generates (prompt and chat rows, params reaching the model), through
mlflow.pyfunc.load_model, through llmpipe's own load_model("models:/name@alias"), and through a real
`mlflow models serve` process on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.serve.engine import Engine
from llmpipe.serve.load import load_model
from llmpipe.serve.pyfunc import DEFAULT_PARAMS, log_packaged_model
from llmpipe.serve.sampling import SamplingParams
from llmpipe.tracking import configure_mlflow

NAME = "llmpipe-chat"
PROMPT = "The king said"
MESSAGES = [{"role": "user", "content": "Who is there?"}]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def registered(served_project: Path):
    """served_project's pretrain model logged with a card, registered as version 1 of NAME, @production."""
    root = served_project
    card = root / "README.md"
    card.write_text("# model card\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        configure_mlflow(root)
        with mlflow.start_run():
            info = log_packaged_model(root / "models" / "pretrain" / "final", root / "models" / "tokenizer",
                                      {"card": card})
        version = mlflow.register_model(info.model_uri, NAME).version
        mlflow.MlflowClient().set_registered_model_alias(NAME, "production", version)
    return root, info, int(version)


@pytest.fixture
def in_registered(registered, monkeypatch):
    root = registered[0]
    monkeypatch.chdir(root)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    return registered


@pytest.fixture(scope="module")
def engine(served_project: Path) -> Engine:
    model, tok, _ = load_model(served_project / "models" / "pretrain" / "final")
    return Engine(model, tok)


def engine_text(engine: Engine, prompt=None, messages=None, **params) -> str:
    settings = {**DEFAULT_PARAMS, **params}
    sampling = SamplingParams(temperature=settings["temperature"], top_k=settings["top_k"], seed=settings["seed"],
                              max_new_tokens=settings["max_new_tokens"])
    if messages is None:
        [done] = engine.generate([prompt], sampling)
    else:
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        [done] = engine.generate([ids], sampling, end_ids=[engine.tokenizer.end_of_turn_id])
    return done.text


def test_the_registered_model_generates_what_the_engine_generates(in_registered, engine):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
    frame = pd.DataFrame({"prompt": [PROMPT, None], "messages": [None, MESSAGES]})
    out = model.predict(frame, params={"max_new_tokens": 12})
    expected = [engine_text(engine, PROMPT, max_new_tokens=12), engine_text(engine, messages=MESSAGES, max_new_tokens=12)]
    assert list(out["text"]) == expected and all(expected)
    assert expected[0] != expected[1]  # the chat row was rendered with the template, not read as a prompt


def test_params_reach_the_model(in_registered, engine):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{in_registered[2]}")
    frame = pd.DataFrame({"prompt": [PROMPT]})
    short = model.predict(frame, params={"max_new_tokens": 3})["text"][0]
    sampled = [model.predict(frame, params={"temperature": 1.0, "seed": s, "max_new_tokens": 12})["text"][0] for s in (1, 2)]
    assert short == engine_text(engine, PROMPT, max_new_tokens=3)
    assert len(engine.tokenizer.encode(short)) <= 3 < len(engine.tokenizer.encode(model.predict(frame)["text"][0]))
    assert sampled == [engine_text(engine, PROMPT, temperature=1.0, seed=s, max_new_tokens=12) for s in (1, 2)]
    assert sampled[0] != sampled[1]


def test_the_signature_names_the_inputs_output_and_generation_params(in_registered):
    meta = mlflow.models.get_model_info(f"models:/{NAME}@production")
    sig = meta.signature
    assert sig.inputs.input_names() == ["prompt", "messages"] and sig.outputs.input_names() == ["text"]
    assert {p.name: p.default for p in sig.params.params} == DEFAULT_PARAMS
    assert {p.name: p.dtype.name for p in sig.params.params} == {"max_new_tokens": "long", "temperature": "double",
                                                                 "top_k": "long", "seed": "long"}


def test_the_card_and_extra_artifacts_are_part_of_the_logged_model(in_registered):
    files = mlflow.artifacts.download_artifacts(f"models:/{NAME}@production")
    assert (Path(files) / "artifacts" / "README.md").read_text() == "# model card\n"
    assert (Path(files) / "artifacts" / "final" / "checkpoint.json").exists()


def test_llmpipe_load_model_takes_a_registry_uri(in_registered):
    root, _, version = in_registered
    trained, _, _ = load_model(root / "models" / "pretrain" / "final")
    model, tok, info = load_model(f"models:/{NAME}@production")
    assert info.source == f"models:/{NAME}@production"
    assert Path(info.path).is_relative_to(root / ".llmpipe" / "registry" / NAME / str(version))
    assert info.tokenizer_hash == tok.hash and info.step == 60
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    _, _, by_number = load_model(f"models:/{NAME}/{version}")
    assert by_number.path == info.path  # the same cached download
    newer = mlflow.register_model(f"models:/{NAME}/{version}", NAME).version  # the alias, not the newest, decides
    assert load_model(f"models:/{NAME}@production")[2].path == info.path
    assert Path(load_model(f"models:/{NAME}/{newer}")[2].path).is_relative_to(root / ".llmpipe" / "registry" / NAME / str(newer))


def test_an_unknown_alias_names_the_registry_and_what_is_in_it(in_registered):
    with pytest.raises(UserError, match=f"models:/{NAME}@nosuch: not in the registry .*registered models: {NAME}"):
        load_model(f"models:/{NAME}@nosuch")


def test_a_missing_artifact_is_refused_before_logging(tmp_path):
    with pytest.raises(UserError, match="missing checkpoint=.*nothing"):
        log_packaged_model(tmp_path / "nothing", tmp_path, {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_until_up(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow models serve exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_generated_text(registered, engine, tmp_path):
    root = registered[0]
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@production",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, 50)
        url = f"http://127.0.0.1:{port}/invocations"
        split = post(url, {"dataframe_split": {"columns": ["prompt"], "data": [[PROMPT]]}, "params": {"max_new_tokens": 12}})
        records = post(url, {"dataframe_records": [{"messages": MESSAGES}], "params": {"max_new_tokens": 12}})
        assert split["predictions"] == [{"text": engine_text(engine, PROMPT, max_new_tokens=12)}]
        assert records["predictions"] == [{"text": engine_text(engine, messages=MESSAGES, max_new_tokens=12)}]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def llmpipe(project: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store
    return subprocess.run([sys.executable, "-m", "llmpipe.cli", *args], cwd=project, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_and_chat_take_a_registry_model(registered, engine):
    root = registered[0]
    greedy = ("--temperature", "0", "--max-new-tokens", "12")
    generated = llmpipe(root, "generate", "--model", f"models:/{NAME}@production", "--prompt", PROMPT, *greedy)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == engine_text(engine, PROMPT, max_new_tokens=12) + "\n"
    chatted = llmpipe(root, "chat", "--model", f"models:/{NAME}/{registered[2]}", *greedy,
                      stdin=f"{MESSAGES[0]['content']}\n/exit\n")
    assert chatted.returncode == 0, chatted.stderr
    assert f"bot> {engine_text(engine, messages=MESSAGES, max_new_tokens=12)}\n" in chatted.stdout
