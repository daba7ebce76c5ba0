"""prune(): every method x pattern on the tiny random CLIP, in place, exact; bad inputs."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch
from conftest import make_tiny_random_clip

from vlcompress.errors import ConfigError, PatternError
from vlcompress.progress import Progress
from vlcompress.prune import PruneResult, prune
from vlcompress.sparsity import weight_sparsity

METHODS = ["magnitude", "random", "wanda", "multiflow"]


@pytest.fixture(scope="module")
def calib():
    from vlcompress.data import load_calibration

    return load_calibration("shapes", n=8, batch_size=4)


def dense_copy(vlm):
    return {ly.name: ly.weight.detach().clone() for ly in vlm.prunable_layers()}


def check_applied(vlm, res: PruneResult, before: dict, params: dict):
    for ly in vlm.prunable_layers():
        w = ly.weight
        assert w is params[ly.name], "pruning must be in place"
        keep = res.masks.get(ly.name)
        if keep is None:
            assert torch.equal(w.detach(), before[ly.name])
            continue
        assert keep.dtype == torch.bool and keep.shape == w.shape
        assert (w[~keep] == 0).all()
        assert torch.equal(w[keep], before[ly.name][keep])  # True = kept, untouched


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_pattern(tiny_random_clip, calib, method, pattern):
    vlm = tiny_random_clip
    before = dense_copy(vlm)
    params = {ly.name: ly.weight for ly in vlm.prunable_layers()}
    sparsity = 0.5 if pattern == "unstructured" else None
    # the scorer's masks as they are (reconstruction updates survivors: test_reconstruct.py)
    res = prune(vlm, method, sparsity, pattern, calibration=calib, reconstruct=False)
    check_applied(vlm, res, before, params)
    layers = vlm.prunable_layers()
    assert set(res.masks) == {ly.name for ly in layers}
    assert res.method == method and res.pattern == pattern and res.target == 0.5
    assert res.achieved == 0.5  # every width here is even
    assert weight_sparsity(layers) == 0.5
    assert set(res.per_modality) == {"vision", "text"}
    assert set(res.per_layer) == set(res.masks)
    assert res.skipped == []
    assert res.seconds >= res.calibration_seconds >= 0
    assert (res.calibration_seconds > 0) == (method in ("wanda", "multiflow"))
    if pattern == "2:4":
        for keep in res.masks.values():
            assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
        assert all(v == 0.5 for v in res.per_layer.values())
    elif method != "magnitude":  # random: per layer, wanda: per row, multiflow: per modality
        assert res.per_modality == {"vision": 0.5, "text": 0.5}
    if method in ("random", "wanda") and pattern == "unstructured":
        assert all(v == 0.5 for v in res.per_layer.values())
    if method == "wanda" and pattern == "unstructured":
        for keep in res.masks.values():
            assert (keep.sum(1) == keep.shape[1] // 2).all()
    d = res.to_dict()
    assert "masks" not in d
    json.dumps(d)
    assert d["achieved"] == 0.5 and d["sparsity"] == 0.5 and d["method"] == method


@pytest.mark.parametrize("s", [0.3, 0.61])
def test_multiflow_per_modality_exact(tiny_random_clip, calib, s):
    vlm = tiny_random_clip
    res = prune(vlm, "multiflow", s, calibration=calib)
    for mod in ("vision", "text"):
        n_m = sum(ly.weight.numel() for ly in vlm.prunable_layers() if ly.modality == mod)
        assert res.per_modality[mod] == math.floor(s * n_m) / n_m
    # layers are pruned unevenly (magnitude-driven ratios), not uniformly
    assert len({round(v, 6) for v in res.per_layer.values()}) > 1


def test_magnitude_global_and_layerwise(tiny_random_clip):
    vlm = tiny_random_clip
    before = dense_copy(vlm)
    res = prune(vlm, "magnitude", 0.4)
    kept = torch.cat([before[n][m].abs() for n, m in res.masks.items()])
    pruned = torch.cat([before[n][~m].abs() for n, m in res.masks.items()])
    assert kept.min() >= pruned.max()  # one global threshold
    n = sum(v.numel() for v in before.values())
    assert res.achieved == math.floor(0.4 * n) / n
    assert res.allocation == "global"

    vlm2 = make_tiny_random_clip()
    res2 = prune(vlm2, "magnitude", 0.4, layerwise=True)
    assert res2.allocation == "layerwise"
    for ly in vlm2.prunable_layers():
        n_l = ly.weight.numel()
        assert res2.per_layer[ly.name] == math.floor(0.4 * n_l) / n_l


def test_random_is_deterministic_by_seed(tiny_random_clip):
    a = prune(make_tiny_random_clip(), "random", 0.5, seed=1).masks
    b = prune(make_tiny_random_clip(), "random", 0.5, seed=1).masks
    c = prune(make_tiny_random_clip(), "random", 0.5, seed=2).masks
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sparsity_zero_prunes_nothing(tiny_random_clip, calib):
    vlm = tiny_random_clip
    before = dense_copy(vlm)
    res = prune(vlm, "multiflow", 0.0, calibration=calib)
    assert res.achieved == 0.0 and all(v == 0.0 for v in res.per_layer.values())
    assert all(m.all() for m in res.masks.values())
    for ly in vlm.prunable_layers():
        assert torch.equal(ly.weight.detach(), before[ly.name])


def test_scope_prunes_only_that_modality(tiny_random_clip):
    vlm = tiny_random_clip
    before = dense_copy(vlm)
    res = prune(vlm, "magnitude", 0.5, scope="vision")
    assert res.scope == ["vision"]
    assert all(n.startswith("vision_model.") for n in res.masks)
    assert set(res.per_modality) == {"vision"} and res.achieved == 0.5
    for ly in vlm.prunable_layers():
        if ly.modality == "text":
            assert torch.equal(ly.weight.detach(), before[ly.name])
    with pytest.raises(ConfigError, match="scope audio is not valid"):
        prune(vlm, "magnitude", 0.5, scope=("audio",))
    with pytest.raises(ConfigError, match="selects no prunable layer"):
        prune(vlm, "magnitude", 0.5, scope=("fusion",))


def test_default_calibration_is_shapes_256(tiny_random_clip, calib, monkeypatch):
    import vlcompress.data

    seen = {}

    def fake(source="shapes", n=256, batch_size=32, seed=0):
        seen.update(source=source, n=n, batch_size=batch_size)
        return calib

    monkeypatch.setattr(vlcompress.data, "load_calibration", fake)
    res = prune(tiny_random_clip, "wanda", 0.5)
    assert seen == {"source": "shapes", "n": 256, "batch_size": 32}
    assert res.calibration_seconds > 0
    seen.clear()
    prune(make_tiny_random_clip(), "magnitude", 0.5)
    assert seen == {}  # data-free methods load nothing


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope"), "unknown method 'nope'; allowed: .*magnitude.*multiflow.*random.*wanda"),
    (dict(pattern="3:2"), "impossible N:M"),
    (dict(pattern="banana"), "unknown pattern 'banana'"),
    (dict(sparsity=1.0), "sparsity 1.0 is out of range"),
    (dict(sparsity=-0.1), "out of range"),
    (dict(sparsity=0.3, pattern="2:4"), "sparsity 0.3 conflicts with pattern 2:4"),
])
def test_bad_config_raises_before_touching_weights(tiny_random_clip, kwargs, match):
    vlm = tiny_random_clip
    before = dense_copy(vlm)
    args = dict(method="magnitude", sparsity=0.5, pattern="unstructured") | kwargs
    with pytest.raises(ConfigError, match=match):
        prune(vlm, **args)
    for ly in vlm.prunable_layers():
        assert torch.equal(ly.weight.detach(), before[ly.name])


def test_nm_incompatible_width_raises_or_skips(calib):
    vlm = make_tiny_random_clip(hidden=30, heads=3, mlp=64)  # d_in 30 for q/k/v/o/fc1, 64 for fc2
    before = dense_copy(vlm)
    with pytest.raises(PatternError, match=r"vision_model\.encoder\.layers\.0\.self_attn\.q_proj "
                                           r"has input width 30, not a multiple of 4"):
        prune(vlm, "multiflow", pattern="2:4", calibration=calib)
    for ly in vlm.prunable_layers():
        assert torch.equal(ly.weight.detach(), before[ly.name])
    params = {ly.name: ly.weight for ly in vlm.prunable_layers()}
    res = prune(vlm, "multiflow", pattern="2:4", calibration=calib, skip_incompatible=True,
                reconstruct=False)
    check_applied(vlm, res, before, params)
    layers = vlm.prunable_layers()
    assert res.skipped == [ly.name for ly in layers if ly.weight.shape[1] == 30]
    assert set(res.masks) == {ly.name for ly in layers if ly.name.endswith("fc2")}
    assert all(res.per_layer[n] == 0.0 for n in res.skipped)
    n_fc2 = sum(ly.weight.numel() for ly in layers if ly.name.endswith("fc2"))
    n_all = sum(ly.weight.numel() for ly in layers)
    assert res.achieved == pytest.approx(0.5 * n_fc2 / n_all)
    assert res.to_dict()["skipped"] == res.skipped


def test_progress_tasks(tiny_random_clip, calib):
    tasks = {}

    class Rec(Progress):
        @contextmanager
        def task(self, description, total=None):
            rec = tasks.setdefault(description, [total, 0])

            class T:
                def advance(self, n=1):
                    rec[1] += n

                def update(self, **kw):
                    pass

            yield T()

    prune(tiny_random_clip, "multiflow", pattern="2:4", calibration=calib, progress=Rec())
    n = len(tiny_random_clip.prunable_layers())
    assert tasks == {"calibrate": [calib.num_batches, calib.num_batches], "score": [n, n],
                     "mask": [n, n], "reconstruct": [n, n]}
