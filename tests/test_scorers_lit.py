"""Scorers from the literature: SNIP, LAMP, ECoFLaP, SparseGPT. Known answers on hand-made
layers, the registry's prepare/solve extensions, and each through prune() on a tiny CLIP."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_random_clip
from torch import nn

from vlcompress.calibrate import LayerStats, collect_stats
from vlcompress.errors import ConfigError
from vlcompress.methods import available_methods, get_method
from vlcompress.models.base import PrunableLayer
from vlcompress.prune import prune
from vlcompress.sparsity import nm_mask, unstructured_mask, weight_sparsity
from vlcompress.sparsity.obs import obs_prune, reconstruction_error

NEW = ["lamp", "snip", "ecoflap", "sparsegpt"]


def make_layer(weight, name="enc.0.fc", modality="vision", block=0) -> PrunableLayer:
    w = torch.as_tensor(weight, dtype=torch.float32)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return PrunableLayer(name, lin, modality, "mlp.in", block)


@pytest.fixture(scope="module")
def calib():
    from vlcompress.data import load_calibration

    return load_calibration("shapes", n=8, batch_size=4)


def test_registry_entries_and_citations():
    assert set(NEW) | {"auto"} <= set(available_methods())
    expect = {"lamp": (False, "global"), "snip": (True, "global"),
              "ecoflap": (True, "per_block"), "sparsegpt": (True, "layerwise")}
    for name, (needs, alloc) in expect.items():
        s = get_method(name)
        assert (s.needs_calibration, s.allocation) == (needs, alloc), name
        assert s.description
    assert get_method("sparsegpt").updates_weights and get_method("auto").updates_weights
    assert not any(get_method(n).updates_weights for n in ("lamp", "snip", "ecoflap", "wanda"))
    assert get_method("snip").prepare and get_method("ecoflap").prepare
    import vlcompress.methods.ecoflap as e
    import vlcompress.methods.snip as sn
    import vlcompress.methods.sparsegpt as sg
    import vlcompress.scoring.lamp as la

    for mod, cite in [(sn, "ICLR 2019"), (la, "ICLR 2021"), (e, "ICLR 2024"), (sg, "ICML 2023")]:
        assert cite in mod.__doc__, mod.__name__


# --- LAMP -------------------------------------------------------------------------------

def test_lamp_known_answer():
    # w^2 sorted ascending: 1, 4, 9, 16 -> suffix sums 30, 29, 25, 16
    got = get_method("lamp").score(make_layer([[1.0, -3.0], [2.0, -4.0]]), None)
    expected = torch.tensor([[1 / 30, 9 / 25], [4 / 29, 16 / 16]])
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32


def test_lamp_global_threshold_spares_small_layers(tiny_random_clip):
    # A layer of tiny weights: global magnitude would empty it; LAMP's top weight scores 1.
    vlm = tiny_random_clip
    ly = vlm.prunable_layers()[0]
    with torch.no_grad():
        ly.weight.mul_(1e-4)
    res = prune(vlm, "lamp", 0.7)
    assert res.allocation == "global"
    assert res.per_layer[ly.name] < 1.0
    assert res.masks[ly.name].any()
    n = sum(x.weight.numel() for x in vlm.prunable_layers())
    assert res.achieved == math.floor(0.7 * n) / n


# --- SNIP -------------------------------------------------------------------------------

def test_snip_is_grad_times_weight(tiny_random_clip, calib):
    from vlcompress.methods.snip import loss_gradients

    vlm = tiny_random_clip
    layers = vlm.prunable_layers()[:2]
    flags = [p.requires_grad for p in vlm.model.parameters()]
    grads, loss = loss_gradients(vlm, layers, calib)
    assert math.isfinite(loss)
    assert [p.requires_grad for p in vlm.model.parameters()] == flags
    assert all(p.grad is None for p in vlm.model.parameters())
    # reference: autograd on the summed per-batch losses
    ly = layers[0]
    ref = torch.zeros_like(ly.weight)
    for b in calib.batches():
        g, = torch.autograd.grad(vlm.loss(vlm.encode(b)), [ly.weight])
        ref += g
    torch.testing.assert_close(grads[ly.name], ref, rtol=1e-4, atol=1e-7)
    s = get_method("snip").score(ly, None, extra=grads[ly.name])
    torch.testing.assert_close(s, (ref * ly.weight.detach()).abs(), rtol=1e-4, atol=1e-9)
    with pytest.raises(ConfigError, match="needs loss gradients"):
        get_method("snip").score(ly, None, extra=None)


# --- ECoFLaP ----------------------------------------------------------------------------

def test_ecoflap_budget_adds_up_and_respects_cap():
    from vlcompress.methods.ecoflap import block_sparsities

    sizes = {"a": 1000, "b": 1000, "c": 2000, "d": 500}
    imp = {"a": 10.0, "b": 1.0, "c": 0.1, "d": 0.0}
    for s in (0.3, 0.5, 0.75, 0.9):
        cap = min(s + 0.1, 0.99)
        bs = block_sparsities(imp, sizes, s, cap)
        n = sum(sizes.values())
        assert sum(bs[k] * sizes[k] for k in sizes) == pytest.approx(math.floor(s * n), abs=1e-6)
        assert all(0.0 <= v <= cap + 1e-12 for v in bs.values())
        assert bs["a"] <= bs["b"] <= bs["c"] <= bs["d"]  # more important blocks keep more
        assert bs["d"] == pytest.approx(cap)  # zero importance: pruned up to the cap
    # uniform fallback and cap == target
    assert block_sparsities({"a": 0.0, "b": 0.0}, {"a": 10, "b": 10}, 0.5) == {"a": 0.5, "b": 0.5}
    bs = block_sparsities({"a": 1.0, "b": 5.0}, {"a": 100, "b": 100}, 0.5, cap=0.5)
    assert bs == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError, match="below the target"):
        block_sparsities(imp, sizes, 0.5, cap=0.4)


def test_ecoflap_row_ratios_stay_within_budget_and_cap():
    from vlcompress.methods.ecoflap import row_ratios

    layers = [make_layer(torch.ones(8, 16), f"l{i}", block=i // 2) for i in range(4)]
    bs = {("vision", 0): 0.42, ("vision", 1): 0.58}
    r = row_ratios(layers, bs, 0.5, 0.6)
    pruned = sum(r[ly.name] * 16 * 8 for ly in layers)
    assert pruned == 0.5 * 4 * 128  # here the rows can realise the budget exactly
    assert all(v <= 0.6 + 1e-9 for v in r.values())
    assert all(abs(v * 16 - round(v * 16)) < 1e-9 for v in r.values())  # whole weights per row
    r = row_ratios(layers, {("vision", 0): 0.37, ("vision", 1): 0.63}, 0.5, 0.6)
    assert all(v <= 0.6 + 1e-9 for v in r.values())  # the cap holds even against a bad input
    assert sum(r[ly.name] * 16 * 8 for ly in layers) <= 0.5 * 4 * 128


def test_ecoflap_importance_is_seeded_and_forward_only(tiny_random_clip, calib):
    from vlcompress.methods.ecoflap import block_importance

    vlm = tiny_random_clip
    layers = vlm.prunable_layers()
    before = {ly.name: ly.weight.detach().clone() for ly in layers}
    flags = [p.requires_grad for p in vlm.model.parameters()]
    a = block_importance(vlm, layers, calib, seed=0, max_batches=1)
    b = block_importance(vlm, layers, calib, seed=0, max_batches=1)
    c = block_importance(vlm, layers, calib, seed=1, max_batches=1)
    assert a == b and a != c
    assert set(a) == {(m, i) for m in ("vision", "text") for i in range(2)}
    assert all(v >= 0 and math.isfinite(v) for v in a.values())
    for ly in layers:  # restored bit for bit, no gradients left behind
        assert torch.equal(ly.weight.detach(), before[ly.name])
    assert all(p.grad is None for p in vlm.model.parameters())
    assert [p.requires_grad for p in vlm.model.parameters()] == flags


def test_ecoflap_prune_uses_block_ratios(tiny_random_clip, calib):
    vlm = tiny_random_clip
    res = prune(vlm, "ecoflap", 0.5, calibration=calib)
    assert res.allocation == "per_block"
    blocks = res.details["blocks"]
    assert len(blocks) == 4 and res.details["cap"] == pytest.approx(0.6)
    n = sum(ly.weight.numel() for ly in vlm.prunable_layers())
    assert 0.5 - 64 / n <= res.achieved <= 0.5  # within one row count of the budget
    assert max(res.per_layer.values()) <= 0.6 + 1e-9
    for ly in vlm.prunable_layers():  # per output row, the layer's ratio
        keep = res.masks[ly.name]
        assert len(set(keep.sum(1).tolist())) == 1
    json.dumps(res.to_dict())


# --- SparseGPT --------------------------------------------------------------------------

def _problem(seed=0, d_out=12, d_in=16, tokens=200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g)
    return w, x


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.7, blocksize=4),
                                dict(n=2, m=4), dict(n=1, m=4, blocksize=6)])
def test_sparsegpt_beats_plain_masking(kw):
    w, x = _problem()
    gram = x.double().t() @ x.double()
    new, keep = obs_prune(w, gram, **kw)
    assert torch.equal(w, _problem()[0])  # pure
    assert (new[~keep] == 0).all()
    if "m" in kw:
        assert (keep.reshape(12, -1, kw["m"]).sum(-1) == kw["n"]).all()
    else:
        assert int((~keep).sum()) == math.floor(kw["sparsity"] * w.numel())
    # the reconstruction error ||W X^T - W' X^T||^2 is below plain masking with the same mask,
    # and below plain magnitude masking of the same pattern and sparsity
    err = float(((w - new) @ x.t()).square().sum())
    assert err == pytest.approx(reconstruction_error(w, new, gram), rel=1e-6)
    assert err < 0.9 * float(((w - w * keep) @ x.t()).square().sum())
    if "m" in kw:
        mag = nm_mask(w.abs(), kw["n"], kw["m"])
    else:
        mag = unstructured_mask(w.abs(), int((~keep).sum()))
    assert err < float(((w - w * mag) @ x.t()).square().sum())


def test_sparsegpt_exact_when_pruned_columns_are_redundant():
    # Column 1 is a copy of column 0 in the inputs: pruning w[:, 1] loses nothing once w[:, 0]
    # absorbs it. Plain masking cannot do that.
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    x[:, 1] = x[:, 0]
    w = torch.tensor([[1.0, 0.5, 2.0]])
    gram = x.double().t() @ x.double()
    new, keep = obs_prune(w, gram, n=2, m=3, percdamp=1e-9)
    assert keep[0, 2] and int(keep[0, :2].sum()) == 1  # one of the twin columns goes
    torch.testing.assert_close(new[0, :2].sum(), torch.tensor(1.5), atol=1e-4, rtol=0)
    assert reconstruction_error(w, new, gram) < 1e-6 * reconstruction_error(w, w * keep, gram)


def test_sparsegpt_score_and_dead_columns():
    from vlcompress.methods.sparsegpt import sparsegpt_score

    layer = make_layer([[1.0, 2.0], [3.0, -4.0]])
    gram = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # column 1 never active
    s = sparsegpt_score(layer, LayerStats(torch.diag(gram), 5, gram))
    assert s[:, 1].eq(0).all() and (s[:, 0] > 0).all()
    with pytest.raises(ConfigError, match="needs input Gram matrices"):
        sparsegpt_score(layer, LayerStats(torch.ones(2), 5))
    new, keep = obs_prune(layer.weight, gram, n=1, m=2)
    assert keep[:, 0].all() and not keep[:, 1].any()


def test_gram_collection_matches_stats_and_excludes_padding(tiny_random_clip, calib):
    from vlcompress.data import PairData

    vlm = tiny_random_clip
    layers = [ly for ly in vlm.prunable_layers() if ly.block == 0]
    st = collect_stats(vlm, calib, layers, gram=True)
    one = collect_stats(vlm, PairData(calib.images, calib.captions, batch_size=1), layers,
                        gram=True)  # batch of 1: no padding at all
    for ly in layers:
        g = st[ly.name].gram
        assert g.dtype == torch.float32 and g.shape == (ly.weight.shape[1],) * 2  # as the reference
        torch.testing.assert_close(torch.diag(g).double(), st[ly.name].sq_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, one[ly.name].gram, rtol=1e-4, atol=1e-5)
    assert collect_stats(vlm, calib, layers[:1])[layers[0].name].gram is None


# --- every new scorer through prune() ---------------------------------------------------

@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", NEW)
def test_new_scorers_through_prune(calib, method, pattern):
    vlm = make_tiny_random_clip()
    layers = vlm.prunable_layers()
    before = {ly.name: ly.weight.detach().clone() for ly in layers}
    params = {ly.name: ly.weight for ly in layers}
    # the scorers' masks as they are (reconstruction after them: tests/test_reconstruct.py)
    res = prune(vlm, method, 0.5 if pattern == "unstructured" else None, pattern, calibration=calib,
                reconstruct=None if method == "sparsegpt" else False)
    assert set(res.masks) == set(params) and res.method == method and res.pattern == pattern
    for ly in layers:
        assert ly.weight is params[ly.name]
        keep = res.masks[ly.name]
        assert (ly.weight[~keep] == 0).all()
        if method != "sparsegpt":  # the others only mask
            assert torch.equal(ly.weight[keep], before[ly.name][keep])
    if pattern == "2:4":
        for keep in res.masks.values():
            assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
        assert res.achieved == 0.5 and res.allocation == "nm"
    elif method == "ecoflap":
        assert 0.49 < res.achieved <= 0.5
    else:
        assert res.achieved == 0.5
    assert weight_sparsity(layers) >= res.achieved - 1e-9
    assert (res.calibration_seconds > 0) == get_method(method).needs_calibration
    if method == "sparsegpt":
        changed = any(not torch.equal(ly.weight[res.masks[ly.name]], before[ly.name][res.masks[ly.name]])
                      for ly in layers)
        assert changed, "sparsegpt updates the surviving weights"
        # one capture, then per tower: 2 block runs (stats, pruned outputs), the last block 1
        assert res.details["captures"] == 1 and res.details["block_runs"] == 6
        assert res.details["error_ratio"] < 1
    json.dumps(res.to_dict())


def test_sparsegpt_skip_incompatible(calib):
    vlm = make_tiny_random_clip(hidden=30, heads=3, mlp=64)
    res = prune(vlm, "sparsegpt", pattern="2:4", calibration=calib, skip_incompatible=True)
    assert set(res.masks) == {ly.name for ly in vlm.prunable_layers() if ly.name.endswith("fc2")}
    assert res.skipped and all(res.per_layer[n] == 0.0 for n in res.skipped)


def test_ecoflap_tensor_estimator_is_the_references_on_a_linear_loss():
    """Loss = sum_l c_l * sum(W_l): (L(W+eps z) - L(W-eps z)) / 2eps = c_l * sum(z) exactly,
    so each tensor's score is sum over batches and draws of |c_l sum z| (the reference's
    ``olmezo-gradient``), with no |W| factor, and a block's score is the sum of its tensors'."""
    from types import SimpleNamespace

    from vlcompress.data.pairs import PairData
    from vlcompress.methods.ecoflap import _noise, _seed, block_importance, tensor_importance

    torch.manual_seed(0)
    lys = [SimpleNamespace(name=f"l{i}", modality="vision", block=i // 2,
                           weight=torch.nn.Parameter(torch.randn(3, 4))) for i in range(4)]
    c = [0.0, 2.0, -1.0, 0.5]

    class Linear:
        def encode(self, batch):
            return {"n": len(batch)}

        def loss(self, enc):
            return sum(ci * ly.weight.sum() for ci, ly in zip(c, lys, strict=True))

    data = PairData(None, [f"s{i}" for i in range(10)], batch_size=4)  # batches of 4, 4, 2
    got = tensor_importance(Linear(), lys, data, eps=1e-2, seed=3, num_noise=2, zo_pairs=6)

    def expect(i):  # batch 0: draws 0, 1 (4 + 4 pairs >= 6): then the budget is spent
        total = 0.0
        for k in range(2):
            z = _noise(torch.Generator().manual_seed(_seed(3, (f"l{i}", k), 0)), lys[i])
            total += abs(c[i] * float(z.sum()))
        return total

    for i in range(4):
        assert got[f"l{i}"] == pytest.approx(expect(i), rel=1e-3, abs=1e-4)
    assert got["l0"] == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():  # no |W| factor: scaling the weights leaves the scores alone
        for ly in lys:
            ly.weight.mul_(10.0)
    again = tensor_importance(Linear(), lys, data, eps=1e-2, seed=3, num_noise=2, zo_pairs=6)
    assert again == pytest.approx(got, rel=1e-3, abs=1e-3)
    blocks = block_importance(Linear(), lys, data, eps=1e-2, seed=3, num_noise=2, zo_pairs=6)
    assert blocks[("vision", 0)] == pytest.approx(again["l0"] + again["l1"], rel=1e-6)


def test_ecoflap_estimator_option_reaches_the_result(tiny_random_clip, calib):
    res = prune(tiny_random_clip, "ecoflap", 0.5, calibration=calib,
                method_options={"estimator": "block-spsa", "num_noise": "2", "zo_pairs": "8"})
    assert res.details["estimator"] == "block-spsa" and res.details["num_noise"] == 2
    assert res.details["method_options"]["zo_pairs"] == 8
