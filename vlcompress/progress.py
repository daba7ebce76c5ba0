"""Progress reporting without a UI dependency in the core.

Long steps call ``with progress.task("calibrate", total=n) as t: ... t.advance()``. The
default :data:`NULL` does nothing; the CLI passes a rich-backed :class:`RichProgress`.
"""

from __future__ import annotations

from contextlib import contextmanager


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **kw) -> None:
        pass


class Progress:
    """Base (and no-op) progress reporter."""

    @contextmanager
    def task(self, description: str, total: int | None = None):
        yield _NullTask()


NULL = Progress()


class RichProgress(Progress):
    """Rich progress bars on stderr, one per task, kept on screen when done."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RP

        self._rp = RP(SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console or Console(stderr=True), transient=False)

    def __enter__(self):
        self._rp.start()
        return self

    def __exit__(self, *exc):
        self._rp.stop()

    @contextmanager
    def task(self, description: str, total: int | None = None):
        rp = self._rp
        tid = rp.add_task(description, total=total)

        class _T:
            def advance(self, n: int = 1) -> None:
                rp.advance(tid, n)

            def update(self, **kw) -> None:
                rp.update(tid, **kw)

        try:
            yield _T()
        finally:
            t = rp.tasks[[x.id for x in rp.tasks].index(tid)]
            if t.total is not None:
                rp.update(tid, completed=t.total)
