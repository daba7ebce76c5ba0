"""Scorers: one file per method, each registered by name.

A scorer is a pure function ``score(layer, stats) -> Tensor`` shaped like ``layer.weight``;
higher means keep. ``stats`` is the :class:`~vlcompress.calibrate.LayerStats` of that layer
(None for data-free scorers). A scorer class may also carry an ``allocation`` (how many
weights each layer loses) and ``needs_calibration``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

_SCORERS: dict[str, Scorer] = {}


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable
    needs_calibration: bool
    allocation: str  # default allocation: "global" | "layerwise" | "per_row" | "per_modality"
    description: str = ""


def register_scorer(name: str, *, needs_calibration: bool, allocation: str, description: str = ""):
    """Register ``fn(layer, stats) -> Tensor`` as scorer ``name``."""

    def deco(fn):
        _SCORERS[name] = Scorer(name, fn, needs_calibration, allocation, description)
        return fn

    return deco


def _import_all() -> None:
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def available_scorers() -> list[str]:
    _import_all()
    return sorted(_SCORERS)


def get_scorer(name: str) -> Scorer:
    _import_all()
    if name not in _SCORERS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown method {name!r}; allowed: {', '.join(sorted(_SCORERS))}")
    return _SCORERS[name]
