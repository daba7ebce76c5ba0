"""SparseGPT (Frantar & Alistarh, ICML 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot"): prune each layer by an OBS column sweep that updates the
surviving weights to compensate, with the layer Hessian ``H = X^T X`` from calibration inputs.

The sweep itself is :func:`vlcompress.sparsity.obs.obs_prune`. This module drives it over a
model **block-sequentially** as the reference does (IST-DASLab/sparsegpt ``opt.py``), on the
engine :func:`vlcompress.blockwise.run_blockwise`: each tower's block-0 inputs are captured
once, then each encoder block alone runs on the cached inputs with hooks collecting its
layers' Gram matrices (padding tokens excluded), its layers are pruned and compensated, and
the block runs again so that the next block sees **pruned** inputs (the reference's choice:
each layer is calibrated on the inputs it will see at inference). Within a block every layer
sees the block's dense inputs (as in the reference loop). Cost: about two block forwards per
block over the calibration data, linear in depth (it was one whole-model pass per block
index, quadratic); memory: the model, one tower's cached hidden states (two copies), and the
Gram matrices of one block (``d_in^2`` float32 per layer) plus one inverse-Hessian factor.
The OBS math is float32 as in the reference (``fasterprune``); layers of a block that read
the same input (q, k, v: equal Gram matrices) share one factorisation (``details``:
``factorizations``). In a family with cross-attention
(BLIP) the fusion tower is calibrated after the vision tower is fully pruned, so its
cross-attention reads the vision tower as it will be at inference (the old per-block-index
loop gave it the vision tower pruned up to the same block index only).

Unstructured: every layer loses exactly ``floor(s * numel)`` weights (uniform per layer, the
paper's setting), the mask chosen block by block during the sweep by OBS saliency. N:M: in
each row, every M columns, the ``M - N`` lowest saliencies go. This is the strongest method
at 2:4 when the weight updates pay off (they reduce each layer's reconstruction error).

Where we deviate from the reference: by default (``refine_iters``, 50) each layer's sweep is
followed by conjugate-gradient steps toward the exact least-squares weights for the mask the
sweep chose (:func:`~vlcompress.sparsity.obs.refine_fixed_mask`). The mask is SparseGPT's own
and the objective is the paper's (``min ||W X^T - W' X^T||^2`` over the survivors); the
sweep solves it greedily (a pruned weight's error only reaches the columns right of it), the
refinement solves it further and never increases it. The same step follows every scorer's
mask in the reconstruction (:mod:`vlcompress.methods.reconstruct`), so sparsegpt and the
reconstructed scorers are compared on one solver. Measured at 2:4: real all-MiniLM-L6-v2
cosine to dense 0.897 -> 0.928, tiny-clip zero-shot 99.6 -> 99.9 (75% unstructured: 93.9 ->
99.2); it costs ~1.7x the prune time (MiniLM). ``--method-option refine_iters=0`` is the
reference's sweep alone.

Because it changes weights it uses the registry's ``solve`` extension (``updates_weights``);
its ``fn`` is the pure OBS saliency ``w^2 / [H^-1]_jj`` (no updates), for inspection.
"""

from __future__ import annotations

import torch

from ..blockwise import CACHE_OPTIONS, cache_kwargs, release_freed_memory
from ..errors import ConfigError
from ..progress import NULL
from ..sparsity.obs import (
    REFINE_ITERS,
    inverse_hessian_cholesky,
    obs_prune,
    reconstruction_error,
    refine_fixed_mask,
)
from ..sparsity.packed import PackedMasks
from .registry import Method, Option, Solved, register_method

BLOCKSIZE = 128
PERCDAMP = 0.01
ERROR_ROWS = 128  # rows per layer on which details["error_ratio"] is measured

OPTIONS = (
    Option("blocksize", int, BLOCKSIZE, "lazy-update block of the column sweep (the reference's "
           "blocksize)", minimum=1),
    Option("percdamp", float, PERCDAMP, "Hessian dampening, a fraction of its mean diagonal "
           "(the reference's percdamp)", minimum=0.0),
    Option("next_block_inputs", str, "pruned", "what the next block is calibrated on: the "
           "pruned block's outputs (the reference) or the dense ones (one block run instead of "
           "two)", choices=("pruned", "dense")),
    Option("refine_iters", int, REFINE_ITERS, "after each layer's sweep, this many "
           "conjugate-gradient steps toward the exact least-squares weights for the chosen mask "
           "(sparsity/obs.py refine_fixed_mask; 0: the reference's sweep alone)", minimum=0),
    *CACHE_OPTIONS,
)


def _error_rows(d_out: int) -> torch.Tensor | slice:
    """``ERROR_ROWS`` evenly spaced rows (all when fewer): the reconstruction error is a sum
    over rows of ``d G d^T``, so a fixed row sample estimates the updated/plain ratio at
    ``ERROR_ROWS / d_out`` of the cost (the two full products cost as much as the sweep)."""
    if d_out <= ERROR_ROWS:
        return slice(None)
    return torch.linspace(0, d_out - 1, ERROR_ROWS).round().long()


def _gram(layer, stats):
    g = getattr(stats, "gram", None) if stats is not None else None
    if g is None:
        raise ConfigError(f"method 'sparsegpt' needs input Gram matrices for layer {layer.name}: "
                          "it prunes inside prune() (unstructured or N:M), which collects them")
    d_in = layer.weight.shape[1]
    if tuple(g.shape) != (d_in, d_in):
        raise ConfigError(f"Gram matrix for layer {layer.name} has shape {tuple(g.shape)}; "
                          f"the layer's input width is {d_in}")
    return g


def sparsegpt_prune(vlm, layers, data, *, sparsity: float | None = None, n: int = 0, m: int = 0,
                    blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP,
                    next_block_inputs: str = "pruned", max_cache_bytes: int | None = None, cache_dir=None,
                    device=None, progress=NULL, fixed=None, label: str = "sparsegpt",
                    refine_iters: int = REFINE_ITERS, masks=None) -> Solved:
    """Prune ``layers`` of ``vlm`` in place with SparseGPT, block by block on cached inputs.

    ``sparsity`` (unstructured, uniform per layer) or ``n``/``m`` (N:M). ``max_cache_bytes``
    and ``cache_dir``: cached hidden states beyond that many bytes go to disk (see
    :mod:`vlcompress.blockwise`); ``device``: each block is calibrated and pruned there
    (``cuda``), the rest of the model staying where it is. Returns :class:`~vlcompress.scoring.Solved` whose
    ``details`` hold the options, the engine's counts (``captures``, ``block_runs``) and
    ``error_ratio``: the mean over layers of the layer's reconstruction error
    ``||(W - W')X^T||^2`` with the updates, divided by that of plain masking with the same
    mask (below 1 when the compensation helps), both measured on the same ``ERROR_ROWS``
    evenly spaced output rows of each layer. ``next_block_inputs``: ``"pruned"`` (the
    reference) or ``"dense"`` (every block calibrated on the dense model's activations; one
    block run per block instead of two, a different and usually worse result).
    ``calibration_seconds`` is the time spent running blocks (captures included), the rest
    is the OBS sweeps. ``fixed``: ``{layer name: Bool keep mask}`` chosen beforehand (any
    scorer's): the sweep keeps each mask and only updates the survivors (the mask-fixed OBS
    update; :mod:`vlcompress.methods.reconstruct`), ``sparsity``/``n``/``m`` unused.
    ``refine_iters``: conjugate-gradient steps after each layer's sweep toward the exact
    least-squares weights for its mask (:func:`~vlcompress.sparsity.obs.refine_fixed_mask`).
    ``masks``: where each layer's mask goes (``masks[name] = keep``; default: a new
    ``PackedMasks``; the offloaded run keeps only counts, ``methods/offload.MaskCounts``).
    """
    from ..blockwise import run_blockwise

    if masks is None:
        masks = PackedMasks()  # packed as each block's masks come: one bit per weight
    ratios: list[float] = []
    factorizations: list[str] = []

    with progress.task(label, total=len(layers)) as task:
        def visit(block, stats):
            last = None  # (gram, U) of the previous layer: q/k/v read one input, factor once
            for ly in block.layers:
                g = stats.pop(ly.name).gram
                w = ly.weight
                gd = g.to(w.device)
                if last is not None and last[0].shape == gd.shape and torch.equal(last[0], gd):
                    hinv = last[1]
                else:
                    last = None  # free the previous factor before making the next one
                    hinv = inverse_hessian_cholesky(gd, percdamp)
                    factorizations.append(ly.name)
                last = (gd, hinv)
                old = w.detach().clone()
                given = None if fixed is None else fixed[ly.name].to(w.device)
                new, keep = obs_prune(old, None, sparsity=sparsity, n=n, m=m,
                                      blocksize=blocksize, hinv=hinv, keep=given)
                if refine_iters:
                    new = refine_fixed_mask(old, new, keep, gd, iters=refine_iters,
                                            percdamp=percdamp)
                with torch.no_grad():
                    w.copy_(new)
                masks[ly.name] = keep.to(block.home)
                rows = _error_rows(old.shape[0])
                o, k = old[rows], keep[rows]
                plain = reconstruction_error(o, o * k, gd, dtype=torch.float32)
                if plain > 0:
                    ratios.append(reconstruction_error(o, new[rows], gd, dtype=torch.float32)
                                  / plain)
                del g, gd, old, new
                release_freed_memory()
                task.advance()

        run = run_blockwise(vlm, data, layers, visit, gram=True, inputs=next_block_inputs,
                            max_cache_bytes=max_cache_bytes, cache_dir=cache_dir, device=device)
    details = {"blocksize": int(blocksize), "percdamp": float(percdamp), "sequential": True,
               "refine_iters": int(refine_iters),
               "engine": "blockwise", "next_block_inputs": next_block_inputs,
               "factorizations": len(factorizations),
               "captures": run.captures, "block_runs": run.block_runs,
               "cut_runs": run.cut_runs,
               "spilled_bytes": run.spilled_bytes, "device": str(device) if device else None,
               "error_ratio": (sum(ratios) / len(ratios)) if ratios else None}
    return Solved(masks, details, allocation="nm" if m else "layerwise",
                  calibration_seconds=run.forward_seconds)


def solve(ctx, layers) -> Solved:
    """The registry's entry point: :func:`sparsegpt_prune` with the run's method options."""
    pat, progress, o = ctx.cfg.pattern, ctx.progress or NULL, ctx.cfg.method_options
    kw = dict(blocksize=o["blocksize"], percdamp=o["percdamp"],
              next_block_inputs=o["next_block_inputs"], progress=progress,
              refine_iters=o["refine_iters"], **cache_kwargs(o))
    if pat.is_nm:
        return sparsegpt_prune(ctx.vlm, layers, ctx.data, n=pat.n, m=pat.m, **kw)
    return sparsegpt_prune(ctx.vlm, layers, ctx.data, sparsity=float(ctx.cfg.sparsity), **kw)


def sparsegpt_score(layer, stats, *, seed: int = 0, extra=None) -> torch.Tensor:
    """The OBS saliency ``w_ij^2 / [H^-1]_jj`` (dampened ``H = X^T X``), float32; no updates."""
    g = _gram(layer, stats)
    u, dead = inverse_hessian_cholesky(g.to(layer.weight.device), PERCDAMP)
    hinv_diag = u.square().sum(0)  # H^-1 = U^T U, so [H^-1]_jj = sum_i U_ij^2
    w = layer.weight.detach().double()
    s = w.square() / hinv_diag.unsqueeze(0)
    s[:, dead] = 0.0
    return s.float()


register_method(Method(
    name="sparsegpt", kind="solve", allocation="layerwise", solve=solve,
    needs=("calibration",), patterns=("unstructured", "nm"), options=OPTIONS,
    description="OBS column sweep with weight updates (sequential, X^T X Hessian)"))
