"""Masks from scores: unstructured (exact count), per output row, and N:M.

Every mask is a Bool tensor shaped like the scores with True = kept. Counts are exact:
ties at the threshold are broken by position (earlier flat index is pruned first), so the
number of pruned weights is exactly the one asked for, whatever the scores. All functions are
vectorised (``kthvalue`` / ``topk`` on whole tensors), never a Python loop over weights.
"""

from __future__ import annotations

import torch

from ..errors import PatternError


def _clean(scores: torch.Tensor) -> torch.Tensor:
    """Scores as a float tensor with NaN mapped to -inf (a NaN score is pruned first)."""
    s = scores.detach()
    if not s.is_floating_point():
        s = s.float()
    if torch.isnan(s).any():
        s = torch.nan_to_num(s, nan=float("-inf"))
    return s


def _keep_rows(s: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [R, C]: in each row of ``s`` prune exactly the ``k`` lowest, ties by position."""
    rows, cols = s.shape
    if k <= 0:
        return torch.ones_like(s, dtype=torch.bool)
    if k >= cols:
        return torch.zeros_like(s, dtype=torch.bool)
    t = s.kthvalue(k, dim=1, keepdim=True).values  # the k-th smallest of each row
    less = s < t
    eq = s == t
    need = k - less.sum(dim=1, keepdim=True)  # how many ties each row still must lose (>= 1)
    prune = less | (eq & (eq.cumsum(dim=1) <= need))
    return ~prune


def unstructured_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep all but the ``n_prune`` lowest-scored entries: exactly ``n_prune`` False."""
    n_prune = int(n_prune)
    if n_prune < 0 or n_prune > scores.numel():
        raise ValueError(f"cannot prune {n_prune} of {scores.numel()} weights")
    s = _clean(scores)
    return _keep_rows(s.reshape(1, -1), n_prune).reshape(scores.shape)


def per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each output row (dim 0) loses its ``floor(sparsity * d_in)`` lowest-scored weights."""
    from .allocation import prune_count

    s = _clean(scores)
    s2 = s.reshape(s.shape[0], -1)
    return _keep_rows(s2, prune_count(sparsity, s2.shape[1])).reshape(scores.shape)


def check_nm(d_in: int, n: int, m: int, name: str = "?") -> None:
    """Raise :class:`PatternError` naming the layer when its input width is not a multiple of m."""
    if d_in % m != 0:
        raise PatternError(
            f"layer {name} has input width {d_in}, not a multiple of {m}: pattern {n}:{m} "
            "cannot be applied (pass skip_incompatible / --skip-incompatible to leave it dense)"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int, name: str = "?") -> torch.Tensor:
    """N:M mask: in each output row, in every group of ``m`` consecutive input columns, keep
    the ``n`` highest-scored weights (exactly ``n`` per group).

    Raises :class:`PatternError` naming ``name`` when ``d_in % m != 0``.
    """
    if not 0 < n < m:
        raise PatternError(f"pattern {n}:{m} is impossible; need 0 < N < M")
    if scores.dim() != 2:
        raise PatternError(f"layer {name}: N:M needs a 2-D weight, got shape {tuple(scores.shape)}")
    d_out, d_in = scores.shape
    check_nm(d_in, n, m, name)
    g = _clean(scores).reshape(d_out, d_in // m, m)
    idx = g.topk(n, dim=-1, sorted=False).indices
    keep = torch.zeros(g.shape, dtype=torch.bool, device=g.device)
    keep.scatter_(-1, idx, True)
    return keep.reshape(d_out, d_in)
