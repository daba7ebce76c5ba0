"""Masks held at one bit per weight.

A pruning mask is one Bool per weight; held as ``torch.bool`` it takes a byte per weight,
which for clip-vit-l14 is 387 MB beside a 1.6 GB model, 17% of the dense forward's peak
memory (``benchmarks/prune_cost.py``). :class:`PackedMasks` is the ``{layer name: Bool
tensor}`` mapping :func:`vlcompress.prune` returns: each mask is packed eight to a byte when
it is stored (so a block-sequential method that stores masks as it goes never holds more than
one unpacked) and unpacked when it is read. Reading gives a new tensor each time, on the
device the mask was stored from; changing it does not change the stored mask (store it again).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A Bool tensor's entries, flattened, eight to a uint8 (little-endian bit order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The Bool tensor of ``shape`` that :func:`pack_bits` packed."""
    n = 1
    for s in shape:
        n *= int(s)
    bits = packed.unsqueeze(1).bitwise_right_shift(_SHIFTS.to(packed.device))
    return bits.bitwise_and_(1).view(-1)[:n].to(torch.bool).view(shape)


class PackedMasks(MutableMapping):
    """``{layer name: Bool tensor}`` (True = kept), stored at one bit per entry.

    Behaves as a dict of Bool tensors (``masks[name]``, ``.items()``, ``set(masks)``,
    ``dict(masks)``); :meth:`counts` gives a mask's kept and total entries without unpacking.
    """

    def __init__(self, masks=None) -> None:
        self._data: dict[str, tuple[torch.Tensor, tuple[int, ...], int]] = {}
        if masks:
            self.update(masks)

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask for {name!r} is a {type(mask).__name__}, not a tensor")
        m = mask.detach()
        if m.dtype != torch.bool:
            m = m != 0
        self._data[name] = (pack_bits(m), tuple(m.shape), int(m.sum()))

    def __getitem__(self, name: str) -> torch.Tensor:
        packed, shape, _ = self._data[name]
        return unpack_bits(packed, shape)

    def __delitem__(self, name: str) -> None:
        del self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"PackedMasks({len(self)} masks, {self.nbytes} bytes)"

    def counts(self, name: str) -> tuple[int, int]:
        """``(kept, total)`` entries of one mask."""
        _, shape, kept = self._data[name]
        total = 1
        for s in shape:
            total *= int(s)
        return kept, total

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed bits."""
        return sum(p.numel() for p, _, _ in self._data.values())
