"""RIA (Zhang, Bai, Lin, Zhao, Hou, Cannistraci, ICLR 2024, "Plug-and-Play: An Efficient
Post-training Pruning Method for Large Language Models"): relative importance and activations.

A weight matters relative to the other weights of its input channel *and* of its output
channel, scaled by how strongly its input channel fires::

    RI_ij = |W_ij| / sum_i' |W_i'j|  +  |W_ij| / sum_j' |W_ij'|
    s_ij  = RI_ij * (a_j) ** a,      a_j = ||X_:,j||_2 over calibration tokens (padding excluded)

with the activation exponent ``a`` (``--method-option a=0.5``, the reference's default;
``0 <= a <= 2``: 0 is pure relative importance, 1 weighs activations like wanda).

Reference: biomedical-cybernetics/Relative-importance-and-activation-pruning, ``lib/prune.py``
(``prune_ria``: ``W_metric = (|W|/sum(|W|, dim=0) + |W|/sum(|W|, dim=1)) *
sqrt(scaler_row) ** a``). Our own code; where it differs:

- ``scaler_row`` there is ``sum_t x_tj^2 / nsamples``; ours is the sum (no division). The
  factor is one constant per layer, so the ranking inside a layer, which is all the reference
  uses, is the same.
- Allocation ``layerwise``: the reference's unstructured default prunes the lowest scores of
  each layer as a whole (``per_outneuron`` off); N:M keeps the ``N`` best of every ``M``.
- The reference walks the layers sequentially on inputs that earlier pruned layers produced;
  like our ``wanda``, this scorer uses one pass of dense activations (``wanda_seq`` shows the
  sequential variant's cost/benefit on our models).
- Channel reallocation. The reference's published 2:4 recipe (``--reallocation --lsa``)
  permutes the input channels before the N:M selection (a heuristic that sorts channels by
  their summed score and deals them out over the M slots of each group, then a
  linear-sum-assignment refinement), and maps the mask back to the original column order,
  so the weight it stores is N:M only in the permuted order (the hardware would need the
  input gathered at run time). Here ``--method-option permute=true`` does the same job for
  every scorer and keeps the model plain: it starts from RIA's heuristic reallocation
  (:func:`vlcompress.sparsity.permute.reallocation_order`), refines it with apex's stripe-group
  search instead of the linear-sum assignment, and absorbs the permutation into the layer that
  produces the input (see :mod:`vlcompress.sparsity.permute`). Without ``permute`` the N:M
  path is the reference's direct one (its default when ``--reallocation`` is not given).
"""

from __future__ import annotations

import torch

from ..calibrate import activation_norm
from ..methods.registry import Option
from . import register_scorer

#: Largest activation exponent accepted.
A_MAX = 2.0


def _check_a(value) -> str | None:
    return None if value <= A_MAX else f"allowed: 0 <= a <= {A_MAX:g}"


@register_scorer("ria", needs_calibration=True, allocation="layerwise",
                 description="relative importance (|W| over its row and column sums) * ||x_j||^a",
                 options=(Option("a", float, 0.5, "activation exponent (reference default 0.5)",
                                 minimum=0.0, validate=_check_a),))
def ria(layer, stats, *, seed: int = 0, options: dict | None = None) -> torch.Tensor:
    """``(|W|/colsum + |W|/rowsum) * a_j ** a`` as float32, shaped like the weight."""
    a_exp = float((options or {}).get("a", 0.5))
    w = layer.weight.detach().float().abs()
    act = activation_norm(layer, stats, "ria")
    tiny = torch.finfo(torch.float32).tiny  # an all-zero row or column scores 0, not NaN
    ri = w / w.sum(dim=0, keepdim=True).clamp_min(tiny) + w / w.sum(dim=1, keepdim=True).clamp_min(tiny)
    return ri * act.pow(a_exp).unsqueeze(0)
