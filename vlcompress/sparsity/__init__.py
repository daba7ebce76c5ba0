"""Sparsity: allocation (how many weights each layer loses), patterns (which ones), apply."""

from __future__ import annotations

from .allocation import (
    ALLOCATIONS,
    allocate,
    global_counts,
    layerwise_counts,
    per_modality_counts,
    per_row_counts,
    prune_count,
    threshold_counts,
)
from .apply import (
    apply_masks,
    select_layers,
    sparsity_of,
    sparsity_per_layer,
    sparsity_per_modality,
    weight_sparsity,
)
from .packed import PackedMasks, pack_bits, unpack_bits
from .patterns import check_nm, nm_mask, per_row_mask, unstructured_mask

__all__ = [
    "ALLOCATIONS", "allocate", "global_counts", "layerwise_counts", "per_modality_counts",
    "per_row_counts", "prune_count", "threshold_counts", "apply_masks", "sparsity_of",
    "sparsity_per_layer", "sparsity_per_modality", "weight_sparsity", "check_nm", "nm_mask",
    "per_row_mask", "unstructured_mask", "select_layers", "PackedMasks", "pack_bits",
    "unpack_bits",
]
