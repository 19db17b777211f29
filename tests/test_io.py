import json
from pathlib import Path

import pytest

from llmpipe.io import (atomic_path, clean_stale_temps, done_info, hash_tree, mark_done, project_root,
                        write_json_atomic, write_text_atomic)


def test_atomic_file_write_leaves_nothing_partial_on_error(tmp_path: Path):
    final = tmp_path / "out.txt"
    write_text_atomic(final, "v1")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert final.read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_directory_replaces_existing(tmp_path: Path):
    final = tmp_path / "ckpt"
    for version in ("a", "b"):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "w.bin").write_text(version)
    assert (final / "w.bin").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_markers_require_output_and_marker(tmp_path: Path):
    out = tmp_path / "part-00000.parquet"
    assert done_info(out) is None
    out.write_bytes(b"x")
    assert done_info(out) is None  # output without marker: not done
    mark_done(out, {"fingerprint": "abc"})
    assert done_info(out) == {"fingerprint": "abc"}


def test_clean_stale_temps(tmp_path: Path):
    (tmp_path / ".tmp-part-1").write_text("x")
    (tmp_path / ".tmp-dir-2").mkdir()
    (tmp_path / "keep.txt").write_text("x")
    assert clean_stale_temps(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_project_root_from_subdir_and_env(tmp_path: Path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.delenv("LLMPIPE_PROJECT", raising=False)
    assert project_root(tmp_path / "a" / "b") == tmp_path.resolve()
    monkeypatch.setenv("LLMPIPE_PROJECT", str(tmp_path / "a"))
    with pytest.raises(ValueError, match="has no dvc.yaml"):
        project_root()
    monkeypatch.delenv("LLMPIPE_PROJECT")
    with pytest.raises(ValueError, match="no dvc.yaml"):
        project_root(Path("/"))


def test_hash_tree_sees_names_and_contents(tmp_path: Path):
    (tmp_path / "a.txt").write_text("1")
    h1 = hash_tree(tmp_path)
    (tmp_path / "a.txt").write_text("2")
    h2 = hash_tree(tmp_path)
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    assert len({h1, h2, hash_tree(tmp_path)}) == 3


def test_write_json_atomic_roundtrip(tmp_path: Path):
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": 2.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 2.5, "b": 1}


def test_temp_leftovers_of_a_killed_write_are_removed_and_nothing_else(tmp_path: Path):
    from llmpipe.io import remove_temp_leftovers

    final = tmp_path / "quantized"
    (tmp_path / ".tmp-quantized-1a2b3c4d" / "int8").mkdir(parents=True)  # a directory write cut short
    (tmp_path / ".tmp-quantized-5e6f7a8b").write_text("partial")  # a file write cut short
    keep = [tmp_path / ".tmp-quantized_other-1a2b3c4d", tmp_path / "quantized-old", final]
    for path in keep:
        path.mkdir()
    remove_temp_leftovers(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
