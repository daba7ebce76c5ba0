"""Scorers: one file per method, each registered by name.

A scorer is a pure function ``score(layer, stats) -> Tensor`` shaped like ``layer.weight``;
higher means keep. ``stats`` is the :class:`~vlcompress.calibrate.LayerStats` of that layer
(None for data-free scorers). A scorer class may also carry an ``allocation`` (how many
weights each layer loses) and ``needs_calibration``.

Two optional extensions, for methods that need more than per-layer statistics:

- ``prepare(vlm, layers, data, stats, cfg, *, progress) -> Prepared``: one model-level pass
  run by :func:`~vlcompress.prune.prune` before scoring (SNIP's loss gradients, ECoFLaP's
  zeroth-order block importance). ``Prepared.extra[layer.name]`` is then passed to the
  scorer as ``fn(layer, stats, seed=..., extra=...)``; ``Prepared.ratios`` (optional,
  ``{layer name: sparsity}``) replaces the uniform target with per-layer ratios, applied per
  output row (allocation ``per_block``); ``Prepared.details`` goes into the result.
- ``solve(vlm, layers, data, cfg, *, progress) -> Solved``: for methods that *update
  weights* (SparseGPT's OBS compensation) or choose among methods (``auto``), which do not fit
  the pure ``score`` contract. :func:`prune` hands the whole job to ``solve``: it receives
  the layers to prune (N:M-compatible ones), the calibration data (when
  ``needs_calibration``) and the :class:`~vlcompress.config.PruneConfig`; it masks the
  weights in place, may change the surviving ones, and returns ``Solved(masks, details)``.
  Such a scorer has ``updates_weights == True``; its ``fn`` stays a pure score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

_SCORERS: dict[str, Scorer] = {}


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable
    needs_calibration: bool
    allocation: str  # default: "global" | "layerwise" | "per_row" | "per_modality" | "per_block"
    description: str = ""
    prepare: Callable | None = None  # model-level pass before scoring (see the module doc)
    solve: Callable | None = None  # does the whole job, may update weights (see the module doc)

    @property
    def updates_weights(self) -> bool:
        """True when :func:`prune` dispatches to ``solve`` (surviving weights may change)."""
        return self.solve is not None


@dataclass
class Prepared:
    """What a scorer's ``prepare`` returns: per-layer inputs to ``fn``, optional per-layer
    sparsity ratios, and details for the result (JSON-able)."""

    extra: dict = field(default_factory=dict)
    ratios: dict[str, float] | None = None
    details: dict = field(default_factory=dict)


@dataclass
class Solved:
    """What a scorer's ``solve`` returns: ``masks`` (True = kept) for every layer it pruned,
    JSON-able ``details``, and the seconds it spent collecting calibration data."""

    masks: dict
    details: dict = field(default_factory=dict)
    allocation: str = ""
    calibration_seconds: float = 0.0


def register_scorer(name: str, *, needs_calibration: bool, allocation: str, description: str = "",
                    prepare: Callable | None = None, solve: Callable | None = None):
    """Register ``fn(layer, stats) -> Tensor`` as scorer ``name`` (with optional ``prepare``
    or ``solve``, see the module doc)."""

    def deco(fn):
        _SCORERS[name] = Scorer(name, fn, needs_calibration, allocation, description,
                                prepare, solve)
        return fn

    return deco


def _import_all() -> None:
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    importlib.import_module("vlcompress.auto")  # the "auto" meta-method (it calls prune())


def available_scorers() -> list[str]:
    _import_all()
    return sorted(_SCORERS)


def get_scorer(name: str) -> Scorer:
    _import_all()
    if name not in _SCORERS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown method {name!r}; allowed: {', '.join(sorted(_SCORERS))}")
    return _SCORERS[name]
