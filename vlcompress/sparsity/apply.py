"""Apply masks in place and measure the sparsity they give.

``masks`` map a layer name (its dotted path in ``VLM.model``) to a Bool tensor shaped like
the weight, True = kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..models.base import VLM, PrunableLayer
from .packed import PackedMasks


def _modules(target, names: Iterable[str]) -> dict[str, nn.Module]:
    """Resolve layer names against a VLM, a list of PrunableLayer or an ``nn.Module``."""
    names = list(names)
    if isinstance(target, VLM):
        known = {ly.name: ly.module for ly in target.prunable_layers()}
        root = target.model
    elif isinstance(target, nn.Module):
        known, root = {}, target
    else:
        known = {ly.name: ly.module for ly in target}
        root = None
    out = {}
    for name in names:
        if name in known:
            out[name] = known[name]
        elif root is not None:
            try:
                out[name] = root.get_submodule(name)
            except AttributeError:
                raise KeyError(f"mask for unknown layer {name!r}") from None
        else:
            raise KeyError(f"mask for unknown layer {name!r}")
    return out


def apply_masks(target: VLM | nn.Module | Iterable[PrunableLayer],
                masks: Mapping[str, torch.Tensor]) -> int:
    """Zero, in place, every weight whose mask entry is False; returns how many were masked."""
    mods = _modules(target, masks)
    zeroed = 0
    with torch.no_grad():
        for name, mask in masks.items():
            w = mods[name].weight
            if tuple(mask.shape) != tuple(w.shape):
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, "
                                 f"weight has {tuple(w.shape)}")
            keep = mask.to(device=w.device, dtype=torch.bool)
            w.masked_fill_(~keep, 0)
            zeroed += int(keep.numel() - keep.sum())
    return zeroed


def _kept_total(masks: Mapping[str, torch.Tensor], name: str) -> tuple[int, int]:
    if isinstance(masks, PackedMasks):  # counted when packed: no unpacking
        return masks.counts(name)
    m = masks[name]
    return int(m.sum()), m.numel()


def _counts(masks: Mapping[str, torch.Tensor], layers: Iterable[PrunableLayer] | None):
    """{name: (pruned, total)}; layers without a mask count as dense."""
    def pruned_total(name: str) -> tuple[int, int]:
        kept, total = _kept_total(masks, name)
        return total - kept, total

    if layers is None:
        return {n: pruned_total(n) for n in masks}
    return {ly.name: (pruned_total(ly.name)[0] if ly.name in masks else 0, ly.weight.numel())
            for ly in layers}


def sparsity_of(masks: Mapping[str, torch.Tensor],
                layers: Iterable[PrunableLayer] | None = None) -> float:
    """Overall fraction pruned: over ``masks``, or over ``layers`` (unmasked = dense)."""
    c = _counts(masks, layers)
    total = sum(t for _, t in c.values())
    return sum(p for p, _ in c.values()) / total if total else 0.0


def sparsity_per_layer(masks: Mapping[str, torch.Tensor],
                       layers: Iterable[PrunableLayer] | None = None) -> dict[str, float]:
    """``{layer name: fraction pruned}``."""
    return {n: (p / t if t else 0.0) for n, (p, t) in _counts(masks, layers).items()}


def sparsity_per_modality(masks: Mapping[str, torch.Tensor],
                          layers: Iterable[PrunableLayer]) -> dict[str, float]:
    """``{modality: fraction pruned}`` over ``layers`` (unmasked = dense)."""
    layers = list(layers)
    c = _counts(masks, layers)
    agg: dict[str, list[int]] = {}
    for ly in layers:
        p, t = c[ly.name]
        a = agg.setdefault(ly.modality, [0, 0])
        a[0] += p
        a[1] += t
    return {m: (p / t if t else 0.0) for m, (p, t) in agg.items()}


def weight_sparsity(layers: Iterable[PrunableLayer]) -> float:
    """Fraction of exactly-zero weights in ``layers``, measured on the weights themselves."""
    zeros = total = 0
    for ly in layers:
        w = ly.weight
        total += w.numel()
        zeros += int(w.numel() - torch.count_nonzero(w))
    return zeros / total if total else 0.0


def select_layers(vlm, scope: tuple[str, ...] | None) -> list:
    """``vlm``'s prunable layers whose modality is in ``scope`` (all when None)."""
    from ..errors import ConfigError

    layers = vlm.prunable_layers()
    if scope is None:
        return list(layers)
    picked = [ly for ly in layers if ly.modality in scope]
    if not picked:
        have = sorted({ly.modality for ly in layers})
        raise ConfigError(f"scope {','.join(scope)} selects no prunable layer of {vlm.name}; "
                          f"its modalities: {', '.join(have)}")
    return picked
