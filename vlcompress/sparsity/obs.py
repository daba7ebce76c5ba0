"""Optimal-Brain-Surgeon column sweep with weight updates: the core of SparseGPT.

Frantar & Alistarh, ICML 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot". For one linear layer ``y = W x`` with calibration inputs ``X`` (tokens x d_in)
the layer-wise problem is ``min ||W X^T - W' X^T||^2`` over ``W'`` with the chosen mask. Its
Hessian is ``H = X^T X`` (the Gram matrix, :func:`vlcompress.calibrate.collect_stats` with
``gram=True``), the same for every output row, which is what makes the sweep cheap:

1. dampen: ``H += lambda * mean(diag H) * I`` (``percdamp``, 1% by default); columns that never
   saw a nonzero input are dead: their weights are zeroed and ``H_jj`` set to 1;
2. ``U = chol(H^-1)`` (upper): row ``j`` of ``U`` holds the inverse-Hessian entries of the
   columns after ``j`` once columns ``< j`` are eliminated, so a sweep left to right never
   re-inverts anything;
3. sweep the columns in blocks of ``blocksize``. At a block's start (unstructured) or every M
   columns (N:M) choose which weights go by the OBS saliency ``w^2 / U_jj^2``, lowest first;
   then for each column j: ``err = (w_j - q_j) / U_jj`` where ``q_j`` is the column with its
   pruned entries zeroed, and the columns right of j absorb it, ``W[:, k] -= err * U_jk``
   (inside the block at once, lazily for the rest of the layer after the block).

The mask is thus chosen during the sweep, on weights already updated for earlier columns'
pruning, and the surviving weights are updated. Unstructured counts are exact: the layer
loses ``floor(s * numel)`` weights, shared out over the blocks by cumulative column count.
This is our own implementation from the paper's algorithm (its Algorithm 1).
"""

from __future__ import annotations

import torch

from ..errors import PatternError
from .allocation import prune_count


def inverse_hessian_cholesky(gram: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened inverse Hessian, dead-column mask)."""
    h = gram.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = float(percdamp) * torch.diag(h).mean()
    h.diagonal().add_(damp)
    for attempt in range(6):  # a numerically singular H gets more damping, not a crash
        try:
            low = torch.linalg.cholesky(h)
            hinv = torch.cholesky_inverse(low)
            return torch.linalg.cholesky(hinv, upper=True), dead
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            h.diagonal().add_(damp * 10 ** (attempt + 1))
    raise RuntimeError("the layer's Hessian is not positive definite even after damping")


def obs_prune(weight: torch.Tensor, gram: torch.Tensor, *, sparsity: float | None = None,
              n: int = 0, m: int = 0, blocksize: int = 128, percdamp: float = 0.01,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer: ``(new_weight, keep)`` for ``weight`` [d_out, d_in].

    ``gram`` is ``X^T X`` [d_in, d_in] over calibration tokens. Give ``sparsity``
    (unstructured, the layer loses exactly ``floor(sparsity * numel)``) or ``n`` and ``m``
    (N:M: in each row keep ``n`` of every ``m`` consecutive columns). ``blocksize`` is the lazy
    update block (rounded up to a multiple of ``m``); ``percdamp`` the dampening as a fraction
    of the mean Hessian diagonal. Pure: ``weight`` is not modified; the result has the
    weight's dtype, with zeros exactly where ``keep`` is False. Computed in float64.
    """
    if weight.dim() != 2:
        raise ValueError(f"obs_prune needs a 2-D weight, got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if tuple(gram.shape) != (d_in, d_in):
        raise ValueError(f"gram has shape {tuple(gram.shape)}; expected {(d_in, d_in)}")
    nm = m > 0
    if nm:
        if not 0 < n < m:
            raise PatternError(f"pattern {n}:{m} is impossible; need 0 < N < M")
        if d_in % m:
            raise PatternError(f"input width {d_in} is not a multiple of {m}")
        blocksize = max(m, -(-int(blocksize) // m) * m)
    elif sparsity is None:
        raise ValueError("give sparsity (unstructured) or n and m (N:M)")
    blocksize = max(1, int(blocksize))

    w = weight.detach().to(torch.float64).clone()
    u, dead = inverse_hessian_cholesky(gram, percdamp)
    w[:, dead] = 0.0
    pruned = torch.zeros(d_out, d_in, dtype=torch.bool, device=w.device)
    total = 0 if nm else prune_count(float(sparsity), d_out * d_in)
    done = 0  # weights pruned so far (unstructured), for exact per-block counts

    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        cols = i2 - i1
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        err1 = torch.zeros_like(w1)
        p1 = torch.zeros_like(w1, dtype=torch.bool)
        if not nm:
            # this block's share: floor(s * numel * i2 / d_in) minus what earlier blocks took
            k = (total * i2) // d_in - done
            done += k
            if k > 0:
                sal = (w1.square() / d1.square()).reshape(-1)
                idx = sal.topk(k, largest=False, sorted=False).indices
                p1.view(-1)[idx] = True
        for i in range(cols):
            if nm and i % m == 0:
                sal = w1[:, i:i + m].square() / d1[i:i + m].square()
                idx = sal.topk(m - n, dim=1, largest=False, sorted=False).indices
                p1[:, i:i + m].scatter_(1, idx, True)
            col = w1[:, i]
            q = col.masked_fill(p1[:, i], 0.0)
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = p1
        if i2 < d_in:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w[pruned] = 0.0
    keep = ~pruned
    return w.to(weight.dtype), keep


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``||(W - W') X^T||_F^2 = tr((W - W') G (W - W')^T)`` from the Gram matrix ``G = X^T X``."""
    delta = (weight.detach().double() - new_weight.detach().double())
    return float(((delta @ gram.double()) * delta).sum())
