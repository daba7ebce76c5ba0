"""Wanda (Sun et al., ICLR 2024, "A Simple and Effective Pruning Approach for Large Language
Models"): weight magnitude times input activation norm, compared within each output row.

    s_ij = |W_ij| * a_j,   a_j = ||X_:,j||_2 over calibration tokens (padding excluded)

Allocation ``per_row``: every output row of every layer loses ``floor(s * d_in)`` weights.
"""

from __future__ import annotations

import torch

from ..calibrate import activation_norm
from . import register_scorer


@register_scorer("wanda", needs_calibration=True, allocation="per_row",
                 description="|W| * ||x_j||, pruned per output row")
def wanda(layer, stats, *, seed: int = 0) -> torch.Tensor:
    """``|W| * a`` (a broadcast along the input columns) as float32."""
    w = layer.weight.detach().float().abs()
    a = activation_norm(layer, stats, "wanda")
    return w * a.unsqueeze(0)
