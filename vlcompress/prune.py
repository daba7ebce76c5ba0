"""``prune()``: calibrate, score, allocate, mask and apply, in place, in one call.

    result = prune(vlm, "multiflow", pattern="2:4", calibration=calib)

The orchestrator over the method registry (:mod:`vlcompress.methods.registry`). Steps:
validate a :class:`PruneConfig` (method x pattern); check the method against the model's
family (:func:`~vlcompress.methods.registry.check_family`); pick the prunable layers in
``scope``; check N:M compatibility up front (before spending time on calibration); then run
the method by its declared kind:

- ``score`` / ``prepare+score``: activation statistics when the method needs calibration, an
  optional model-level ``prepare`` pass, a score per weight, the allocation, the pattern's
  masks, applied in place;
- ``solve``: the method masks (and may update) the weights itself;
- pattern ``structured`` (any kind that supports it): group scores (from weight scores, or the
  method's ``group_importance``, or its ``search``), keep counts, the masked model, slicing,
  verification, ``retrain`` for search+retrain methods, and ``depth``.

The data a method uses is the data it is given: ``calibration`` (and ``train`` for methods that
retrain; the calibration data when None). Where prune() has to use the bundled shapes set
because nothing was given, :attr:`PruneResult.calibration` says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .config import PruneConfig
from .errors import ConfigError
from .methods import reconstruct as recon
from .methods.registry import Context, Method, check_family, get_method
from .models import family_info
from .models.base import VLM
from .progress import NULL, Progress
from .sparsity import (
    allocate,
    apply_masks,
    check_nm,
    nm_mask,
    per_row_mask,
    select_layers,
    sparsity_of,
    sparsity_per_layer,
    sparsity_per_modality,
    unstructured_mask,
)
from .sparsity.packed import PackedMasks

DEFAULT_CALIBRATION = {"source": "shapes", "n": 256, "batch_size": 32}


@dataclass
class PruneResult:
    """What :func:`prune` did.

    ``masks``: ``{layer name: Bool tensor}`` (True = kept) for every layer it masked (skipped
    layers have none), a :class:`~vlcompress.sparsity.packed.PackedMasks` (one bit per weight;
    each read unpacks a new tensor). ``achieved``, ``per_modality`` and ``per_layer`` are fractions of
    weights pruned over the layers in scope, skipped (dense) layers included. ``seconds`` is
    the whole call's wall time, ``calibration_seconds`` the part spent collecting statistics.
    """

    masks: PackedMasks
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
    kind: str = ""  # the method's declared kind
    #: reconstruction after the scorer's mask (methods/reconstruct.py): enabled, why, seconds,
    #: error_ratio ... (None: the structured path, where it does not apply)
    reconstruct: dict | None = None

    @property
    def sparsity(self) -> float:
        return self.target

    def to_dict(self) -> dict:
        """JSON-able summary (no masks), for ``report.json``'s ``prune`` section."""
        return {
            "method": self.method,
            "kind": self.kind,
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
            "reconstruct": self.reconstruct,
        }


def _scope_tuple(scope) -> tuple[str, ...] | None:
    if scope is None:
        return None
    if isinstance(scope, str):
        return tuple(s.strip() for s in scope.split(",") if s.strip())
    return tuple(scope)


def _describe(data) -> str:
    return f"{getattr(data, 'source', '') or 'pairs'} (n={len(data)})"


def _calibration_data(calibration):
    """The calibration data as a PairData and its description for the result."""
    from .data import load_calibration
    from .data.pairs import as_pair_data

    if calibration is None:
        data = load_calibration(**DEFAULT_CALIBRATION)
        return data, f"{_describe(data)}; bundled default: no calibration data was given"
    if isinstance(calibration, (str, Path)):
        data = load_calibration(calibration, n=DEFAULT_CALIBRATION["n"],
                                batch_size=DEFAULT_CALIBRATION["batch_size"])
        return data, _describe(data)
    data = as_pair_data(calibration)
    return data, _describe(data)


def prune(vlm: VLM, method: str = "multiflow", sparsity: float | None = None,
          pattern: str = "unstructured", calibration=None, scope=None, *, train=None,
          skip_incompatible: bool = False, seed: int = 0, layerwise: bool = False,
          units="heads,neurons", round_to: int = 8, depth: int = 0,
          method_options: dict | None = None, progress: Progress = NULL,
          stats: dict | None = None, reconstruct: bool | None = None) -> PruneResult:
    """Prune ``vlm`` in place and return a :class:`PruneResult`.

    - ``method``: a registered method (``vlcompress models --methods``: ``magnitude``,
      ``random``, ``wanda``, ``multiflow``, ``lamp``, ``snip``, ``ecoflap``, ``sparsegpt``,
      ``auto``, ``mope``, ``upop``, ``efficientvlm``). The method declares its patterns,
      families and needs; an unsupported combination is a one-line :class:`ConfigError`
      before any work.
    - ``sparsity``: fraction to prune in [0, 1); None means 0.5 for ``unstructured`` and the
      implied value for ``N:M`` (a conflicting value is a :class:`ConfigError`).
    - ``pattern``: ``unstructured``, ``N:M`` (e.g. ``2:4``: in each output row keep the 2
      highest-scored of every 4 consecutive input columns) or ``structured`` (whole heads and
      MLP neurons, layers physically sliced; ``units``, ``round_to``, ``depth``).
    - ``calibration``: a ``PairData`` (or a source accepted by ``load_calibration``); when the
      method needs data and none is given, 256 pairs of the bundled shapes set, and the
      result's ``calibration`` says so.
    - ``train``: training pairs for methods that retrain (upop, efficientvlm); default: the
      calibration data.
    - ``scope``: modalities to prune (``("vision",)``, ``"vision,text"``); None = all.
    - ``skip_incompatible``: leave layers whose input width is not a multiple of M dense and
      list them in ``skipped``, instead of raising :class:`PatternError`.
    - ``layerwise``: uniform per-layer allocation instead of the method's default.
    - ``method_options``: the method's own options (``Method.options``: e.g. upop's
      ``search_steps``, ``retrain_steps``, ``retrain_lr``); unset ones take their defaults, an
      unknown name or bad value is a one-line :class:`ConfigError`. The result's ``details``
      record the values used under ``method_options``.
    - ``stats``: activation statistics already collected over ``calibration`` on this model
      (``calibrate.collect_stats``; ``auto`` shares one capture among its candidates); layers
      it lacks are collected as usual. Solvers collect their own (block by block).
    - ``reconstruct``: after a scorer's mask, fit the surviving weights to the dense layer
      outputs on the calibration data, block by block (:mod:`vlcompress.methods.reconstruct`).
      None (default): on for scoring methods at unstructured / N:M when calibration data is
      used; True where it does not apply (sparsegpt: implied; structured; no ``calibration``)
      is a one-line :class:`ConfigError` before any work. The result's ``reconstruct`` says
      whether it ran, why, its time and error ratio.
    """
    t0 = time.perf_counter()
    cfg = PruneConfig(method=method, sparsity=sparsity, pattern=pattern,
                      scope=_scope_tuple(scope), skip_incompatible=skip_incompatible,
                      seed=int(seed), layerwise=bool(layerwise), units=units,
                      round_to=round_to, depth=depth, method_options=method_options,
                      reconstruct=reconstruct)  # refuses --reconstruct where it cannot apply
    m = get_method(cfg.method)
    check_family(m, cfg.pattern, family_info(vlm))
    if reconstruct:  # no data to fit on: refused before any work
        recon.resolve(True, m, cfg.pattern, calibration is not None)
    ctx = Context(vlm=vlm, cfg=cfg, progress=progress, prune=prune)
    if cfg.pattern.is_structured:
        return _prune_structured(ctx, m, calibration, train, t0)
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

    given, stats = stats or {}, {}
    details: dict = {}
    # replaced below when a scorer's masks are made; else why it did not run
    recon_info = {"enabled": False, "why": "nothing pruned" if target == 0 or not layers
                  else recon.resolve(reconstruct, m, pat, True)[1]}
    calib_seconds = 0.0
    calib_desc = None
    if m.needs_calibration and layers and target > 0:
        from .calibrate import collect_stats

        tc = time.perf_counter()
        ctx.data, calib_desc = _calibration_data(calibration)
        if m.kind != "solve":  # a solver collects what it needs itself
            missing = [ly for ly in layers if ly.name not in given]
            stats = {ly.name: given[ly.name] for ly in layers if ly.name in given}
            if missing:
                stats.update(collect_stats(vlm, ctx.data, missing, progress=progress))
        calib_seconds = time.perf_counter() - tc

    allocation = "nm" if pat.is_nm else ("layerwise" if cfg.layerwise else m.allocation)
    masks = PackedMasks()
    if target == 0:
        for ly in layers:
            masks[ly.name] = torch.ones(ly.weight.shape, dtype=torch.bool, device=ly.weight.device)
    elif m.kind == "solve" and layers:  # updates weights / chooses among methods
        if cfg.method_options.get("permute"):
            details["permute"] = _permute_for_solver(ctx, layers, pat)
        solved = m.solve(ctx, layers)
        masks = solved.masks if isinstance(solved.masks, PackedMasks) \
            else PackedMasks(solved.masks)
        details = {**details, **solved.details}
        allocation = solved.allocation or allocation
        calib_seconds += solved.calibration_seconds
    elif layers:
        extra: dict = {}
        ratios = None
        if m.prepare is not None:
            prep = m.prepare(ctx, layers, stats)
            extra, ratios, details = prep.extra, prep.ratios, dict(prep.details)
        if allocation == "per_block" and ratios is None:
            allocation = "per_row"
        scores: dict[str, torch.Tensor] = {}
        with progress.task("score", total=len(layers)) as task:
            for ly in layers:
                kw = {"extra": extra.pop(ly.name, None)} if m.prepare is not None else {}
                scores[ly.name] = m.score(ly, stats.get(ly.name), seed=cfg.seed, **kw,
                                          **_score_options(m, cfg))
                task.advance()
        if cfg.method_options.get("permute"):  # N:M only (PruneConfig): reorder, then mask
            from .sparsity.permute import permute_for_nm

            details["permute"] = permute_for_nm(
                vlm, layers, scores, pat.n, pat.m, seed=cfg.seed, progress=progress,
                **_permute_options(cfg, m))
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
                elif allocation == "per_block":  # the method's per-layer ratios, per row
                    masks[ly.name] = per_row_mask(s, ratios[ly.name])
                else:
                    masks[ly.name] = unstructured_mask(s, counts[ly.name])
                task.advance()
        on, why = recon.resolve(reconstruct, m, pat,
                                ctx.data is not None or calibration is not None)
        recon_info = {"enabled": on, "why": why}
        if on:
            if ctx.data is None:
                tc = time.perf_counter()
                ctx.data, calib_desc = _calibration_data(calibration)
                calib_seconds += time.perf_counter() - tc
            recon_info.update(recon.reconstruct(vlm, layers, masks, ctx.data, progress=progress))
            calib_seconds += recon_info["calibration_seconds"]
        else:
            apply_masks(layers, masks)

    return PruneResult(
        masks=masks, method=cfg.method, kind=m.kind, pattern=str(pat), target=target,
        achieved=sparsity_of(masks, scope_layers),
        per_modality=sparsity_per_modality(masks, scope_layers),
        per_layer=sparsity_per_layer(masks, scope_layers),
        skipped=skipped, seconds=time.perf_counter() - t0, calibration_seconds=calib_seconds,
        allocation=allocation, scope=None if cfg.scope is None else list(cfg.scope),
        calibration=calib_desc, details={**details, **({"method_options": cfg.method_options}
                                                        if cfg.method_options else {})},
        reconstruct=recon_info,
    )


def _score_options(m: Method, cfg) -> dict:
    """``options=`` for a scorer that declares options (RIA's exponent), else nothing."""
    return {"options": {o.name: cfg.method_options[o.name] for o in m.options}} \
        if m.kind == "score" and m.options else {}


def _permute_options(cfg, m: Method) -> dict:
    """The permutation search's budget, round cap and objective (``auto`` resolved by the
    method: :meth:`Method.permute_objective`) from the method options."""
    o = cfg.method_options
    return {"seconds": o["permute_seconds"], "rounds": o["permute_rounds"] or None,
            "objective": m.permute_objective(o["permute_objective"])}


def _permute_for_solver(ctx: Context, layers, pat) -> dict:
    """Channel permutation before a solver (SparseGPT, auto) masks the weights itself: the
    importance is ``|W_ij| * a_j`` (wanda; SparseGPT's OBS saliency ``w^2 / [H^-1]_jj`` with a
    diagonal Hessian), from one extra calibration pass over the permutable layers only."""
    from .calibrate import collect_stats
    from .sparsity.permute import permutable_pairs, permute_for_nm

    pairs, _ = permutable_pairs(ctx.vlm, layers)
    targets = [p.consumer for p in pairs]
    t0 = time.perf_counter()
    stats = collect_stats(ctx.vlm, ctx.data, targets, progress=ctx.progress) \
        if targets and ctx.data is not None else {}
    scores = {ly.name: ly.weight.detach().float().abs()
              * (stats[ly.name].norm.to(ly.weight.device).unsqueeze(0) if ly.name in stats else 1.0)
              for ly in targets}
    calib = time.perf_counter() - t0
    out = permute_for_nm(ctx.vlm, layers, scores, pat.n, pat.m, seed=ctx.cfg.seed,
                         progress=ctx.progress,
                         **_permute_options(ctx.cfg, get_method(ctx.cfg.method)))
    out["importance"] = "|W| * ||x_j|| (wanda)" if stats else "|W| (no calibration data)"
    out["calibration_seconds"] = calib
    return out


# --------------------------------------------------------------------------------------------
# pattern structured
# --------------------------------------------------------------------------------------------
def _structured_allocation(m: Method, cfg) -> str:
    if m.structured_allocation:
        return m.structured_allocation
    if m.group_importance is not None:
        return "per_tower"
    if cfg.layerwise:
        return "uniform"
    if m.allocation in ("global", "per_tower"):
        return "per_tower"
    return "per_modality" if m.allocation == "per_modality" else "uniform"


def _prune_structured(ctx: Context, m: Method, calibration, train, t0: float) -> PruneResult:
    """Structured prune of ``ctx.vlm`` in place (see :mod:`vlcompress.sparsity.structured`);
    the result's masks are shaped like the original (unsliced) weights."""
    from .models.surgery import STRUCTURED_FLAG, find_blocks, remove_layers, slice_block
    from .sparsity.structured import (
        HEAD_ROUNDING_RULE,
        check_structured,
        compare_outputs,
        group_scores_from_weights,
        keep_counts,
        keep_heads_kv,
        kv_group_scores,
        kv_masks,
        probe_inputs,
        top_k,
        tower_outputs,
        weight_masks,
    )

    vlm, cfg, progress = ctx.vlm, ctx.cfg, ctx.progress
    scope_layers = select_layers(vlm, cfg.scope)
    blocks = check_structured(vlm, cfg, find_blocks(vlm, scope_layers))
    target = float(cfg.sparsity)
    units = tuple(cfg.units)
    allocation = _structured_allocation(m, cfg)
    if m.search is not None and target > 0:  # refused before any search, in one line
        from .methods._search import check_reachable

        check_reachable(cfg.method, blocks, tuple(cfg.units), cfg.round_to, target)
    kv_mode = cfg.method_options.get("kv_groups", "within")
    if kv_mode != "within" and not any(b.layout.kv_paths for b in blocks):
        raise ConfigError(f"method option kv_groups={kv_mode} removes key/value groups of a "
                          f"grouped-query decoder; {vlm.name!r} has none in scope (allowed: a "
                          "llava model's language part)")
    if kv_mode != "within" and "heads" not in units:
        raise ConfigError(f"method option kv_groups={kv_mode} removes attention heads; --units "
                          f"{','.join(units)} removes none (allowed: --units heads or heads,neurons)")

    calib_seconds = 0.0
    calib_desc = None
    if (m.needs_calibration and target > 0) or cfg.depth:
        ctx.data, calib_desc = _calibration_data(calibration)
    if m.retrain is not None and target > 0:
        ctx.train = ctx.data if train is None else _calibration_data(train)[0]

    head_s: dict[str, torch.Tensor] = {}
    neur_s: dict[str, torch.Tensor] = {}
    kv_s: dict[str, torch.Tensor] = {}  # per grouped-query block: its k/v heads' scores
    counts = None
    method_details: dict = {}
    dense = None
    if target > 0 and m.retrain is not None:
        from .distill import dense_copy

        dense = ctx.dense = dense_copy(vlm)
    if target > 0:
        tc = time.perf_counter()
        if m.search is not None:
            head_s, neur_s, counts, method_details = m.search(ctx, blocks)
        elif m.group_importance is not None:
            head_s, neur_s = m.group_importance(ctx, blocks)
        else:
            lys = [ly for b in blocks for ly in b.linears.values()]
            by_name = {ly.name: ly for ly in scope_layers}
            kv_lys = {b.prefix: [by_name[f"{b.layer_prefix}.{p}"] for p in b.layout.kv_paths.values()]
                      for b in blocks if kv_mode != "within" and b.layout.kv_paths
                      and all(f"{b.layer_prefix}.{p}" in by_name for p in b.layout.kv_paths.values())}
            lys += [ly for v in kv_lys.values() for ly in v]
            stats: dict = {}
            if m.needs_calibration:
                from .calibrate import collect_stats

                stats = collect_stats(vlm, ctx.data, lys, progress=progress)
            with progress.task("score", total=len(blocks)) as task:
                for b in blocks:
                    sc = {ly.name: m.score(ly, stats.get(ly.name), seed=cfg.seed,
                                           **_score_options(m, cfg))
                          for ly in b.linears.values()}
                    head_s[b.prefix], neur_s[b.prefix] = group_scores_from_weights(b, sc)
                    if b.prefix in kv_lys:
                        kv_s[b.prefix] = kv_group_scores(b, {
                            ly.name: m.score(ly, stats.get(ly.name), seed=cfg.seed,
                                             **_score_options(m, cfg)) for ly in kv_lys[b.prefix]})
                    task.advance()
        if m.needs_calibration:
            calib_seconds = time.perf_counter() - tc
    if counts is None:
        counts = keep_counts(blocks, head_s, neur_s, allocation, target, units, cfg.round_to,
                             kv_mode)

    keep: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    kv_used: dict[str, str] = {}
    masks = PackedMasks()
    for b in blocks:
        h, f = counts[b.prefix]
        hk, kvk = torch.arange(b.num_heads), None
        if h != b.num_heads:
            hk, kvk, kv_used[b.prefix] = keep_heads_kv(b, head_s[b.prefix], h, kv_mode,
                                                       kv_s.get(b.prefix))
        fk = torch.arange(b.mlp_width) if f == b.mlp_width else top_k(neur_s[b.prefix], f)
        keep[b.prefix] = (hk, fk, kvk)
        masks.update(weight_masks(b, hk, fk))
        if kvk is not None:
            masks.update(kv_masks(b, kvk))

    shapes_before = {b.prefix: (b.num_heads, b.mlp_width) for b in blocks}
    kv_before = {b.prefix: b.kv_groups for b in blocks if b.layout.kv_paths}
    # Sparsity is measured against the original shapes: stand-ins that outlive the slicing.
    orig_layers = [SimpleNamespace(name=ly.name, modality=ly.modality,
                                   weight=torch.empty(tuple(ly.weight.shape), device="meta"))
                   for ly in scope_layers]
    changed = [b for b in blocks if counts[b.prefix] != shapes_before[b.prefix]]
    verify: dict[str, float] = {}
    if changed:
        probe = probe_inputs(vlm, ctx.data)
        apply_masks(scope_layers, masks)
        ref = tower_outputs(vlm, probe)
        with progress.task("slice", total=len(changed)) as task:
            for b in changed:
                hk, fk, kvk = keep[b.prefix]
                slice_block(b, hk if len(hk) != b.num_heads else None,
                            fk if len(fk) != b.mlp_width else None, kvk)
                task.advance()
        setattr(vlm.model, STRUCTURED_FLAG, True)
        verify = compare_outputs(ref, tower_outputs(vlm, probe))
    if dense is not None:
        method_details["retrain"] = m.retrain(ctx, dense)
    dense = ctx.dense = None  # the teacher's memory goes back before any depth step
    if cfg.method_options:
        method_details["method_options"] = dict(cfg.method_options)

    removed: dict[str, list[int]] = {}
    layer_scores: dict[str, list[float]] = {}
    if cfg.depth:
        sliced_blocks = find_blocks(vlm, select_layers(vlm, cfg.scope))
        tc = time.perf_counter()
        imp = m.layer_importance(ctx, sliced_blocks)
        calib_seconds += time.perf_counter() - tc
        by_prefix = {b.prefix: b for b in blocks}
        for stack, scores in imp.items():
            drop = top_k(-scores, cfg.depth).tolist()
            layer_scores[stack] = [float(x) for x in scores]
            remove_layers(vlm.model, stack, drop)
            removed[stack] = drop
            for i in drop:
                b = by_prefix[f"{stack}.{i}"]
                for ly in b.linears.values():
                    masks[ly.name] = torch.zeros_like(masks[ly.name])  # original shape
    structure = {
        "units": list(units),
        "round_to": cfg.round_to,
        "depth": cfg.depth,
        "allocation": allocation,
        "rounding": HEAD_ROUNDING_RULE,
        "layers": {b.prefix: {"modality": b.modality,
                              "heads": [int(counts[b.prefix][0]), shapes_before[b.prefix][0]],
                              "mlp": [int(counts[b.prefix][1]), shapes_before[b.prefix][1]],
                              "removed": b.index in removed.get(b.stack, []),
                              **({"kv_heads": [len(keep[b.prefix][2]) if keep[b.prefix][2]
                                               is not None else kv_before[b.prefix],
                                               kv_before[b.prefix]],
                                  "kv_groups": kv_used.get(b.prefix, "within")}
                                 if b.prefix in kv_before else {})}
                   for b in blocks},
        "kv_groups": kv_mode,
        "removed_layers": removed,
        "layer_importance": layer_scores,
        "verify_max_abs_diff": verify,
    }
    if ctx.train is not None:
        structure["train_data"] = _describe(ctx.train)
    return PruneResult(
        masks=masks, method=cfg.method, kind=m.kind, pattern="structured", target=target,
        achieved=sparsity_of(masks, orig_layers),
        per_modality=sparsity_per_modality(masks, orig_layers),
        per_layer=sparsity_per_layer(masks, orig_layers),
        seconds=time.perf_counter() - t0, calibration_seconds=calib_seconds,
        allocation=allocation, scope=None if cfg.scope is None else list(cfg.scope),
        calibration=calib_desc,
        details={"structured": structure, **({cfg.method: method_details} if method_details else {})},
    )
