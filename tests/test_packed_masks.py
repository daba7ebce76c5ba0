"""PackedMasks: the masks prune() returns, at one bit per weight, read back exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_random_clip

from vlcompress.prune import prune
from vlcompress.sparsity import PackedMasks, pack_bits, sparsity_of, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (8,), (3, 5), (7, 13, 3), (0, 4), (64, 9)])
def test_pack_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    m = torch.rand(shape, generator=g) > 0.5
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (m.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), m)


def test_mapping_behaves_as_a_dict_of_bool_tensors():
    a = torch.tensor([[True, False, True], [False, False, True]])
    pm = PackedMasks({"a": a, "b": torch.ones(17, dtype=torch.bool)})
    assert set(pm) == {"a", "b"} and len(pm) == 2 and "a" in pm and pm.get("c") is None
    assert torch.equal(pm["a"], a) and pm["a"].dtype == torch.bool
    assert pm.counts("a") == (3, 6) and pm.counts("b") == (17, 17)
    assert pm.nbytes == 1 + 3
    assert sparsity_of(pm) == sparsity_of(dict(pm)) == pytest.approx(3 / 23)
    got = pm["a"]
    got[0, 0] = False  # a read is a copy: the stored mask does not change
    assert torch.equal(pm["a"], a)
    pm["a"] = got  # storing again does
    assert pm.counts("a") == (2, 6)
    pm["c"] = torch.tensor([0.0, 2.0])  # a non-Bool tensor is stored as != 0
    assert pm["c"].tolist() == [False, True]
    del pm["b"]
    assert set(pm) == {"a", "c"}
    with pytest.raises(TypeError, match="not a tensor"):
        pm["d"] = [True]


def test_prune_returns_packed_masks_matching_the_weights():
    vlm = make_tiny_random_clip()
    res = prune(vlm, "magnitude", 0.5, "unstructured")
    assert isinstance(res.masks, PackedMasks)
    total = sum(ly.weight.numel() for ly in vlm.prunable_layers() if ly.name in res.masks)
    assert res.masks.nbytes <= total // 8 + len(res.masks)
    for ly in vlm.prunable_layers():
        if ly.name in res.masks:
            assert torch.equal(res.masks[ly.name], ly.weight.detach() != 0), ly.name
