"""Errors the toolkit raises on purpose.

Every error a user can cause is a :class:`VlcError`; the CLI turns it into one line on
stderr and a non-zero exit code (a traceback only with ``--debug``). Anything else is a bug.
"""

from __future__ import annotations


class VlcError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 2


class ConfigError(VlcError, ValueError):
    """A bad option value (sparsity, method, pattern, ...)."""


class ModelError(VlcError):
    """A model that cannot be found, loaded or is of an unsupported family."""


class DataError(VlcError):
    """Calibration or evaluation data that is missing, empty or corrupt."""


class PatternError(VlcError):
    """A sparsity pattern that cannot be applied to a layer (e.g. N:M on a bad width)."""


class ExportError(VlcError):
    """An export whose outputs disagree with PyTorch, or that failed to build."""


class MissingDependencyError(VlcError):
    """An optional backend (tensorrt, onnxruntime-gpu, CUDA) is not available."""


class OutputError(VlcError):
    """An output path that cannot be written (existing file, non-empty folder, ...)."""


class BaselineError(VlcError):
    """A report the gate cannot compare: missing, unreadable, another schema version, or
    lacking a field the comparison needs (the message names it). Exit code 2; a broken
    threshold is not an error (exit code 1, see :mod:`vlcompress.gate`)."""

    exit_code = 2


class ServeError(VlcError):
    """A serving check that could not run: the server did not start, a model did not load,
    or a request failed (the message quotes the server's own error line)."""
