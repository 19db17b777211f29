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
        ckpt.resolve(half)


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
    assert set(files) == {ckpt.WEIGHTS, ckpt.CONFIG, ckpt.TOKENIZER, ckpt.STATE}
    for name, record in files.items():
        data = (path / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name


@pytest.mark.parametrize("name, damage", [(ckpt.WEIGHTS, "truncate"), (ckpt.STATE, "flip"), (ckpt.CONFIG, "delete")])
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
    path = save(tmp_path / "step-000004", GPT(CFG), 4)
    meta = ckpt.read_meta(path)
    del meta["files"]
    (path / ckpt.MARKER).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="llmpipe.train"):
        assert ckpt.newest_intact_checkpoint(tmp_path) == path
        assert ckpt.load_checkpoint(path)[2]["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if "cannot be verified" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0]


def test_resuming_on_other_training_data_names_what_changed(tmp_path):
    model = GPT(CFG)
    path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / "step-000004", model.state_dict(), CFG, TOK,
                                {"step": 4, "data": {"dir": "data/tokens/train", "sha256": "aaa", "num_windows": 100}},
                                {"step": 4}, ckpt.tied_aliases(model))
    ckpt.check_compatible(path, CFG, "tok-a", {"dir": "data/tokens/train", "sha256": "aaa", "num_windows": 100})
    with pytest.raises(UserError) as err:
        ckpt.check_compatible(path, CFG, "tok-a", {"dir": "data/tokens/train", "sha256": "bbb", "num_windows": 90},
                              start_over=tmp_path / "run")
    msg = str(err.value)
    assert "training data sha256 (data/tokens/train): checkpoint 'aaa' != now 'bbb'" in msg
    assert "training data num_windows (data/tokens/train): checkpoint 100 != now 90" in msg
    assert f"delete {tmp_path / 'run'} to start from scratch" in msg
