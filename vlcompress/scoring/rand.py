"""Random pruning: seeded random scores, the floor every method must beat.

Scores are uniform in [0, 1) from a generator seeded by ``(seed, layer.name)`` through a
stable digest (not Python's salted ``hash``), so the same seed prunes the same weights in
every process.
"""

from __future__ import annotations

import hashlib

import torch

from . import register_scorer


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed derived stably from ``seed`` and a layer name."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@register_scorer("random", needs_calibration=False, allocation="layerwise",
                 description="seeded random scores, uniform per layer (the baseline floor)")
def random_scores(layer, stats=None, *, seed: int = 0) -> torch.Tensor:
    """Uniform [0, 1) float32 scores shaped like ``layer.weight``, fixed by (seed, name)."""
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, layer.name))
    return torch.rand(tuple(layer.weight.shape), generator=gen, dtype=torch.float32)
