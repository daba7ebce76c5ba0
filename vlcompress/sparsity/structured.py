"""Structured pruning: whole attention heads and MLP neurons, then physical slicing.

Groups (Torch-Pruning's word: weights that must go together):

- a **head** of an encoder layer: its ``head_dim`` rows of q, k and v and the matching
  ``head_dim`` columns of the out-projection;
- an MLP **neuron**: its fc1 row (and bias) and its fc2 column.

Any weight scorer feeds this: a group's score is the sum of its weights' scores
(:func:`group_scores_from_weights`). A scorer may instead score groups itself by attaching
``fn.group_importance(vlm, blocks, data, ...)`` (MoPE does, and ``fn.layer_importance`` for
``depth``).

Allocation (how many groups each layer keeps), from the scorer's weight allocation:

- ``per_modality`` (multiflow): MULTIFLOW's rule on the layers of the chosen units, i.e. per
  modality the magnitude threshold that prunes a fraction s of its weights gives each Linear a
  ratio; a layer's attention loses the ratio of its q/k/v/o weights of its heads, its MLP the
  ratio of its fc1/fc2 weights of its neurons;
- ``per_tower`` (magnitude's ``global``, and mope): heads pooled across the layers of each
  tower by mean score per weight, the ``floor(s * n_heads)`` lowest of each tower go (neurons
  likewise, separately). Pooling per tower, not model-wide: the towers' weight scales differ
  (on a randomly initialised clip-vit-b32 a model-wide magnitude pool took 83% of the vision
  tower and nothing of the text tower). MoPE scores (drops of one metric) pool the same way;
- anything else (wanda's per-row, random's layerwise, ``layerwise=True``): uniform, every layer
  keeps ``(1 - s)`` of its heads and neurons.

Rounding (``round_to``, default 8): a layer's kept MLP width is the multiple of ``round_to``
nearest to its allocation (at least ``round_to``; a layer narrower than ``round_to`` stays
whole). Kept heads are rounded to the nearest multiple of ``round_to / gcd(round_to,
head_dim)`` heads, so the kept attention width ``heads * head_dim`` is a multiple of
``round_to`` (with head_dim 64 and round_to 8 any head count qualifies); never fewer than that
step (so at least one head survives) and never more than the layer has (a layer whose head
count is below the step keeps all its heads). Ties round up. Within a layer the highest-scored
groups are kept (ties by position).

Then :func:`prune_structured` zeroes the removed groups (the *masked* model), slices every
layer (:mod:`.surgery`) and checks that the sliced model's tower outputs equal the masked
model's to float tolerance; with ``depth`` it finally removes whole layers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from ..errors import ConfigError, PatternError
from .allocation import per_modality_counts, prune_count, threshold_counts
from .apply import apply_masks, sparsity_of, sparsity_per_layer, sparsity_per_modality
from .surgery import Block, find_blocks, remove_layers, slice_block

HEAD_ROUNDING_RULE = ("kept heads rounded to the nearest multiple of round_to/gcd(round_to, "
                      "head_dim) (kept attention width a multiple of round_to), at least that "
                      "step, at most the layer's heads; kept MLP width rounded to the nearest "
                      "multiple of round_to, at least round_to")

#: Verification tolerance, masked vs sliced outputs: |a - b| <= ATOL + RTOL * max|a|.
VERIFY_ATOL, VERIFY_RTOL = 1e-5, 1e-4

ATTN_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o")
MLP_ROLES = ("mlp.in", "mlp.out")


# --------------------------------------------------------------------------------------------
# rounding and feasibility
# --------------------------------------------------------------------------------------------
def head_step(head_dim: int, round_to: int) -> int:
    """The head-count multiple that keeps ``heads * head_dim`` a multiple of ``round_to``."""
    return int(round_to) // math.gcd(int(round_to), int(head_dim))


def nearest_allowed(raw: float, total: int, step: int) -> int:
    """The allowed keep count nearest ``raw``: multiples of ``step`` in [step, total], and
    ``total`` itself (ties go to the larger count)."""
    total, step = int(total), max(1, int(step))
    if step > total or raw >= total:
        return total
    k = math.floor(raw / step + 0.5) * step  # round half up
    k = max(step, min(k, total - total % step))
    # ``total`` itself may be nearer than the largest multiple of step below it
    if total % step and abs(total - raw) <= abs(raw - k):
        return total
    return int(k)


def round_heads(raw: float, heads: int, head_dim: int, round_to: int) -> int:
    return nearest_allowed(raw, heads, head_step(head_dim, round_to))


def round_neurons(raw: float, width: int, round_to: int) -> int:
    return nearest_allowed(raw, width, round_to)


def check_structured(vlm, cfg, blocks: Sequence[Block] | None = None) -> list[Block]:
    """Fail early, with one line, on a structured setting this model cannot take.

    - :class:`PatternError` when the target sparsity would remove every head of a layer
      (keeping ``(1 - s) * heads < 1``), or when nothing in scope can be pruned by groups;
    - :class:`ConfigError` when ``depth`` is not below every tower's layer count.
    Returns the blocks in scope.
    """
    from ..prune import select_layers

    if blocks is None:
        blocks = find_blocks(vlm, select_layers(vlm, cfg.scope))
    if not blocks:
        raise PatternError(
            f"pattern structured is not supported for family {vlm.family!r} (it slices CLIP-style "
            "encoder layers: separate q/k/v/out projections and fc1/fc2); supported: clip, siglip, "
            "clip_vision_model, siglip_vision_model; use unstructured or N:M")
    s = float(cfg.sparsity)
    if "heads" in cfg.units and s > 0:
        worst = min(blocks, key=lambda b: b.num_heads)
        if (1.0 - s) * worst.num_heads < 1.0 - 1e-9:
            hi = 1.0 - 1.0 / worst.num_heads
            raise PatternError(
                f"structured sparsity {s:g} would remove every attention head of {worst.prefix} "
                f"({worst.num_heads} heads; at least one per layer must stay): use a sparsity "
                f"<= {hi:.4g}, or --units neurons")
    if cfg.depth:
        per_stack: dict[str, int] = {}
        for b in blocks:
            per_stack[b.stack] = len(vlm.model.get_submodule(b.stack))
        stack, n = min(per_stack.items(), key=lambda kv: kv[1])
        if cfg.depth >= n:
            raise ConfigError(f"--depth {cfg.depth} would remove every layer of {stack} "
                              f"({n} layers); allowed: 0 to {n - 1}")
    return list(blocks)


# --------------------------------------------------------------------------------------------
# group scores and allocation
# --------------------------------------------------------------------------------------------
def _clean(s: torch.Tensor) -> torch.Tensor:
    s = s.detach().float()
    return torch.nan_to_num(s, nan=float("-inf")) if torch.isnan(s).any() else s


def group_scores_from_weights(block: Block, scores: dict[str, torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(heads [H], neurons [F])``: the sum of each group's weight scores."""
    H, hd = block.num_heads, block.head_dim
    lys = block.linears
    heads = torch.zeros(H, dtype=torch.float64)
    for role in ("attn.q", "attn.k", "attn.v"):
        s = _clean(scores[lys[role].name]).double().cpu()
        heads += s.reshape(H, hd, -1).sum(dim=(1, 2))
    so = _clean(scores[lys["attn.o"].name]).double().cpu()
    heads += so.reshape(so.shape[0], H, hd).sum(dim=(0, 2))
    neurons = (_clean(scores[lys["mlp.in"].name]).double().cpu().sum(1)
               + _clean(scores[lys["mlp.out"].name]).double().cpu().sum(0))
    return heads.float(), neurons.float()


def _group_sizes(block: Block) -> tuple[int, int]:
    """Weights per head and per neuron of ``block``."""
    d = block.lin("attn.q").in_features
    return 3 * block.head_dim * d + block.lin("attn.o").out_features * block.head_dim, \
        block.lin("mlp.in").in_features + block.lin("mlp.out").out_features


def _pooled_keep(blocks, scores: dict[str, torch.Tensor], sparsity: float, sizes: dict[str, int],
                 key) -> dict[str, float]:
    """Pool group scores (per weight) over blocks sharing ``key(block)``; drop the lowest
    ``floor(s * n)`` of each pool; return kept counts per block prefix."""
    out: dict[str, float] = {}
    pools: dict[str, list[Block]] = {}
    for b in blocks:
        pools.setdefault(key(b), []).append(b)
    for group in pools.values():
        vals = [scores[b.prefix].double() / max(1, sizes[b.prefix]) for b in group]
        k = prune_count(sparsity, sum(v.numel() for v in vals))
        for b, c in zip(group, threshold_counts(vals, k), strict=True):
            out[b.prefix] = float(scores[b.prefix].numel() - c)
    return out


def keep_counts(blocks: Sequence[Block], head_scores: dict[str, torch.Tensor],
                neuron_scores: dict[str, torch.Tensor], allocation: str, sparsity: float,
                units: Sequence[str], round_to: int) -> dict[str, tuple[int, int]]:
    """``{block prefix: (heads kept, neurons kept)}`` after allocation and rounding."""
    raw_h = {b.prefix: float(b.num_heads) for b in blocks}
    raw_f = {b.prefix: float(b.mlp_width) for b in blocks}
    s = float(sparsity)
    if s > 0:
        if allocation == "per_modality":
            roles = (ATTN_ROLES if "heads" in units else ()) + (MLP_ROLES if "neurons" in units else ())
            lys = [b.linears[r] for b in blocks for r in roles]
            counts = per_modality_counts(lys, s)
            for b in blocks:
                def ratio(rs, b=b):
                    return sum(counts[b.linears[r].name] for r in rs) / sum(
                        b.linears[r].weight.numel() for r in rs)
                if "heads" in units:
                    raw_h[b.prefix] = b.num_heads * (1.0 - ratio(ATTN_ROLES))
                if "neurons" in units:
                    raw_f[b.prefix] = b.mlp_width * (1.0 - ratio(MLP_ROLES))
        elif allocation in ("global", "per_tower"):
            key = (lambda b: "all") if allocation == "global" else (lambda b: b.modality)
            sizes = {b.prefix: _group_sizes(b) for b in blocks}
            if "heads" in units:
                raw_h = _pooled_keep(blocks, head_scores, s, {p: v[0] for p, v in sizes.items()}, key)
            if "neurons" in units:
                raw_f = _pooled_keep(blocks, neuron_scores, s, {p: v[1] for p, v in sizes.items()}, key)
        else:  # uniform
            for b in blocks:
                if "heads" in units:
                    raw_h[b.prefix] = b.num_heads * (1.0 - s)
                if "neurons" in units:
                    raw_f[b.prefix] = b.mlp_width * (1.0 - s)
    out = {}
    for b in blocks:
        h = round_heads(raw_h[b.prefix], b.num_heads, b.head_dim, round_to) if "heads" in units \
            else b.num_heads
        f = round_neurons(raw_f[b.prefix], b.mlp_width, round_to) if "neurons" in units \
            else b.mlp_width
        out[b.prefix] = (max(1, h), f)
    return out


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the ``k`` highest scores (ties: the earlier index wins)."""
    order = torch.argsort(_clean(scores), descending=True, stable=True)
    return order[: int(k)].sort().values


def weight_masks(block: Block, heads_keep: torch.Tensor, neurons_keep: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """Bool masks (True = kept) shaped like each of ``block``'s six weights."""
    from .surgery import head_rows

    out = {}
    rows = torch.zeros(block.lin("attn.q").out_features, dtype=torch.bool)
    rows[head_rows(heads_keep, block.head_dim)] = True
    neur = torch.zeros(block.mlp_width, dtype=torch.bool)
    neur[neurons_keep] = True
    for role, ly in block.linears.items():
        w = ly.weight
        if role in ("attn.q", "attn.k", "attn.v"):
            m = rows[:, None].expand(w.shape)
        elif role == "attn.o":
            m = rows[None, :].expand(w.shape)
        elif role == "mlp.in":
            m = neur[:, None].expand(w.shape)
        else:
            m = neur[None, :].expand(w.shape)
        out[ly.name] = m.to(w.device).contiguous()
    return out


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------
def probe_inputs(vlm) -> dict[str, dict[str, torch.Tensor]]:
    """Small real inputs for every tower (2 pairs of the bundled shapes data)."""
    from ..data import load_calibration

    batch = next(iter(load_calibration("shapes", n=2, batch_size=2, seed=0).batches()))
    return {t: vlm.tower_inputs(t, batch) for t in vlm.towers}


@torch.no_grad()
def tower_outputs(vlm, inputs: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {t: vlm.tower_module(t)(**feed).float() for t, feed in inputs.items()}


def compare_outputs(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs diff per tower; raises RuntimeError beyond the float tolerance (a bug)."""
    diffs = {}
    for t, a in ref.items():
        b = got[t]
        d = float((a - b).abs().max()) if a.numel() else 0.0
        diffs[t] = d
        if not d <= VERIFY_ATOL + VERIFY_RTOL * float(a.abs().max()):
            raise RuntimeError(f"structured slicing changed the {t} tower's outputs: max abs diff "
                               f"{d:.3g} vs the masked model")
    return diffs


# --------------------------------------------------------------------------------------------
# the whole structured prune
# --------------------------------------------------------------------------------------------
def _uniform_allocation(scorer, cfg) -> str:
    if cfg.layerwise:
        return "uniform"
    if scorer.allocation in ("global", "per_tower"):
        return "per_tower"
    return "per_modality" if scorer.allocation == "per_modality" else "uniform"


def prune_structured(vlm, cfg, scorer, calibration=None, progress=None, t0: float | None = None):
    """Structured prune of ``vlm`` in place (see the module doc); returns a ``PruneResult``
    whose masks are shaped like the original (unsliced) weights."""
    from ..progress import NULL
    from ..prune import PruneResult, _calibration_data, select_layers

    progress = progress or NULL
    t0 = time.perf_counter() if t0 is None else t0
    scope_layers = select_layers(vlm, cfg.scope)
    blocks = check_structured(vlm, cfg, find_blocks(vlm, scope_layers))
    target = float(cfg.sparsity)
    units = tuple(cfg.units)
    group_fn = getattr(scorer.fn, "group_importance", None)
    layer_fn = getattr(scorer.fn, "layer_importance", None)
    # A training-based method (upop, efficientvlm) may search the kept groups itself and
    # retrain after slicing: fn.structured_search(vlm, blocks, data, cfg, progress=) ->
    # (head scores, neuron scores, {prefix: (heads, neurons) kept}, details), and
    # fn.after_slice(vlm, dense, data, cfg, progress=) -> details (dense: a copy of the
    # model before the search).
    search_fn = getattr(scorer.fn, "structured_search", None)
    after_fn = getattr(scorer.fn, "after_slice", None)
    allocation = "per_tower" if group_fn else _uniform_allocation(scorer, cfg)
    allocation = getattr(scorer.fn, "structured_allocation", allocation)

    data = None
    calib_seconds = 0.0
    calib_desc = None
    needs_data = (scorer.needs_calibration and target > 0) or (cfg.depth and layer_fn)
    if needs_data:
        from ..data.pairs import as_pair_data

        data = as_pair_data(_calibration_data(calibration))
        calib_desc = f"{getattr(data, 'source', '') or 'pairs'} (n={len(data)})"

    head_s: dict[str, torch.Tensor] = {}
    neur_s: dict[str, torch.Tensor] = {}
    counts = None
    method_details: dict = {}
    dense = None
    if target > 0 and after_fn is not None:
        from ..recover import dense_copy

        dense = dense_copy(vlm)
    if target > 0:
        if search_fn is not None:
            tc = time.perf_counter()
            head_s, neur_s, counts, method_details = search_fn(vlm, blocks, data, cfg,
                                                               progress=progress)
            calib_seconds = time.perf_counter() - tc
        elif group_fn is not None:
            tc = time.perf_counter()
            head_s, neur_s = group_fn(vlm, blocks, data, units=units, round_to=cfg.round_to,
                                      progress=progress)
            calib_seconds = time.perf_counter() - tc
        else:
            lys = [ly for b in blocks for ly in b.linears.values()]
            stats: dict = {}
            if scorer.needs_calibration:
                from ..calibrate import collect_stats

                tc = time.perf_counter()
                stats = collect_stats(vlm, data, lys, progress=progress)
                calib_seconds = time.perf_counter() - tc
            with progress.task("score", total=len(blocks)) as task:
                for b in blocks:
                    sc = {ly.name: scorer.fn(ly, stats.get(ly.name), seed=cfg.seed)
                          for ly in b.linears.values()}
                    head_s[b.prefix], neur_s[b.prefix] = group_scores_from_weights(b, sc)
                    task.advance()
    if counts is None:
        counts = keep_counts(blocks, head_s, neur_s, allocation, target, units, cfg.round_to)

    keep: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    masks: dict[str, torch.Tensor] = {}
    for b in blocks:
        h, f = counts[b.prefix]
        hk = torch.arange(b.num_heads) if h == b.num_heads else top_k(head_s[b.prefix], h)
        fk = torch.arange(b.mlp_width) if f == b.mlp_width else top_k(neur_s[b.prefix], f)
        keep[b.prefix] = (hk, fk)
        masks.update(weight_masks(b, hk, fk))

    shapes_before = {b.prefix: (b.num_heads, b.mlp_width) for b in blocks}
    # Sparsity is measured against the original shapes: stand-ins that outlive the slicing.
    orig_layers = [SimpleNamespace(name=ly.name, modality=ly.modality,
                                   weight=torch.empty(tuple(ly.weight.shape), device="meta"))
                   for ly in scope_layers]
    changed = [b for b in blocks if counts[b.prefix] != shapes_before[b.prefix]]
    verify: dict[str, float] = {}
    if changed:
        probe = probe_inputs(vlm)
        apply_masks(scope_layers, masks)
        ref = tower_outputs(vlm, probe)
        with progress.task("slice", total=len(changed)) as task:
            for b in changed:
                hk, fk = keep[b.prefix]
                slice_block(b, hk if len(hk) != b.num_heads else None,
                            fk if len(fk) != b.mlp_width else None)
                task.advance()
        from .surgery import STRUCTURED_FLAG

        setattr(vlm.model, STRUCTURED_FLAG, True)
        verify = compare_outputs(ref, tower_outputs(vlm, probe))
    if dense is not None:
        method_details["after_slice"] = after_fn(vlm, dense, data, cfg, progress=progress)
        dense = None

    removed: dict[str, list[int]] = {}
    layer_scores: dict[str, list[float]] = {}
    if cfg.depth:
        sliced_blocks = find_blocks(vlm, select_layers(vlm, cfg.scope))
        tc = time.perf_counter()
        imp = layer_fn(vlm, sliced_blocks, data, progress=progress)
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
                              "removed": b.index in removed.get(b.stack, [])}
                   for b in blocks},
        "removed_layers": removed,
        "layer_importance": layer_scores,
        "verify_max_abs_diff": verify,
    }
    return PruneResult(
        masks=masks,
        method=cfg.method,
        pattern="structured",
        target=target,
        achieved=sparsity_of(masks, orig_layers),
        per_modality=sparsity_per_modality(masks, orig_layers),
        per_layer=sparsity_per_layer(masks, orig_layers),
        seconds=time.perf_counter() - t0,
        calibration_seconds=calib_seconds,
        allocation=allocation,
        scope=None if cfg.scope is None else list(cfg.scope),
        calibration=calib_desc,
        details={"structured": structure, **({cfg.method: method_details} if method_details else {})},
    )
