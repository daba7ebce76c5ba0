"""Allocation, patterns and apply: exact counts, N:M exactness, targets hit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vlcompress.errors import PatternError
from vlcompress.models.base import PrunableLayer
from vlcompress.sparsity import (
    allocate,
    apply_masks,
    global_counts,
    layerwise_counts,
    nm_mask,
    per_modality_counts,
    per_row_counts,
    per_row_mask,
    prune_count,
    sparsity_of,
    sparsity_per_layer,
    sparsity_per_modality,
    threshold_counts,
    unstructured_mask,
    weight_sparsity,
)

FAST = settings(max_examples=60, deadline=None)


def layer_from(weight, name, modality="vision") -> PrunableLayer:
    w = torch.as_tensor(weight, dtype=torch.float32)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return PrunableLayer(name, lin, modality, "mlp.in", 0)


# small integer-valued scores force many ties
def score_tensors(rows, cols):
    return st.lists(st.integers(-3, 3), min_size=rows * cols, max_size=rows * cols).map(
        lambda v: torch.tensor(v, dtype=torch.float32).reshape(rows, cols))


@st.composite
def nm_case(draw, n, m):
    rows = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 5))
    ties = draw(st.booleans())
    if ties:
        s = draw(score_tensors(rows, groups * m))
    else:
        s = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    return s


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_exact_property(n, m):
    @FAST
    @given(nm_case(n, m))
    def check(s):
        keep = nm_mask(s, n, m, "L")
        assert keep.dtype == torch.bool and keep.shape == s.shape
        g_keep = keep.reshape(s.shape[0], -1, m)
        g_s = s.reshape(s.shape[0], -1, m)
        assert (g_keep.sum(-1) == n).all()  # exactly N kept per group
        kept_min = torch.where(g_keep, g_s, torch.inf).amin(-1)
        pruned_max = torch.where(~g_keep, g_s, -torch.inf).amax(-1)
        assert (kept_min >= pruned_max).all()  # kept ones are the top-N scores

    check()


def test_nm_known_answer():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0]])
    assert nm_mask(s, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]


def test_nm_bad_width_names_layer():
    with pytest.raises(PatternError, match=r"layer enc\.3\.fc1 has input width 30, not a multiple of 4"):
        nm_mask(torch.randn(4, 30), 2, 4, "enc.3.fc1")
    with pytest.raises(PatternError, match="multiple of 8"):
        nm_mask(torch.randn(4, 36), 4, 8, "x")


@FAST
@given(st.integers(1, 6), st.integers(1, 12), st.booleans(), st.data())
def test_unstructured_exact_count_and_lowest(rows, cols, ties, data):
    s = data.draw(score_tensors(rows, cols)) if ties else torch.randn(rows, cols)
    k = data.draw(st.integers(0, rows * cols))
    keep = unstructured_mask(s, k)
    assert int((~keep).sum()) == k
    if 0 < k < s.numel():
        assert s[keep].min() >= s[~keep].max()


def test_unstructured_ties_and_nan():
    keep = unstructured_mask(torch.ones(3, 4), 5)
    assert int((~keep).sum()) == 5
    s = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    assert unstructured_mask(s, 1).tolist() == [True, False, True, True]


@FAST
@given(st.integers(1, 5), st.integers(1, 16), st.sampled_from([0.0, 0.25, 0.5, 0.7, 0.99]), st.data())
def test_per_row_mask_each_row_loses_floor(rows, cols, s, data):
    scores = data.draw(score_tensors(rows, cols))
    keep = per_row_mask(scores, s)
    assert ((~keep).sum(1) == math.floor(s * cols + 1e-9)).all()
    for r in range(rows):
        if 0 < (~keep[r]).sum() < cols:
            assert scores[r][keep[r]].min() >= scores[r][~keep[r]].max()


def test_prune_count_is_robust_to_float_error():
    assert prune_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996
    assert prune_count(0.5, 7) == 3
    assert prune_count(0.0, 10) == 0


def test_threshold_counts_exact_with_ties():
    vals = [torch.zeros(5), torch.zeros(3), torch.ones(4)]
    assert threshold_counts(vals, 6) == [5, 1, 0]
    assert sum(threshold_counts(vals, 9)) == 9
    assert threshold_counts(vals, 0) == [0, 0, 0]
    assert threshold_counts(vals, 12) == [5, 3, 4]


def _layers():
    g = torch.Generator().manual_seed(0)
    return [layer_from(torch.randn(8, 16, generator=g) * (i + 1), f"v{i}", "vision") for i in range(3)] + \
           [layer_from(torch.randn(4, 12, generator=g) * 0.1 * (i + 1), f"t{i}", "text") for i in range(2)]


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.77])
def test_global_counts_hit_target_with_one_threshold(s):
    layers = _layers()
    scores = {ly.name: ly.weight.detach().abs() for ly in layers}
    counts = global_counts(layers, scores, s)
    n = sum(ly.weight.numel() for ly in layers)
    assert sum(counts.values()) == math.floor(s * n)
    masks = {ly.name: unstructured_mask(scores[ly.name], counts[ly.name]) for ly in layers}
    if s > 0:
        kept = torch.cat([scores[k][m] for k, m in masks.items()])
        pruned = torch.cat([scores[k][~m] for k, m in masks.items()])
        assert kept.min() >= pruned.max()  # one threshold across all layers
        # scaled layers are pruned unevenly: that is the point of global allocation
        assert counts["v0"] > counts["v2"]


def test_layerwise_and_per_row_counts():
    layers = _layers()
    assert layerwise_counts(layers, 0.3) == {ly.name: math.floor(0.3 * ly.weight.numel()) for ly in layers}
    assert per_row_counts(layers, 0.3)["v0"] == 8 * math.floor(0.3 * 16)
    assert per_row_counts(layers, 0.3)["t0"] == 4 * math.floor(0.3 * 12)


def test_per_modality_known_answer():
    # vision: |W| values 1..8 over two layers; prune s=0.5 -> threshold 4 -> a: 3 of 4, b: 1 of 4
    a = layer_from([[1.0, -2.0], [3.0, 7.0]], "a", "vision")
    b = layer_from([[4.0, 5.0], [-6.0, 8.0]], "b", "vision")
    # text: one layer, every modality on its own budget
    c = layer_from([[0.1, 0.2], [0.3, 0.4]], "c", "text")
    assert per_modality_counts([a, b, c], 0.5) == {"a": 3, "b": 1, "c": 2}
    assert allocate("per_modality", [a, b, c], {}, 0.5) == {"a": 3, "b": 1, "c": 2}


@FAST
@given(st.lists(st.tuples(st.sampled_from(["vision", "text"]), st.integers(1, 6), st.integers(1, 9)),
                min_size=1, max_size=6),
       st.floats(0.0, 0.95), st.booleans(), st.integers(0, 99))
def test_per_modality_hits_target_property(shapes, s, ties, seed):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (mod, r, c) in enumerate(shapes):
        w = torch.randint(-2, 3, (r, c), generator=g).float() if ties else torch.randn(r, c, generator=g)
        layers.append(layer_from(w, f"l{i}", mod))
    counts = per_modality_counts(layers, s)
    for mod in {ly.modality for ly in layers}:
        grp = [ly for ly in layers if ly.modality == mod]
        n_m = sum(ly.weight.numel() for ly in grp)
        assert sum(counts[ly.name] for ly in grp) == prune_count(s, n_m)
    for ly in layers:
        assert 0 <= counts[ly.name] <= ly.weight.numel()


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_per_modality_on_tiny_clip_hits_target_in_each_modality(tiny_random_clip, s):
    layers = tiny_random_clip.prunable_layers()
    counts = per_modality_counts(layers, s)
    masks = {ly.name: unstructured_mask(ly.weight.detach().abs(), counts[ly.name]) for ly in layers}
    per_mod = sparsity_per_modality(masks, layers)
    assert set(per_mod) == {"vision", "text"}
    for mod, got in per_mod.items():
        n_m = sum(ly.weight.numel() for ly in layers if ly.modality == mod)
        assert got == math.floor(s * n_m) / n_m
        assert abs(got - s) <= 1 / n_m
    # layer ratios follow the modality's magnitude threshold
    for mod in ("vision", "text"):
        grp = [ly for ly in layers if ly.modality == mod]
        t = torch.cat([ly.weight.detach().abs().flatten() for ly in grp]).kthvalue(
            math.floor(s * sum(ly.weight.numel() for ly in grp))).values
        for ly in grp:
            assert counts[ly.name] == int((ly.weight.detach().abs() <= t).sum())


def test_apply_masks_zeroes_in_place(tiny_random_clip):
    vlm = tiny_random_clip
    ly = vlm.prunable_layers()[0]
    w = ly.weight
    ptr = w.data_ptr()
    before = w.detach().clone()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    n = apply_masks(vlm, {ly.name: keep})
    assert n == int((~keep).sum())
    assert w.data_ptr() == ptr and ly.module.weight is w
    assert (w[~keep] == 0).all() and torch.equal(w[keep], before[keep])
    assert not w.requires_grad or w.grad is None
    # a list of layers and a bare module resolve the same names
    apply_masks([ly], {ly.name: keep})
    apply_masks(vlm.model, {ly.name: keep})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(vlm, {ly.name: keep[:, :3]})
    with pytest.raises(KeyError, match="nope"):
        apply_masks([ly], {"nope": keep})


def test_sparsity_helpers():
    a = layer_from(torch.ones(2, 4), "a", "vision")
    b = layer_from(torch.ones(2, 2), "b", "text")
    c = layer_from(torch.ones(1, 4), "c", "text")  # no mask: dense
    masks = {"a": torch.tensor([[True, False, False, False], [True, True, True, True]]),
             "b": torch.tensor([[False, True], [True, True]])}
    assert sparsity_of(masks) == 4 / 12
    assert sparsity_of(masks, [a, b, c]) == 4 / 16
    assert sparsity_per_layer(masks, [a, b, c]) == {"a": 3 / 8, "b": 1 / 4, "c": 0.0}
    assert sparsity_per_modality(masks, [a, b, c]) == {"vision": 3 / 8, "text": 1 / 8}
    apply_masks([a, b, c], masks)
    assert weight_sparsity([a, b, c]) == 4 / 16
