"""Wanda, sequential variant: the reference's own loop (locuslab/wanda ``lib/prune.py``
``prune_wanda``: capture layer 0's inputs, then per layer: hooks collect the input norms,
prune, run the layer again so that the next one sees the pruned outputs), on the
block-sequential engine :func:`vlcompress.blockwise.run_blockwise`.

Score and masks are ``wanda``'s (``|W_ij| * ||X_:,j||``, padding excluded; per output row,
or N:M); the difference is the statistics: each block's come from its inputs as they will be
at inference, the earlier blocks already pruned (``inputs="pruned"``, the reference's
choice), where ``wanda`` measures every layer on the dense model in one whole-model pass.
Within a block every layer sees the block's dense inputs, as in the reference. Cost: a
capture, then about two block forwards per block (one with ``inputs="dense"``, which gives
exactly ``wanda``'s masks: ``tests/test_blockwise.py``). An option, not the default:
``--method wanda-seq``.
"""

from __future__ import annotations

import torch

from ..blockwise import CACHE_OPTIONS, cache_kwargs
from ..progress import NULL
from ..scoring.wanda import wanda
from ..sparsity.packed import PackedMasks
from ..sparsity.patterns import nm_mask, per_row_mask
from .registry import Method, Solved, register_method


def wanda_sequential(vlm, layers, data, *, sparsity: float | None = None, n: int = 0,
                     m: int = 0, inputs: str = "pruned", max_cache_bytes: int | None = None,
                     cache_dir=None, device=None, progress=NULL, masks=None) -> Solved:
    """Prune ``layers`` in place, block by block: ``sparsity`` per output row, or ``n``:``m``.

    ``inputs``: ``"pruned"`` (the reference) or ``"dense"`` (each block's statistics from the
    dense model's activations: then the masks are one-shot ``wanda``'s). ``masks``: where each
    layer's mask goes (``masks[name] = keep``; default: a new ``PackedMasks``).
    """
    from ..blockwise import run_blockwise

    if masks is None:
        masks = PackedMasks()  # packed as each block's masks come: one bit per weight
    with progress.task("wanda-seq", total=len(layers)) as task:
        def visit(block, stats):
            for ly in block.layers:
                s = wanda(ly, stats.pop(ly.name))
                keep = nm_mask(s, n, m, ly.name) if m else per_row_mask(s, float(sparsity))
                with torch.no_grad():
                    ly.weight.masked_fill_(~keep.to(ly.weight.device), 0)
                masks[ly.name] = keep.to(block.home)
                task.advance()

        run = run_blockwise(vlm, data, layers, visit, inputs=inputs,
                            max_cache_bytes=max_cache_bytes, cache_dir=cache_dir, device=device)
    details = {"engine": "blockwise", "next_block_inputs": inputs, "captures": run.captures,
               "block_runs": run.block_runs, "spilled_bytes": run.spilled_bytes,
               "device": str(device) if device else None}
    return Solved(masks, details, allocation="nm" if m else "per_row",
                  calibration_seconds=run.forward_seconds)


def solve(ctx, layers) -> Solved:
    """The registry's entry point: :func:`wanda_sequential` on pruned inputs."""
    pat, progress = ctx.cfg.pattern, ctx.progress or NULL
    kw = cache_kwargs(ctx.cfg.method_options)
    if pat.is_nm:
        return wanda_sequential(ctx.vlm, layers, ctx.data, n=pat.n, m=pat.m, progress=progress,
                                **kw)
    return wanda_sequential(ctx.vlm, layers, ctx.data, sparsity=float(ctx.cfg.sparsity),
                            progress=progress, **kw)


register_method(Method(
    name="wanda-seq", kind="solve", allocation="per_row", solve=solve,
    needs=("calibration",), patterns=("unstructured", "nm"), options=CACHE_OPTIONS,
    description="Wanda block by block, each block measured on the pruned earlier blocks' outputs"))
