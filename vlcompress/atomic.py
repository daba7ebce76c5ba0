"""Atomic writes: an output appears complete at its destination, or not at all.

A file is written under a temporary name in the same folder (same file system) and moved into
place with :func:`os.replace`; a folder is built as a temporary sibling and renamed into place
when its ``with`` block succeeds. On failure the temporary file or folder is removed and the
destination is left as it was.

Signals: while an atomic folder is being built, SIGTERM (and SIGHUP) raise
:class:`Interrupted` (a ``KeyboardInterrupt``, as SIGINT already does) in the main thread, so
the temporary folder is removed on the way out. SIGKILL cannot be caught: every temporary
name carries the process id of its writer (``.name.tmp-<pid>-<random>``), and the next
``atomic_dir`` / ``atomic_path`` next to the same destination removes the ones whose process
is gone (:func:`remove_stale`), so a killed run never blocks or pollutes a later one.

    atomic_write_bytes("out/report.json", data)
    with atomic_path("out/model.onnx") as tmp:      # any writer that takes a path
        onnx.save_model(model, tmp)
    with atomic_dir("out/run") as tmp:              # a whole folder
        (tmp / "a.txt").write_text("...")
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_dir", "temp_sibling",
           "remove_stale", "check_writable", "Interrupted", "signals_interrupt"]


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGHUP received while building an output (``signum`` says which)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


_CAUGHT = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM / SIGHUP raise :class:`Interrupted` inside the block (main thread only;
    elsewhere a no-op), so ``finally`` / ``except`` clean-ups run as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    old = {}
    for sig in _CAUGHT:
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # pragma: no cover - not allowed here
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def temp_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """A fresh, unused hidden name next to ``path`` (``.name.<kind>-<pid>-<random>``); not
    created. The process id lets :func:`remove_stale` tell a dead writer's leftovers."""
    path = Path(path)
    while True:
        cand = path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
        if not os.path.lexists(cand):
            return cand


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def remove_stale(path: str | Path) -> list[Path]:
    """Remove temporary siblings of ``path`` (``.name.<kind>-<pid>-<random>``) whose writing
    process no longer runs (a SIGKILLed run's leftovers); returns what was removed."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    pat = re.compile(rf"^\.{re.escape(path.name)}\.(?:tmp|old|stage)-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = pat.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed


def check_writable(folder: str | Path, what: str) -> None:
    """Raise :class:`OutputError` unless a file can be created in ``folder`` (tried, then
    removed: permissions alone do not tell, e.g. for root or under ``/proc``)."""
    folder = Path(folder)
    probe = temp_sibling(folder / "probe", "tmp")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise OutputError(f"{what}: cannot write in {str(folder)!r} ({reason}); allowed: a "
                          "path in a writable folder") from None
    os.close(fd)
    os.unlink(probe)


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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {str(path)!r}: cannot create its folder "
                              f"({exc.strerror or exc.__class__.__name__})") from None
    elif not path.parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: {str(path.parent)!r} is not a folder")
    remove_stale(path)


def check_output_file(path: str | Path, option: str) -> Path:
    """``path`` (an output file such as ``--summary``) can be written: not a folder, its
    folder exists or can be made, and a file can be created there. Checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {str(path)!r} is a folder; allowed: a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {str(path)!r}: {str(parent)!r} is not a folder")
    check_writable(parent, f"{option} {str(path)!r}")
    return path


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
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
        except OSError as exc:
            raise OutputError(f"cannot write {str(path)!r} "
                              f"({exc.strerror or exc.__class__.__name__})") from None
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
    tmp = temp_sibling(path)
    with signals_interrupt():  # before mkdir: a signal at any point still removes ``tmp``
        try:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                remove_stale(path)
                os.mkdir(tmp, 0o777)  # the umask decides the final permissions
            except OSError as exc:
                raise OutputError(f"cannot create output folder {str(path)!r} "
                                  f"({exc.strerror or exc.__class__.__name__}); allowed: a path "
                                  "in a writable folder") from None
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
    if not p.parent.is_dir():
        raise OutputError(f"--out {str(p)!r}: {str(p.parent)!r} is not a folder")
    check_writable(p.parent, f"--out {str(p)!r}")
    remove_stale(p)
    return p
