"""Allocation: how many weights each layer loses, given a target sparsity.

All functions return ``{layer.name: n_prune}``. Selection is exact: the threshold is the k-th
smallest value of the concatenated flattened tensors (``torch.kthvalue``) and the weights
tied at the threshold are shared out in layer order, so the counts sum to exactly
``k = floor(s * N)`` over the pool they were computed on.

- :func:`global_counts`: one threshold over the scores of every layer (magnitude's default).
- :func:`layerwise_counts`: every layer loses ``floor(s * n_l)`` (uniform).
- :func:`per_row_counts`: every output row loses ``floor(s * d_in)`` (wanda).
- :func:`per_modality_counts`: MULTIFLOW's rule. For each modality m the magnitude
  threshold t_m pruning a fraction s of m's weights gives layer l its ratio s_l (the fraction
  of its |W| <= t_m); layer l then loses ``floor(s_l * n_l)``. Because ``s_l * n_l`` is the
  integer count of its weights under the threshold (ties at t_m shared out exactly), the
  floor loses nothing: each modality's achieved sparsity is ``floor(s * N_m) / N_m``, i.e. the
  target to within ``1 / N_m`` (well inside the ``n_layers / N_m`` a per-layer floor of a
  fractional ratio would allow).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..models.base import PrunableLayer

ALLOCATIONS = ("global", "layerwise", "per_row", "per_modality")


def prune_count(sparsity: float, n: int) -> int:
    """``floor(sparsity * n)``, robust to float error (0.29 * 100 gives 29, not 28)."""
    return max(0, min(int(n), math.floor(round(float(sparsity) * int(n), 6))))


def threshold_counts(values: Sequence[torch.Tensor], k: int) -> list[int]:
    """How many of the ``k`` smallest entries of all ``values`` (pooled) lie in each tensor.

    Exact: entries below the k-th smallest value all count; entries equal to it are shared
    out in order until the counts sum to ``k``.
    """
    sizes = [v.numel() for v in values]
    total = sum(sizes)
    k = int(k)
    if k <= 0 or total == 0:
        return [0] * len(values)
    if k >= total:
        return sizes
    dev = values[0].device
    flat = torch.cat([v.detach().reshape(-1).float().to(dev) for v in values])
    t = flat.kthvalue(k).values
    del flat
    less = [int((v < t).sum()) for v in values]
    eq = [int((v == t).sum()) for v in values]
    need = k - sum(less)
    counts = []
    for lo, e in zip(less, eq, strict=True):
        take = min(e, need)
        need -= take
        counts.append(lo + take)
    return counts


def global_counts(layers: Sequence[PrunableLayer], scores: Mapping[str, torch.Tensor],
                  sparsity: float) -> dict[str, int]:
    """One threshold over the pooled ``scores`` of all ``layers``: exactly ``floor(s * N)``."""
    vals = [scores[ly.name] for ly in layers]
    k = prune_count(sparsity, sum(v.numel() for v in vals))
    return dict(zip([ly.name for ly in layers], threshold_counts(vals, k), strict=True))


def layerwise_counts(layers: Sequence[PrunableLayer], sparsity: float) -> dict[str, int]:
    """Uniform: every layer loses ``floor(s * n_l)``."""
    return {ly.name: prune_count(sparsity, ly.weight.numel()) for ly in layers}


def per_row_counts(layers: Sequence[PrunableLayer], sparsity: float) -> dict[str, int]:
    """Per output row: ``d_out * floor(s * d_in)`` per layer (what :func:`per_row_mask` prunes)."""
    return {ly.name: ly.weight.shape[0] * prune_count(sparsity, ly.weight.shape[1]) for ly in layers}


def per_modality_counts(layers: Sequence[PrunableLayer], sparsity: float,
                        magnitudes: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """MULTIFLOW's allocation: a magnitude threshold per modality sets each layer's count.

    ``magnitudes`` defaults to ``|W|`` of each layer. Each modality loses exactly
    ``floor(s * N_m)`` weights.
    """
    out: dict[str, int] = {}
    by_mod: dict[str, list[PrunableLayer]] = {}
    for ly in layers:
        by_mod.setdefault(ly.modality, []).append(ly)
    for group in by_mod.values():
        if magnitudes is None:
            vals = [ly.weight.detach().abs() for ly in group]
        else:
            vals = [magnitudes[ly.name] for ly in group]
        k = prune_count(sparsity, sum(v.numel() for v in vals))
        out.update(zip([ly.name for ly in group], threshold_counts(vals, k), strict=True))
    return {ly.name: out[ly.name] for ly in layers}


def allocate(kind: str, layers: Sequence[PrunableLayer], scores: Mapping[str, torch.Tensor],
             sparsity: float) -> dict[str, int]:
    """Dispatch on ``kind`` (one of :data:`ALLOCATIONS`)."""
    if kind == "global":
        return global_counts(layers, scores, sparsity)
    if kind == "layerwise":
        return layerwise_counts(layers, sparsity)
    if kind == "per_row":
        return per_row_counts(layers, sparsity)
    if kind == "per_modality":
        return per_modality_counts(layers, sparsity)
    raise ValueError(f"unknown allocation {kind!r}; allowed: {', '.join(ALLOCATIONS)}")
