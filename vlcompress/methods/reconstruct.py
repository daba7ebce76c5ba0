"""Reconstruction: after any scorer's mask, update the surviving weights so that each layer
best reproduces its dense outputs on the calibration activations.

A scorer (magnitude, wanda, MULTIFLOW, LAMP, SNIP, ECoFLaP, ...) only chooses which weights go;
the survivors keep their dense values. SparseGPT (Frantar & Alistarh, ICML 2023) shows that
the layer-wise problem ``min ||W X^T - W' X^T||^2`` over the survivors ``W'`` can be solved
cheaply with the OBS column sweep, and its sweep works as well with a mask fixed beforehand:
that is all this module does. It is **not** a second solver: it runs SparseGPT's own
block-sequential driver (:func:`vlcompress.methods.sparsegpt.sparsegpt_prune` with
``fixed=`` the scorer's masks, on the engine :func:`vlcompress.blockwise.run_blockwise`), so
each block is calibrated on the outputs of the already pruned and reconstructed blocks before
it (the reference's ``opt.py`` order), and the OBS sweep (:func:`vlcompress.sparsity.obs.obs_prune`
with ``keep=``) compensates every pruned weight on the columns right of it (the reference's
column loop with the mask fixed, no re-selection). Same dampening (1% of the mean Hessian
diagonal) and lazy-update block (128) as SparseGPT's defaults.

Where we deviate from SparseGPT: the mask comes from the scorer, computed on the dense model
in one pass (the scorers' own references), not chosen inside the sweep on updated weights;
the unstructured allocation (MULTIFLOW's per-modality ratios, LAMP's global ranking ...) is
kept as the scorer made it. The pattern is preserved exactly (zeros where the mask says,
N:M stays N:M).

When it runs (:func:`resolve`): only for methods that score (kinds ``score`` and
``prepare+score``) at an unstructured or N:M pattern. A method that already updates weights
(SparseGPT: implied) or chooses among methods (``auto``, ``wanda-seq``), and the structured
pattern (whole heads and neurons are sliced; the mask-fixed sweep is not defined for the
sliced shapes), refuse an explicit request with one line. By default (``None``) it is on
wherever it applies and calibration data is there: measured on tiny-clip for every scorer at
50% and 2:4 (``benchmarks/quality.py --reconstruct both``; docs/benchmarks.md, "Reconstruction
after any scorer").
"""

from __future__ import annotations

import time

from ..errors import ConfigError
from ..progress import NULL
from ..sparsity.obs import REFINE_ITERS as OBS_REFINE_ITERS
from .registry import SCORING_KINDS
from .registry import reconstruct_refusal as refusal

__all__ = ["SCORING_KINDS", "refusal", "resolve", "reconstruct"]


def resolve(asked: bool | None, method, pattern, has_data: bool) -> tuple[bool, str]:
    """``(on, why)``: whether the run reconstructs, and the reason recorded in the report.
    ``asked`` True must be allowed (:func:`refusal`; :class:`~vlcompress.config.PruneConfig`
    checks it before any work) and have data; None is the default policy."""
    why_not = refusal(method, pattern)
    if asked is False:
        return False, "off (--no-reconstruct)"
    if asked:
        if why_not:
            raise ConfigError(why_not)
        if not has_data:
            raise ConfigError("--reconstruct needs calibration data (it fits the survivors to the "
                              "dense layer outputs on it); pass calibration= (pairs or a source "
                              "such as 'shapes')")
        return True, "on (asked)"
    if why_not:
        if method.name == "sparsegpt":
            return False, "implied by sparsegpt (its sweep updates the weights)"
        return False, ("not applicable: " + ("pattern structured" if method.kind in SCORING_KINDS
                                             else f"method kind {method.kind}"))
    if not has_data:
        return False, "off: no calibration data given to this method"
    return True, "on (default for scoring methods at unstructured and N:M)"


#: conjugate-gradient steps after the sweep (sparsity/obs.py refine_fixed_mask): measured on
#: real MiniLM and tiny-clip (docs/methods.md, "Reconstruction after a scorer"); the objective
#: only falls with each step. The same count as SparseGPT's default ``refine_iters``.
REFINE_ITERS = OBS_REFINE_ITERS


def reconstruct(vlm, layers, masks, data, *, progress=NULL, refine_iters: int | None = None,
                **sweep) -> dict:
    """Update ``layers`` of ``vlm`` in place: each weight keeps ``masks[name]`` (True = kept;
    the weights must still be **dense**, the masks not yet applied) and its survivors are
    fitted to the dense layer's outputs block by block (see the module doc). ``sweep``:
    SparseGPT's ``blocksize``, ``percdamp`` and cache options. Returns the details for the
    report: ``seconds``, ``calibration_seconds`` (block runs), ``error_ratio`` (mean over
    layers of the reconstructed layer's output error over plain masking's, on the same rows:
    below 1 when it helps), ``block_runs``."""
    from .sparsegpt import sparsegpt_prune

    if refine_iters is None:  # read here, so a benchmark can measure another count
        refine_iters = REFINE_ITERS
    t0 = time.perf_counter()
    solved = sparsegpt_prune(vlm, layers, data, fixed=masks, progress=progress,
                             label="reconstruct", refine_iters=refine_iters, **sweep)
    d = solved.details
    return {"seconds": round(time.perf_counter() - t0, 3),
            "calibration_seconds": round(solved.calibration_seconds, 3),
            "error_ratio": d.get("error_ratio"), "block_runs": d.get("block_runs"),
            "blocksize": d.get("blocksize"), "percdamp": d.get("percdamp"),
            "refine_iters": d.get("refine_iters"),
            "solver": "sparsegpt OBS sweep, mask fixed (methods/sparsegpt.py, sparsity/obs.py)"}
