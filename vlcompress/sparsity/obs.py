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


def inverse_hessian_cholesky(gram: torch.Tensor, percdamp: float, dtype: torch.dtype = torch.float32
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor ``U`` of the dampened inverse Hessian, dead-column mask).

    The reference (``fasterprune``) computes ``U`` with three cubic steps: ``cholesky(H)``,
    ``cholesky_inverse`` (``H^-1``), ``cholesky(H^-1, upper=True)``. We take two, with the
    same result up to float rounding: with ``P`` the order-reversing permutation and
    ``P H P = L L^T`` (one Cholesky), ``H^-1 = (P L^-1 P)^T (P L^-1 P)`` and ``P L^-1 P`` is
    upper triangular with a positive diagonal, so it *is* ``U`` (Cholesky factors are
    unique). ``L^-1`` is LAPACK's triangular inverse (``trtri``, a third of a Cholesky's
    work on a ``d x d`` matrix; through SciPy on the CPU, ``solve_triangular`` elsewhere).
    Measured on one core at ``d = 3072`` (a ViT MLP's second layer; ``benchmarks/obs_parts.py``
    → ``results/obs_parts.json``): 0.39 s against the reference sequence's 0.83 s, entries
    equal to 9e-6 relative (3e-7 at d = 768); ``tests/test_blockwise.py`` checks the sweep's
    masks and errors against the float64 column loop. In ``dtype`` (float32 as the
    reference). A matrix that is not numerically positive definite gets more damping
    (``damp * (1 + 10 + 100 ...)``).
    """
    dead = torch.diag(gram) == 0
    base = float(percdamp) * float(torch.diag(gram).masked_fill(dead, 1.0).to(torch.float64).mean())
    extra = 1.0
    for attempt in range(6):
        h = gram.detach().to(dtype=dtype).flip(0, 1)  # a copy: P H P
        h[dead.flip(0), dead.flip(0)] = 1.0
        h.diagonal().add_(base * extra)
        low, info = torch.linalg.cholesky_ex(h)
        del h
        if int(info) == 0:
            u = _tri_inverse_lower(low)
            if u is not None:
                return u.flip(0, 1).contiguous(), dead
        extra += 10.0 ** (attempt + 1)
    raise RuntimeError("the layer's Hessian is not positive definite even after damping")


def _tri_inverse_lower(low: torch.Tensor) -> torch.Tensor | None:
    """``L^-1`` of a lower-triangular ``L`` (None when singular): LAPACK ``trtri`` through
    SciPy for CPU float32/float64, else ``solve_triangular`` against the identity."""
    if low.device.type == "cpu" and low.dtype in (torch.float32, torch.float64):
        from scipy.linalg import lapack

        fn = lapack.strtri if low.dtype == torch.float32 else lapack.dtrtri
        inv, info = fn(low.numpy(), lower=1, overwrite_c=1)  # SciPy copies to Fortran order
        return torch.from_numpy(inv) if info == 0 else None
    eye = torch.eye(low.shape[0], dtype=low.dtype, device=low.device)
    inv = torch.linalg.solve_triangular(low, eye, upper=False)
    return inv if bool(torch.isfinite(inv).all()) else None


def obs_prune(weight: torch.Tensor, gram: torch.Tensor | None, *, sparsity: float | None = None,
              n: int = 0, m: int = 0, blocksize: int = 128, percdamp: float = 0.01,
              hinv: tuple[torch.Tensor, torch.Tensor] | None = None,
              dtype: torch.dtype = torch.float32, keep: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer: ``(new_weight, keep)`` for ``weight`` [d_out, d_in].

    ``keep`` (Bool, shaped like ``weight``, True = kept): a mask chosen beforehand (by any
    scorer): the sweep does not choose, it only compensates, the reference's column loop with
    the mask fixed (:func:`_sweep_columns`); ``sparsity`` / ``n`` / ``m`` are then ignored and
    the returned mask is ``keep``. This is the mask-fixed update of
    :mod:`vlcompress.methods.reconstruct`.

    ``gram`` is ``X^T X`` [d_in, d_in] over calibration tokens. Give ``sparsity``
    (unstructured, the layer loses exactly ``floor(sparsity * numel)``) or ``n`` and ``m``
    (N:M: in each row keep ``n`` of every ``m`` consecutive columns). ``blocksize`` is the lazy
    update block (rounded up to a multiple of ``m``); ``percdamp`` the dampening as a fraction
    of the mean Hessian diagonal. ``hinv``: ``inverse_hessian_cholesky(gram, percdamp, dtype)``
    already computed (layers reading the same input, q/k/v, share it; ``gram`` may then be
    None). Pure: ``weight`` is not modified; the result has the weight's dtype, with zeros
    exactly where ``keep`` is False. Computed in ``dtype``: float32 as the reference
    (float64 gives the same masks on our tests, twice the time).

    N:M sweeps one group of ``m`` columns at a time instead of one column: with the group's
    pruned set ``S`` of a row chosen (at the group's start, as the reference does), the
    reference's column-by-column errors satisfy ``e_S U_SS = w_S`` (``U_SS`` upper
    triangular), solved by forward substitution over the ``m - n`` pruned positions for all
    rows at once; then one product ``W[:, g:] -= E_g U[g, g:]`` applies them. The same
    arithmetic as the column loop, in other order: masks equal, weights within float rounding
    (``tests/test_blockwise.py`` checks both against the column loop), 2.5x to 8x faster.
    """
    if weight.dim() != 2:
        raise ValueError(f"obs_prune needs a 2-D weight, got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if gram is None and hinv is None:
        raise ValueError("give gram or hinv")
    if gram is not None and tuple(gram.shape) != (d_in, d_in):
        raise ValueError(f"gram has shape {tuple(gram.shape)}; expected {(d_in, d_in)}")
    if keep is not None:
        if tuple(keep.shape) != (d_out, d_in):
            raise ValueError(f"keep has shape {tuple(keep.shape)}; expected {(d_out, d_in)}")
        n = m = 0
        sparsity = 0.0  # unused: the mask is given
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

    u, dead = hinv if hinv is not None else inverse_hessian_cholesky(gram, percdamp, dtype)
    u = u.to(dtype)
    if tuple(u.shape) != (d_in, d_in):
        raise ValueError(f"hinv has shape {tuple(u.shape)}; expected {(d_in, d_in)}")
    w = weight.detach().to(dtype=dtype, copy=True)
    w[:, dead] = 0.0
    pruned = (torch.zeros(d_out, d_in, dtype=torch.bool, device=w.device) if keep is None
              else ~keep.to(device=w.device, dtype=torch.bool))
    total = 0 if nm or keep is not None else prune_count(float(sparsity), d_out * d_in)
    done = 0  # weights pruned so far (unstructured), for exact per-block counts

    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        cols = i2 - i1
        w1 = w[:, i1:i2]  # a view: updated in place
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        err1 = torch.zeros_like(w1)
        p1 = pruned[:, i1:i2]
        if keep is not None:
            _sweep_columns(w1, u1, err1, p1)
        elif nm:
            _sweep_nm(w1, u1, d1, err1, p1, n, m)
        else:
            # this block's share: floor(s * numel * i2 / d_in) minus what earlier blocks took
            k = (total * i2) // d_in - done
            done += k
            if k > 0:
                sal = (w1.square() / d1.square()).reshape(-1)
                idx = sal.topk(k, largest=False, sorted=False).indices
                chosen = torch.zeros(d_out * cols, dtype=torch.bool, device=w.device)
                chosen[idx] = True
                p1.copy_(chosen.view(d_out, cols))
            _sweep_columns(w1, u1, err1, p1)
        if i2 < d_in:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w[pruned] = 0.0
    return w.to(weight.dtype), ~pruned


def _sweep_columns(w1, u1, err1, p1) -> None:
    """The reference's column loop over one block with its mask ``p1`` fixed (unstructured)."""
    for i in range(w1.shape[1]):
        col = w1[:, i]
        err = col.masked_fill(~p1[:, i], 0.0) / u1[i, i]  # (w - q) / U_ii
        w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
        err1[:, i] = err


def _sweep_nm(w1, u1, d1, err1, p1, n: int, m: int) -> None:
    """One block, N:M: per group of ``m`` columns, choose, solve ``e_S U_SS = w_S``, update."""
    k = m - n
    for g0 in range(0, w1.shape[1], m):
        g1 = g0 + m
        wg = w1[:, g0:g1]
        sal = wg.square() / d1[g0:g1].square()
        idx = sal.topk(k, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
        p1[:, g0:g1].scatter_(1, idx, True)
        ws = wg.gather(1, idx)
        uss = u1[g0:g1, g0:g1][idx.unsqueeze(2), idx.unsqueeze(1)]  # [d_out, k, k]
        es = []
        for a in range(k):
            num = ws[:, a]
            for b in range(a):
                num = num - es[b] * uss[:, b, a]
            es.append(num / uss[:, a, a])
        e = err1[:, g0:g1]
        e.scatter_(1, idx, torch.stack(es, 1))
        w1[:, g0:] -= e @ u1[g0:g1, g0:]


#: Default conjugate-gradient steps of :func:`refine_fixed_mask` after a sweep, for SparseGPT
#: and for the reconstruction after any scorer. Measured (2:4): real MiniLM sparsegpt cosine
#: 0.897 -> 0.928, tiny-clip sparsegpt zero-shot 99.6 -> 99.9 (75%: 93.9 -> 99.2), wanda +
#: reconstruction 0.863 -> 0.916 on MiniLM; ~1.7x sparsegpt's prune time on MiniLM.
REFINE_ITERS = 50


def refine_fixed_mask(weight: torch.Tensor, start: torch.Tensor, keep: torch.Tensor,
                      gram: torch.Tensor, *, iters: int = REFINE_ITERS, percdamp: float = 0.01,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The mask-fixed least-squares solution ``min ||(W - W') X^T||^2`` over ``W'`` zero where
    ``keep`` is False, approached from ``start`` (the sweep's result) by ``iters`` steps of
    Jacobi-preconditioned conjugate gradients, every row at once (each row is its own problem
    on its kept columns, with the same dampened Hessian ``H = X^T X + lambda I`` as the sweep).

    Why: with the mask fixed, the OBS sweep is greedy (a pruned weight's error is absorbed by
    the columns to its right only, and kept columns to the left are frozen); on a synthetic
    layer with correlated inputs (``tests/test_reconstruct.py``) the sweep leaves 0.56 of plain
    masking's output error where the exact solution leaves 0.003. The exact per-row solve costs
    ``d_out`` factorizations of ``d_in/2``-wide systems; CG costs one ``[d_out, d_in] x
    [d_in, d_in]`` product per step and never gets worse than its start (each step lowers the
    objective). Zeros stay exactly where ``keep`` is False."""
    m = keep.to(device=start.device, dtype=dtype)
    h = gram.to(device=start.device, dtype=dtype).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(float(percdamp) * float(torch.diag(h).mean()))
    w = weight.detach().to(device=start.device, dtype=dtype)
    x = start.detach().to(dtype=dtype, copy=True) * m
    x[:, dead] = 0.0
    pre = (1.0 / torch.diag(h)).unsqueeze(0) * m  # Jacobi, on the kept columns only
    r = ((w - x) @ h) * m  # minus the gradient, projected on the kept columns
    z = r * pre
    p = z.clone()
    rz = (r * z).sum(1)
    for _ in range(int(iters)):
        ap = (p @ h) * m
        den = (p * ap).sum(1)
        alpha = torch.where(den > 0, rz / den.clamp_min(1e-30), torch.zeros_like(den))
        x.add_(alpha.unsqueeze(1) * p)
        r.sub_(alpha.unsqueeze(1) * ap)
        z = r * pre
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta.unsqueeze(1) * p
        rz = rz_new
    x[keep.to(x.device) == 0] = 0.0
    return x.to(start.dtype)


def obs_prune_columns(weight: torch.Tensor, gram: torch.Tensor, *, sparsity: float | None = None,
                      n: int = 0, m: int = 0, blocksize: int = 128, percdamp: float = 0.01,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The yardstick: the reference's ``fasterprune`` loop, one column at a time, in float64
    (what :func:`obs_prune` was before the float32 group sweep). For tests and
    ``benchmarks/obs_sweep.py``; ``blocksize`` must be a multiple of ``m``."""
    w = weight.detach().double().clone()
    d_out, d_in = w.shape
    h = gram.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(percdamp * torch.diag(h).mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w[:, dead] = 0.0
    pruned = torch.zeros(d_out, d_in, dtype=torch.bool)
    total, done = (0 if m else prune_count(sparsity, d_out * d_in)), 0
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        err1, p1 = torch.zeros_like(w1), torch.zeros_like(w1, dtype=torch.bool)
        if not m:
            k = (total * i2) // d_in - done
            done += k
            p1.view(-1)[(w1.square() / d1.square()).reshape(-1).topk(k, largest=False).indices] = True
        for i in range(i2 - i1):
            if m and i % m == 0:
                sal = w1[:, i:i + m].square() / d1[i:i + m].square()
                p1[:, i:i + m].scatter_(1, sal.topk(m - n, dim=1, largest=False).indices, True)
            q = w1[:, i].masked_fill(p1[:, i], 0.0)
            err = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = p1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w[pruned] = 0.0
    return w.to(weight.dtype), ~pruned


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor,
                         dtype: torch.dtype = torch.float64) -> float:
    """``||(W - W') X^T||_F^2 = tr((W - W') G (W - W')^T)`` from the Gram matrix ``G = X^T X``."""
    delta = (weight.detach().to(dtype) - new_weight.detach().to(dtype))
    return float(((delta @ gram.to(dtype)) * delta).sum())
