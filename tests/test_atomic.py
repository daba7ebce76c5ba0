"""Atomic writes: the destination appears only complete; a failure leaves nothing behind."""

from __future__ import annotations

import os
import stat

import pytest

from vlcompress.atomic import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text
from vlcompress.errors import OutputError


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_bytes_and_text(tmp_path):
    p = atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write_text(p, "replaced")
    assert p.read_text() == "replaced"
    assert _names(p.parent) == ["a.bin"]  # no temporary files left


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_write_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_atomic_path_failure_leaves_destination_untouched(tmp_path):
    dest = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        assert not dest.exists()  # nothing at the destination while writing
        raise RuntimeError("writer crashed")
    assert _names(tmp_path) == []

    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("new but incomplete")
        raise RuntimeError("writer crashed")
    assert dest.read_text() == "old" and _names(tmp_path) == ["model.onnx"]

    with atomic_path(dest) as tmp:
        tmp.write_text("new")
        assert dest.read_text() == "old"
    assert dest.read_text() == "new" and _names(tmp_path) == ["model.onnx"]


def test_atomic_path_errors(tmp_path):
    with pytest.raises(OutputError, match="nothing was written"), atomic_path(tmp_path / "x"):
        pass
    assert _names(tmp_path) == []
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="a folder of that name"):
        atomic_write_bytes(tmp_path / "d", b"")


def test_atomic_dir_appears_only_complete(tmp_path):
    dest = tmp_path / "run"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
        assert not dest.exists()
    assert _names(dest) == ["a.txt", "sub"] and (dest / "sub" / "b.txt").read_text() == "b"
    assert _names(tmp_path) == ["run"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("a")
        raise KeyboardInterrupt
    assert not dest.exists() and _names(tmp_path) == []


def test_atomic_dir_existing_destination(tmp_path):
    dest = tmp_path / "run"
    dest.mkdir()
    with atomic_dir(dest) as tmp:  # an empty folder may be replaced
        (tmp / "a.txt").write_text("a")
    assert _names(dest) == ["a.txt"]
    with pytest.raises(OutputError, match="not empty"), atomic_dir(dest):
        pass
    with pytest.raises(RuntimeError), atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
        raise RuntimeError
    assert _names(dest) == ["a.txt"]  # a failed overwrite keeps the old folder
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert _names(dest) == ["b.txt"] and _names(tmp_path) == ["run"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file"), atomic_dir(f):
        pass
