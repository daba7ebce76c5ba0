"""Pure per-weight scorers, one small file each, registered as methods of kind ``score``.

A scorer is ``score(layer, stats, *, seed=0) -> Tensor`` shaped like ``layer.weight``; higher
means keep. ``stats`` is the layer's :class:`~vlcompress.calibrate.LayerStats` (None for
data-free scorers). No I/O, no model-level pass: a method that needs more (gradients, a
solver, a search) is a file in :mod:`vlcompress.methods`.

    @register_scorer("magnitude", needs_calibration=False, allocation="global",
                     description="|W|")
    def magnitude(layer, stats=None, *, seed=0): ...

Every scorer supports every pattern: unstructured and N:M through its allocation, structured
through group scores (a head's score is the sum of its weights' scores).
"""

from __future__ import annotations

from ..methods.registry import Method, Option, register_method


def register_scorer(name: str, *, needs_calibration: bool, allocation: str, description: str = "",
                    options: tuple[Option, ...] = (), row_factor: bool = False):
    """Register ``fn(layer, stats, *, seed) -> Tensor`` as the method ``name`` (kind score).

    A scorer that declares ``options`` (its reference's knobs, ``--method-option``) is called
    with ``options=`` the checked values as well. ``row_factor``: its score multiplies each
    output row by one factor (``Method.row_factor``; the permutation search divides it out)."""

    def deco(fn):
        register_method(Method(name=name, kind="score", description=description,
                               patterns=("unstructured", "nm", "structured"),
                               needs=("calibration",) if needs_calibration else (),
                               allocation=allocation, score=fn, options=tuple(options),
                               row_factor=row_factor))
        return fn

    return deco


__all__ = ["register_scorer"]
