"""Atomic writes: an output appears complete at its destination, or not at all.

A file is written under a temporary name in the same folder (same file system) and moved into
place with :func:`os.replace`; a folder is built as a temporary sibling and renamed into place
when its ``with`` block succeeds. On failure the temporary file or folder is removed and the
destination is left as it was.

    atomic_write_bytes("out/report.json", data)
    with atomic_path("out/model.onnx") as tmp:      # any writer that takes a path
        onnx.save_model(model, tmp)
    with atomic_dir("out/run") as tmp:              # a whole folder
        (tmp / "a.txt").write_text("...")
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_dir", "temp_sibling"]


def temp_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """A fresh, unused hidden name next to ``path`` (``.name.<kind>-<random>``); not created."""
    path = Path(path)
    while True:
        cand = path.with_name(f".{path.name}.{kind}-{secrets.token_hex(4)}")
        if not os.path.lexists(cand):
            return cand


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            p.unlink()
    except OSError:  # pragma: no cover - best effort clean-up
        pass


def _check_file_destination(path: Path) -> None:
    if path.is_dir():
        raise OutputError(f"cannot write file {str(path)!r}: a folder of that name exists")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: {str(path.parent)!r} is not a folder")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The temporary file is not created: hand the path to a writer (``onnx.save_model``,
    ``torch.save``, ...). If the block raises, or writes nothing, ``path`` is untouched.
    """
    path = Path(path)
    _check_file_destination(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise OutputError(f"nothing was written for {str(path)!r}")
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling + ``os.replace``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # O_EXCL: never follow or clobber someone else's file; 0o666 lets the umask decide.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8",
                      fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


@contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``path``; rename it to ``path`` on success.

    ``path`` must not exist, or be an empty folder; with ``overwrite=True`` an existing folder
    is replaced (the old one is removed only after the new one is in place). Raises
    :class:`OutputError` up front when ``path`` is an existing file or a non-empty folder
    (without ``overwrite``). If the block raises, the temporary folder is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    _check_dir_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    os.mkdir(tmp, 0o777)  # the umask decides the final permissions
    try:
        yield tmp
        _commit_dir(tmp, path, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def _check_dir_destination(path: Path, overwrite: bool) -> None:
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"output folder {str(path)!r} exists and is a file")
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise OutputError(f"output folder {str(path)!r} exists and is not empty; "
                          "choose a new folder or remove it")


def _commit_dir(tmp: Path, path: Path, overwrite: bool) -> None:
    _check_dir_destination(path, overwrite)  # again: it may have changed meanwhile
    old = None
    if path.is_dir():
        if any(path.iterdir()):
            old = temp_sibling(path, "old")
            os.replace(path, old)
        else:
            path.rmdir()
    try:
        os.replace(tmp, path)
    except OSError as exc:
        if old is not None:
            os.replace(old, path)
        raise OutputError(f"cannot move the finished folder into {str(path)!r}: {exc}") from exc
    if old is not None:
        _remove(old)


def check_output_folder(out: str | Path, force: bool) -> Path:
    """``out`` must not be a file, nor a non-empty folder unless ``force``."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise OutputError(f"--out {str(p)!r} is an existing file; allowed: a new or empty folder")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise OutputError(f"--out {str(p)!r} is a non-empty folder; pass --force to replace it")
    if not p.parent.exists():
        raise OutputError(f"--out {str(p)!r}: parent folder {str(p.parent)!r} does not exist")
    return p
