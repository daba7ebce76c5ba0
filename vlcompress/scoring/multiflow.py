"""MULTIFLOW (Farina, Mancini, Cunegatti, Liu, Iacca, Ricci, CVPR 2024, "MULTIFLOW: Shifting
Towards Task-Agnostic Vision-Language Pruning").

Each layer is seen as a bipartite graph from its input to its output neurons, and a weight
matters by how much information it carries and how important the two neurons it joins are.
With ``A = |W|`` (d_out x d_in) and ``a_j`` the activation norm of input column j::

    I_out(i) = mean_j A_ij a_j          (how much signal output neuron i gathers)
    I_in(j)  = a_j * mean_i A_ij        (how much signal input neuron j emits)
    S_ij     = I_out(i) * A_ij * I_in(j)

Allocation ``per_modality`` (see :func:`vlcompress.sparsity.allocation.per_modality_counts`):
the magnitude threshold that prunes a fraction s of each modality's weights sets each
layer's sparsity; inside a layer the lowest ``S`` go. Gradient-free; one calibration pass.
This is our own implementation from the paper's equations.
"""

from __future__ import annotations

import torch

from ..calibrate import activation_norm
from . import register_scorer


@register_scorer("multiflow", needs_calibration=True, allocation="per_modality",
                 description="information flow I_out*|W|*I_in, per-modality magnitude budget",
                 row_factor=True)  # I_out(i): one factor per output row
def multiflow(layer, stats, *, seed: int = 0) -> torch.Tensor:
    """``S = I_out[:, None] * |W| * I_in[None, :]`` as float32, shaped like the weight."""
    w = layer.weight.detach().float().abs()
    a = activation_norm(layer, stats, "multiflow")
    i_out = (w * a.unsqueeze(0)).mean(dim=1)  # [d_out]
    i_in = a * w.mean(dim=0)  # [d_in]
    return i_out.unsqueeze(1) * w * i_in.unsqueeze(0)
