"""load_model: a trained checkpoint comes back with its tokenizer, from a path or a stage name; a
tokenizer it was not trained with, and sources not supported yet, are refused by name (a registry
source: tests/serve/test_pyfunc.py)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.model import ModelConfig
from llmpipe.serve.load import load_model
from llmpipe.tokenizer.sentencepiece_bpe import MODEL_FILE, TOKENIZER_META_FILE, Tokenizer
from llmpipe.train.data import TokenWindows
from llmpipe.train.loop import TrainConfig, Trainer
from llmpipe.train.task import pretraining_task
from tests.helpers import torch_threads
from tests.tokenizer.synthetic import make_corpus
from tests.train.synthetic import markov_tokens


def write_tokenizer(out: Path, docs: int, vocab_size: int) -> Path:
    """A tiny tokenizer trained in-process, saved the way the tokenizer stage saves one."""
    from llmpipe.tokenizer import train

    sentences = [s for doc in make_corpus(docs) for s in train.training_sentences(doc)]
    model = train.train_sentencepiece(sentences, vocab_size=vocab_size, character_coverage=0.9995, num_threads=1)
    out.mkdir(parents=True)
    (out / MODEL_FILE).write_bytes(model)
    (out / TOKENIZER_META_FILE).write_text(json.dumps({"hash": hashlib.sha256(model).hexdigest()}))
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Trainer]:
    """A project with a tokenizer and a pretrain output of 4 steps (checkpoints at steps 2 and 4, final/)."""
    root = tmp_path_factory.mktemp("project")
    (root / "dvc.yaml").write_text("stages: {}\n")
    tok = Tokenizer.load(write_tokenizer(root / "models" / "tokenizer", docs=300, vocab_size=400))
    stream = markov_tokens(8_000, tok.vocab_size, seed=3)
    cfg = TrainConfig(seq_len=32, micro_batch=4, global_batch_tokens=128, max_steps=4, lr=3e-3, warmup_steps=1,
                      eval_every=2, eval_batches=1, checkpoint_every=2, sample_tokens=0)
    model_cfg = ModelConfig.from_preset("tiny", tok.vocab_size, n_layer=1, d_model=64, max_seq_len=32)
    with torch_threads(1):
        task = pretraining_task(TokenWindows([stream], 32), TokenWindows([stream[:1000]], 32), cfg)
        trainer = Trainer(model_cfg, cfg, task, root / "models" / "pretrain", {"hash": tok.hash, "vocab_size": tok.vocab_size})
        trainer.fit()
    return root, trainer


@pytest.fixture
def in_project(project, monkeypatch) -> Path:
    monkeypatch.setenv("LLMPIPE_PROJECT", str(project[0]))
    monkeypatch.chdir(project[0])  # a stage name must not be read as a folder of the cwd
    return project[0]


def test_a_trained_model_loads_back_with_its_tokenizer_and_says_where_from(project):
    root, trainer = project
    model, tok, info = load_model(root / "models" / "pretrain")
    assert info.path == str(root / "models" / "pretrain" / "final") and info.step == 4
    assert info.val_loss == pytest.approx(trainer.last["val/loss"]) and info.val_loss < 6.0  # ln(400) = 6.0
    assert info.tokenizer_hash == tok.hash == Tokenizer.load(root / "models" / "tokenizer").hash
    assert info.tokenizer_dir == str(root / "models" / "tokenizer")
    trained = trainer.model.state_dict()
    assert not model.training and model.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    ids = tok.encode("hello there")
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, temperature=0)
    assert out.shape == (1, len(ids) + 5) and isinstance(tok.decode(out[0].tolist()), str)


def test_a_step_checkpoint_and_a_stage_name_load_too(in_project):
    model, _, info = load_model(in_project / "models" / "pretrain" / "checkpoints" / "step-000002")
    assert info.step == 2 and info.path.endswith("step-000002")
    final, _, by_name = load_model("pretrain")
    assert by_name.path == str(in_project / "models" / "pretrain" / "final") and by_name.source == "pretrain"
    assert not torch.equal(model.lm_head.weight, final.lm_head.weight)  # step 2 is not the final model


def test_a_tokenizer_it_was_not_trained_with_is_refused_naming_both_hashes(project, tmp_path):
    root, _ = project
    other = Tokenizer.load(write_tokenizer(tmp_path / "other", docs=150, vocab_size=400))
    trained_with = Tokenizer.load(root / "models" / "tokenizer").hash
    assert other.hash != trained_with
    with pytest.raises(UserError) as err:
        load_model(root / "models" / "pretrain", tokenizer=tmp_path / "other")
    message = str(err.value)
    assert trained_with in message and other.hash in message
    assert "pass the tokenizer directory it was trained with" in message


def test_a_checkpoint_outside_a_project_needs_its_tokenizer_given(project, tmp_path, monkeypatch):
    import shutil

    root, _ = project
    monkeypatch.delenv("LLMPIPE_PROJECT", raising=False)
    monkeypatch.chdir(tmp_path)
    copy = shutil.copytree(root / "models" / "pretrain" / "final", tmp_path / "final")
    with pytest.raises(UserError, match="not inside an llmpipe project.*pass the tokenizer directory"):
        load_model(copy)
    _, _, info = load_model(copy, tokenizer=root / "models" / "tokenizer")
    assert info.step == 4


@pytest.mark.parametrize("source, words", [
    ("nosuch", "no such directory and no such stage.*stages with a model: pretrain"),
    ("tokenizer", "stage 'tokenizer' produces no model"),
])
def test_sources_it_cannot_load_say_what_it_can(in_project, source, words):
    with pytest.raises(UserError, match=words) as err:
        load_model(source)
    assert source == "tokenizer" or "a checkpoint directory, a stage output directory" in str(err.value)


def test_a_hugging_face_export_is_refused_for_now(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="Hugging Face export \\(llama\\); loading those is not supported yet"):
        load_model(tmp_path)


def test_a_stage_that_has_not_run_says_to_run_it(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("LLMPIPE_PROJECT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="models/pretrain does not exist: run the pretrain stage first"):
        load_model("pretrain")
