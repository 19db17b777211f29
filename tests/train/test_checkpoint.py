import json
import logging

import pytest
import torch

from llmpipe.errors import UserError
from llmpipe.model import GPT, ModelConfig
from llmpipe.train import checkpoint as ckpt

CFG = ModelConfig.from_preset("tiny", 64, n_layer=1, d_model=64, max_seq_len=16)
TOK = {"hash": "tok-a", "vocab_size": 64}


def save(directory, model, step, val_loss=None, **kwargs):
    return ckpt.save_checkpoint(directory, model.state_dict(), model.config, TOK, {"step": step, "val_loss": val_loss},
                                trainer_state={"step": step}, aliases=ckpt.tied_aliases(model), **kwargs)


def test_load_checkpoint_rebuilds_the_same_model_with_tied_weights_stored_once(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    save(tmp_path / "run" / "checkpoints" / "step-000003", model, 3, 1.5)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run/checkpoints/step-000003/model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in fh.keys() and "tok_embeddings.weight" in fh.keys()
    loaded, cfg, meta = ckpt.load_checkpoint(tmp_path / "run")  # a stage output dir resolves to its newest
    assert cfg == CFG and meta["step"] == 3 and meta["tokenizer"]["hash"] == "tok-a"
    assert loaded.lm_head.weight is loaded.tok_embeddings.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 64, (1, 8))
    assert torch.equal(model.eval()(idx)[0], loaded(idx)[0])


def test_the_same_weights_saved_again_are_the_same_bytes(tmp_path):
    """What DVC hashes: a rerun that computes the same weights must not make the output look changed.
    safetensors writes its metadata in a Rust HashMap's order, seeded anew for each map: with two
    keys, 8 saves came out in both orders (all 8 alike by chance: 1 in 128)."""
    torch.manual_seed(0)
    model = GPT(CFG)
    files = set()
    for run in range(8):
        ckpt.save_checkpoint(tmp_path / str(run), model.state_dict(), CFG, TOK, {"step": 1},
                             aliases=ckpt.tied_aliases(model))
        files.add((tmp_path / str(run) / ckpt.WEIGHTS).read_bytes())
    assert len(files) == 1


def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_no_new_folder(tmp_path, monkeypatch):
    model = GPT(CFG)
    good = save(tmp_path / "step-000004", model, 4)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # weights and config already written by then
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "step-000008", model, 8)
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000004"]  # the temp folder is gone too
    assert ckpt.load_checkpoint(good)[2]["step"] == 4


def test_a_folder_without_its_completion_marker_is_ignored(tmp_path):
    model = GPT(CFG)
    good = save(tmp_path / "step-000004", model, 4)
    half = save(tmp_path / "step-000008", model, 8)
    (half / ckpt.MARKER).unlink()  # as if killed before the marker (e.g. a copy made by hand)
    assert ckpt.latest_checkpoint(tmp_path) == good
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.find_checkpoint(half)


def test_prune_keeps_the_last_k_and_the_best_by_val_loss(tmp_path):
    model = GPT(CFG)
    for step, val in [(1, 3.0), (2, 1.0), (3, None), (4, 2.0), (5, None), (6, 2.5)]:
        save(tmp_path / f"step-{step:06d}", model, step, val)
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step-000001", "step-000003", "step-000004"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002", "step-000005", "step-000006"]


def test_resuming_with_another_shape_or_tokenizer_lists_every_difference(tmp_path):
    save(tmp_path / "step-000004", GPT(CFG), 4)
    other = ModelConfig.from_preset("tiny", 64, n_layer=2, d_model=128, max_seq_len=16)
    with pytest.raises(UserError) as err:
        ckpt.check_compatible(tmp_path / "step-000004", other, "tok-b")
    msg = str(err.value)
    for needle in ("n_layer: checkpoint 1 != config 2", "d_model: checkpoint 64 != config 128",
                   "tokenizer hash: checkpoint 'tok-a' != data 'tok-b'", "step-000004"):
        assert needle in msg
    ckpt.check_compatible(tmp_path / "step-000004", ModelConfig.from_dict({**CFG.to_dict(), "attn_backend": "math"}),
                          "tok-a")  # the attention kernel may change between runs


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    torch.save({"rng": state}, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert json.loads((save(tmp_path / "c", GPT(CFG), 1) / ckpt.MARKER).read_text())["resumable"] is True


def truncate(file, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def test_the_marker_records_the_hash_and_size_of_every_other_file(tmp_path):
    import hashlib

    path = save(tmp_path / "step-000002", GPT(CFG), 2)
    files = ckpt.read_meta(path)["files"]
    assert set(files) == {"model.safetensors", "model_config.json", "tokenizer_ref.json", "trainer_state.pt"}
    for name, record in files.items():
        data = (path / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name


@pytest.mark.parametrize("name, damage", [(ckpt.WEIGHTS, "truncate"), (ckpt.STATE, "flip"), (ckpt.MODEL_CONFIG, "delete")])
def test_loading_a_corrupt_checkpoint_is_a_user_error_naming_the_file(tmp_path, name, damage):
    path = save(tmp_path / "run" / "checkpoints" / "step-000002", GPT(CFG), 2)
    file = path / name
    if damage == "truncate":
        truncate(file)
    elif damage == "flip":  # same size, one byte changed: only the hash can tell
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    else:
        file.unlink()
    with pytest.raises(UserError) as err:
        ckpt.load_checkpoint(tmp_path / "run")
    assert str(file) in str(err.value) and "cannot be used" in str(err.value)


def test_resume_skips_a_corrupt_newest_checkpoint_and_sets_it_aside(tmp_path, caplog):
    model = GPT(CFG)
    save(tmp_path / "step-000004", model, 4)
    good = save(tmp_path / "step-000008", model, 8)
    bad = save(tmp_path / "step-000012", model, 12)
    truncate(bad / ckpt.WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="llmpipe.train"):
        assert ckpt.newest_intact_checkpoint(tmp_path) == good
    assert "skipping corrupt checkpoint" in caplog.text and str(bad) in caplog.text and ckpt.WEIGHTS in caplog.text
    # set aside, so pruning after the next save cannot keep it as "newest" and delete the good one
    assert (tmp_path / "step-000012.corrupt").is_dir() and not bad.exists()
    ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert ckpt.list_checkpoints(tmp_path) == [good]


def test_a_checkpoint_saved_before_file_hashes_loads_with_one_warning(tmp_path, caplog):
    path = write_old_layout(tmp_path / "step-000004", GPT(CFG), 4, with_hashes=False)
    with caplog.at_level(logging.WARNING, logger="llmpipe.train"):
        assert ckpt.newest_intact_checkpoint(tmp_path) == path
        assert ckpt.load_checkpoint(path)[2]["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if "cannot be verified" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0]


def test_resuming_on_other_training_data_names_what_changed(tmp_path):
    model = GPT(CFG)
    path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / "step-000004", model.state_dict(), CFG, TOK,
                                {"step": 4, "data": {"dir": "data/tokens/train", "sha256": "aaa", "num_examples": 100}},
                                {"step": 4}, ckpt.tied_aliases(model))
    ckpt.check_compatible(path, CFG, "tok-a", {"dir": "data/tokens/train", "sha256": "aaa", "num_examples": 100})
    with pytest.raises(UserError) as err:
        ckpt.check_compatible(path, CFG, "tok-a", {"dir": "data/tokens/train", "sha256": "bbb", "num_examples": 90},
                              start_over=tmp_path / "run")
    msg = str(err.value)
    assert "training data sha256 (data/tokens/train): checkpoint 'aaa' != now 'bbb'" in msg
    assert "training data num_examples (data/tokens/train): checkpoint 100 != now 90" in msg
    assert f"delete {tmp_path / 'run'} to start from scratch" in msg


# -- checkpoints written before model_config.json / tokenizer_ref.json --------------------------------

def write_old_layout(directory, model, step, with_hashes=True):
    """A checkpoint as llmpipe wrote it before the rename, file by file: config.json and tokenizer.json,
    a marker with the files' hashes, or (older still) without them."""
    import hashlib

    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    aliases = ckpt.tied_aliases(model)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k not in aliases}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    (directory / "tokenizer.json").write_text(json.dumps(TOK, indent=2, sort_keys=True) + "\n")
    torch.save({"step": step}, directory / "trainer_state.pt")
    marker = {"step": step, "val_loss": None, "resumable": True}
    if with_hashes:
        marker["files"] = {f.name: {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
                           for f in sorted(directory.iterdir())}
    (directory / "checkpoint.json").write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return directory


@pytest.mark.parametrize("with_hashes", [True, False], ids=["with-hashes", "before-hashes"])
def test_a_checkpoint_in_the_old_layout_loads_and_resumes_like_a_new_one(tmp_path, with_hashes):
    torch.manual_seed(1)
    model = GPT(CFG)
    path = write_old_layout(tmp_path / "run" / "checkpoints" / "step-000004", model, 4, with_hashes)
    assert ckpt.newest_intact_checkpoint(tmp_path / "run" / "checkpoints") == path
    loaded, cfg, meta = ckpt.load_checkpoint(tmp_path / "run")
    assert cfg == CFG and meta["step"] == 4 and meta["tokenizer"] == TOK
    idx = torch.randint(0, 64, (1, 8))
    assert torch.equal(model.eval()(idx)[0], loaded(idx)[0])
    ckpt.check_compatible(path, CFG, "tok-a")  # what a resume checks reads the old names too
    with pytest.raises(UserError, match="tokenizer hash: checkpoint 'tok-a' != data 'tok-b'"):
        ckpt.check_compatible(path, CFG, "tok-b")


def test_a_changed_config_json_of_an_old_checkpoint_is_refused_by_name(tmp_path):
    path = write_old_layout(tmp_path / "step-000004", GPT(CFG), 4)
    config = path / "config.json"
    config.write_text(config.read_text().replace('"n_layer": 1', '"n_layer": 2'))
    with pytest.raises(UserError) as err:
        ckpt.load_checkpoint(path)
    assert f"{config}: " in str(err.value) and "cannot be used" in str(err.value)


def test_a_hugging_face_config_json_next_to_a_checkpoint_is_not_taken_for_its_model_config(tmp_path):
    path = save(tmp_path / "step-000004", GPT(CFG), 4)
    hf_config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 7, "vocab_size": 64}
    (path / "config.json").write_text(json.dumps(hf_config))  # e.g. an export into the same folder
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    loaded, cfg, meta = ckpt.load_checkpoint(path)
    assert cfg == CFG and meta["tokenizer"] == TOK
    (path / "model_config.json").unlink()
    with pytest.raises(UserError, match="model_config.json: missing"):  # not silently the export's config
        ckpt.load_checkpoint(path)
