"""LAMP (Lee, Park, Mo, Ahn & Shin, ICLR 2021, "Layer-adaptive Sparsity for the
Magnitude-based Pruning"): magnitude rescaled within each layer so that one global threshold
gives a sensible per-layer sparsity.

Sort a layer's squared weights ascending, ``w_1^2 <= ... <= w_n^2``; then

    s_u = w_u^2 / sum_{v >= u} w_v^2

(the weight's share of the energy of the weights not smaller than it). The largest weight of
every layer scores 1, so no layer is ever emptied; then one threshold across all layers
(allocation ``global``). Data-free. Within a layer the order is that of ``|W|`` (ties broken
by position), so under N:M it prunes like magnitude. Our own implementation from the paper.
"""

from __future__ import annotations

import torch

from . import register_scorer


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP scores of ``weight`` (float32, same shape), suffix sums in float64."""
    w2 = weight.detach().double().square().reshape(-1)
    srt, idx = torch.sort(w2, stable=True)
    suffix = srt.flip(0).cumsum(0).flip(0)
    s = torch.where(suffix > 0, srt / suffix.clamp_min(torch.finfo(torch.float64).tiny),
                    torch.zeros_like(srt))
    out = torch.empty_like(s)
    out[idx] = s
    return out.reshape(weight.shape).float()


@register_scorer("lamp", needs_calibration=False, allocation="global",
                 description="layer-adaptive magnitude w^2 / sum of larger w^2, global")
def lamp(layer, stats=None, *, seed: int = 0) -> torch.Tensor:
    """LAMP scores of ``layer.weight``."""
    return lamp_scores(layer.weight)
