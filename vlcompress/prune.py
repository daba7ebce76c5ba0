"""``prune()``: calibrate, score, allocate, mask and apply, in place, in one call.

    result = prune(vlm, "multiflow", pattern="2:4", calibration=calib)

Steps: validate a :class:`PruneConfig`; pick the prunable layers in ``scope``; check N:M
compatibility up front (before spending time on calibration); collect activation statistics
when the scorer needs them; score every layer; turn scores into masks (N:M per layer, or the
scorer's allocation then an exact unstructured mask); zero the masked weights in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import PruneConfig
from .errors import ConfigError
from .models.base import VLM, PrunableLayer
from .progress import NULL, Progress
from .scoring import get_scorer
from .sparsity import (
    allocate,
    apply_masks,
    check_nm,
    nm_mask,
    per_row_mask,
    sparsity_of,
    sparsity_per_layer,
    sparsity_per_modality,
    unstructured_mask,
)

DEFAULT_CALIBRATION = {"source": "shapes", "n": 256, "batch_size": 32}


@dataclass
class PruneResult:
    """What :func:`prune` did.

    ``masks``: ``{layer name: Bool tensor}`` (True = kept) for every layer it masked (skipped
    layers have none). ``achieved``, ``per_modality`` and ``per_layer`` are fractions of
    weights pruned over the layers in scope, skipped (dense) layers included. ``seconds`` is
    the whole call's wall time, ``calibration_seconds`` the part spent collecting statistics.
    """

    masks: dict[str, torch.Tensor]
    method: str
    pattern: str
    target: float
    achieved: float
    per_modality: dict[str, float]
    per_layer: dict[str, float]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    calibration_seconds: float = 0.0
    allocation: str = ""
    scope: list[str] | None = None
    calibration: str | None = None  # source and size of the calibration data, when used
    details: dict = field(default_factory=dict)  # method-specific (auto's pick, ecoflap's blocks)

    @property
    def sparsity(self) -> float:
        return self.target

    def to_dict(self) -> dict:
        """JSON-able summary (no masks), for ``report.json``'s ``prune`` section."""
        return {
            "method": self.method,
            "pattern": self.pattern,
            "sparsity": self.target,
            "target": self.target,
            "achieved": self.achieved,
            "allocation": self.allocation,
            "scope": self.scope,
            "per_modality": dict(self.per_modality),
            "per_layer": dict(self.per_layer),
            "skipped": list(self.skipped),
            "seconds": self.seconds,
            "calibration_seconds": self.calibration_seconds,
            "calibration": self.calibration,
            "details": dict(self.details),
        }


def _scope_tuple(scope) -> tuple[str, ...] | None:
    if scope is None:
        return None
    if isinstance(scope, str):
        return tuple(s.strip() for s in scope.split(",") if s.strip())
    return tuple(scope)


def _calibration_data(calibration):
    from .data import load_calibration

    if calibration is None:
        return load_calibration(**DEFAULT_CALIBRATION)
    if isinstance(calibration, (str, Path)):
        return load_calibration(calibration, n=DEFAULT_CALIBRATION["n"],
                                batch_size=DEFAULT_CALIBRATION["batch_size"])
    return calibration


def select_layers(vlm: VLM, scope: tuple[str, ...] | None) -> list[PrunableLayer]:
    """``vlm``'s prunable layers whose modality is in ``scope`` (all when None)."""
    layers = vlm.prunable_layers()
    if scope is None:
        return list(layers)
    picked = [ly for ly in layers if ly.modality in scope]
    if not picked:
        have = sorted({ly.modality for ly in layers})
        raise ConfigError(f"scope {','.join(scope)} selects no prunable layer of {vlm.name}; "
                          f"its modalities: {', '.join(have)}")
    return picked


def prune(vlm: VLM, method: str = "multiflow", sparsity: float | None = None,
          pattern: str = "unstructured", calibration=None, scope=None, *,
          skip_incompatible: bool = False, seed: int = 0, layerwise: bool = False,
          units="heads,neurons", round_to: int = 8, depth: int = 0,
          progress: Progress = NULL) -> PruneResult:
    """Prune ``vlm`` in place and return a :class:`PruneResult`.

    - ``method``: a registered scorer (``magnitude``, ``random``, ``wanda``, ``multiflow``,
      ``lamp``, ``snip``, ``ecoflap``, ``sparsegpt``, ``auto``...). ``sparsegpt`` also updates
      the surviving weights and ``auto`` picks among methods (the registry's ``solve``
      extension); method-specific facts land in ``PruneResult.details``.
    - ``sparsity``: fraction to prune in [0, 1); None means 0.5 for ``unstructured`` and the
      implied value for ``N:M`` (a conflicting value is a :class:`ConfigError`).
    - ``pattern``: ``unstructured`` or ``N:M`` (e.g. ``2:4``: in each output row keep the 2
      highest-scored of every 4 consecutive input columns; allocation does not apply).
    - ``calibration``: a ``PairData`` (or a source accepted by ``load_calibration``); when the
      scorer needs data and none is given, 256 pairs of the bundled shapes set.
    - ``scope``: modalities to prune (``("vision",)``, ``"vision,text"``); None = all.
    - ``skip_incompatible``: leave layers whose input width is not a multiple of M dense and
      list them in ``skipped``, instead of raising :class:`PatternError`.
    - ``layerwise``: uniform per-layer allocation (each layer loses ``floor(s * n_l)``)
      instead of the method's default (global for magnitude, per-modality for multiflow,
      per-row for wanda).
    - ``pattern="structured"``: remove whole attention heads and MLP neurons (``units``) and
      physically slice the layers, kept widths rounded to ``round_to``; ``depth`` removes that
      many whole layers per tower (mope). See :mod:`vlcompress.sparsity.structured`.
    """
    t0 = time.perf_counter()
    cfg = PruneConfig(method=method, sparsity=sparsity, pattern=pattern,
                      scope=_scope_tuple(scope), skip_incompatible=skip_incompatible,
                      seed=int(seed), layerwise=bool(layerwise), units=units,
                      round_to=round_to, depth=depth)
    scorer = get_scorer(cfg.method)
    if cfg.pattern.is_structured:
        from .sparsity.structured import prune_structured

        return prune_structured(vlm, cfg, scorer, calibration, progress, t0)
    pat = cfg.pattern
    target = float(cfg.sparsity)
    scope_layers = select_layers(vlm, cfg.scope)

    # N:M compatibility first, so a bad width fails before any calibration work.
    skipped: list[str] = []
    layers = scope_layers
    if pat.is_nm:
        layers = []
        for ly in scope_layers:
            if ly.weight.shape[1] % pat.m == 0:
                layers.append(ly)
            elif cfg.skip_incompatible:
                skipped.append(ly.name)
            else:
                check_nm(ly.weight.shape[1], pat.n, pat.m, ly.name)  # raises PatternError

    stats: dict = {}
    data = None
    details: dict = {}
    calib_seconds = 0.0
    calib_desc = None
    if scorer.needs_calibration and layers and target > 0:
        from .calibrate import collect_stats
        from .data.pairs import as_pair_data

        tc = time.perf_counter()
        data = as_pair_data(_calibration_data(calibration))
        if scorer.solve is None:  # a solver collects what it needs itself
            stats = collect_stats(vlm, data, layers, progress=progress)
        calib_seconds = time.perf_counter() - tc
        calib_desc = f"{getattr(data, 'source', '') or 'pairs'} (n={len(data)})"

    allocation = "nm" if pat.is_nm else ("layerwise" if cfg.layerwise else scorer.allocation)
    masks: dict[str, torch.Tensor] = {}
    if target == 0:
        masks = {ly.name: torch.ones(ly.weight.shape, dtype=torch.bool, device=ly.weight.device)
                 for ly in layers}
    elif scorer.solve is not None and layers:  # updates weights / meta-method: see scoring doc
        solved = scorer.solve(vlm, layers, data, cfg, progress=progress)
        masks, details = solved.masks, dict(solved.details)
        allocation = solved.allocation or allocation
        calib_seconds += solved.calibration_seconds
    else:
        extra: dict = {}
        ratios = None
        if scorer.prepare is not None and layers:
            prep = scorer.prepare(vlm, layers, data, stats, cfg, progress=progress)
            extra, ratios, details = prep.extra, prep.ratios, dict(prep.details)
        kw = {"extra": None} if scorer.prepare is not None else {}
        if allocation == "per_block" and ratios is None:
            allocation = "per_row"
        scores: dict[str, torch.Tensor] = {}
        with progress.task("score", total=len(layers)) as task:
            for ly in layers:
                if kw:
                    kw["extra"] = extra.pop(ly.name, None)
                scores[ly.name] = scorer.fn(ly, stats.get(ly.name), seed=cfg.seed, **kw)
                task.advance()
        kw.clear()
        counts = None
        if allocation not in ("nm", "per_row", "per_block"):
            counts = allocate(allocation, layers, scores, target)
        with progress.task("mask", total=len(layers)) as task:
            for ly in layers:
                s = scores.pop(ly.name)
                if allocation == "nm":
                    masks[ly.name] = nm_mask(s, pat.n, pat.m, ly.name)
                elif allocation == "per_row":
                    masks[ly.name] = per_row_mask(s, target)
                elif allocation == "per_block":  # the scorer's per-layer ratios, per row
                    masks[ly.name] = per_row_mask(s, ratios[ly.name])
                else:
                    masks[ly.name] = unstructured_mask(s, counts[ly.name])
                task.advance()
        apply_masks(layers, masks)

    return PruneResult(
        masks=masks,
        method=cfg.method,
        pattern=str(pat),
        target=target,
        achieved=sparsity_of(masks, scope_layers),
        per_modality=sparsity_per_modality(masks, scope_layers),
        per_layer=sparsity_per_layer(masks, scope_layers),
        skipped=skipped,
        seconds=time.perf_counter() - t0,
        calibration_seconds=calib_seconds,
        allocation=allocation,
        scope=None if cfg.scope is None else list(cfg.scope),
        calibration=calib_desc,
        details=details,
    )
