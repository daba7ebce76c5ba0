"""Magnitude pruning: keep the weights of largest absolute value.

The simplest baseline: ``s_ij = |W_ij|``. By default one threshold is taken across every
layer in scope (global allocation); ``PruneConfig(layerwise=True)`` prunes each layer by the
same fraction instead.
"""

from __future__ import annotations

import torch

from . import register_scorer


@register_scorer("magnitude", needs_calibration=False, allocation="global",
                 description="|W|, one global threshold (layer-wise with layerwise=True)")
def magnitude(layer, stats=None, *, seed: int = 0) -> torch.Tensor:
    """``|W|`` as float32, shaped like ``layer.weight``."""
    return layer.weight.detach().float().abs()
