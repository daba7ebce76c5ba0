"""Activation statistics: padding excluded, hooks cleaned up, progress reported."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from vlcompress.calibrate import LayerStats, collect_stats
from vlcompress.data import PairBatch, PairData
from vlcompress.progress import Progress


def test_layer_stats_norm_is_sqrt_float32():
    st = LayerStats(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), tokens=3)
    assert st.norm.dtype == torch.float32
    assert torch.equal(st.norm, torch.tensor([1.0, 2.0, 3.0]))


def test_stats_cover_every_layer_with_right_shapes(tiny_random_clip, calib_small):
    vlm = tiny_random_clip
    stats = collect_stats(vlm, calib_small)
    layers = vlm.prunable_layers()
    assert list(stats) == [ly.name for ly in layers]
    for ly in layers:
        st = stats[ly.name]
        assert st.sq_sum.dtype == torch.float64
        assert st.sq_sum.shape == (ly.weight.shape[1],)
        assert (st.sq_sum > 0).all()
    # vision: 16 images x (1 + (32/8)^2) tokens, no padding
    v = stats["vision_model.encoder.layers.0.self_attn.q_proj"]
    assert v.tokens == 16 * 17
    # text: only real tokens
    t = stats["text_model.encoder.layers.0.mlp.fc1"]
    n_real = sum(int(vlm.encode(b)["attention_mask"].sum()) for b in calib_small.batches())
    assert t.tokens == n_real


def _one_at_a_time(data: PairData) -> PairData:
    return PairData(data.images, data.captions, batch_size=1)


def test_padding_excluded_equals_unpadded_runs(tiny_random_clip, calib_small):
    vlm = tiny_random_clip
    enc = vlm.encode(next(calib_small.batches()))
    assert not enc["attention_mask"].bool().all(), "the batch must contain padding"
    batched = collect_stats(vlm, calib_small)
    single = collect_stats(vlm, _one_at_a_time(calib_small))  # batch of 1: no padding at all
    for name in batched:
        assert batched[name].tokens == single[name].tokens, name
        torch.testing.assert_close(batched[name].sq_sum, single[name].sq_sum, rtol=1e-4, atol=1e-6)


def test_padding_would_change_stats(tiny_random_clip, calib_small, monkeypatch):
    """Control for the test above: counting pad tokens gives different text statistics."""
    vlm = tiny_random_clip
    good = collect_stats(vlm, calib_small)
    monkeypatch.setattr(vlm, "token_mask", lambda modality, encoded: None)
    bad = collect_stats(vlm, calib_small)
    name = "text_model.encoder.layers.1.mlp.fc2"
    assert bad[name].tokens > good[name].tokens
    assert not torch.allclose(bad[name].sq_sum, good[name].sq_sum)
    vname = "vision_model.encoder.layers.1.mlp.fc2"
    torch.testing.assert_close(bad[vname].sq_sum, good[vname].sq_sum)


def test_matches_manual_computation_on_unmasked_tokens(tiny_random_clip, calib_small):
    vlm = tiny_random_clip
    name = "text_model.encoder.layers.1.mlp.fc1"
    layer = next(ly for ly in vlm.prunable_layers() if ly.name == name)
    seen = []
    h = layer.module.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    try:
        masks = []
        with torch.no_grad():
            for b in calib_small.batches():
                enc = vlm.encode(b)
                masks.append(enc["attention_mask"].bool())
                vlm.model(**enc)
    finally:
        h.remove()
    expected = sum(((x[m].double()) ** 2).sum(0) for x, m in zip(seen, masks, strict=True))
    got = collect_stats(vlm, calib_small, [layer])
    assert list(got) == [layer.name]
    torch.testing.assert_close(got[layer.name].sq_sum, expected, rtol=1e-5, atol=1e-6)
    assert got[layer.name].tokens == sum(int(m.sum()) for m in masks)


def test_shared_input_layers_get_the_same_stats(tiny_random_clip, calib_small):
    """q, k and v read the same tensor: identical statistics (the hook computes it once)."""
    stats = collect_stats(tiny_random_clip, calib_small)
    p = "text_model.encoder.layers.0.self_attn."
    assert torch.equal(stats[p + "q_proj"].sq_sum, stats[p + "k_proj"].sq_sum)
    assert torch.equal(stats[p + "q_proj"].sq_sum, stats[p + "v_proj"].sq_sum)
    assert not torch.equal(stats[p + "q_proj"].sq_sum, stats[p + "out_proj"].sq_sum)


def _hook_count(vlm) -> int:
    return sum(len(ly.module._forward_hooks) for ly in vlm.prunable_layers())


def test_hooks_removed_even_on_error(tiny_random_clip, calib_small, monkeypatch):
    vlm = tiny_random_clip
    collect_stats(vlm, calib_small)
    assert _hook_count(vlm) == 0
    calls = {"n": 0}
    real = vlm.encode

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(batch)

    monkeypatch.setattr(vlm, "encode", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        collect_stats(vlm, calib_small)
    assert _hook_count(vlm) == 0


class RecordingProgress(Progress):
    def __init__(self):
        self.tasks = {}

    @contextmanager
    def task(self, description, total=None):
        rec = self.tasks.setdefault(description, {"total": total, "advanced": 0})

        class T:
            def advance(self, n=1):
                rec["advanced"] += n

            def update(self, **kw):
                pass

        yield T()


def test_progress_and_batch_list_input(tiny_random_clip, calib_small):
    prog = RecordingProgress()
    collect_stats(tiny_random_clip, calib_small, progress=prog)
    assert prog.tasks["calibrate"] == {"total": calib_small.num_batches,
                                       "advanced": calib_small.num_batches}
    batches = [PairBatch(calib_small.images[:3], calib_small.captions[:3])]
    st = collect_stats(tiny_random_clip, batches)
    assert st["vision_model.encoder.layers.0.mlp.fc1"].tokens == 3 * 17


def test_masked_sq_sum_filters_only_matching_layouts():
    from vlcompress.calibrate import _masked_sq_sum

    x = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)  # [B=1, L=3, D=4]
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    sq, used = _masked_sq_sum(x, mask)
    assert used and torch.equal(sq, x[0, 0] ** 2 + x[0, 2] ** 2)
    # a cross-attention key/value input reads other tokens (L=5): summed unfiltered
    y = torch.ones(1, 5, 4)
    sq, used = _masked_sq_sum(y, mask)
    assert not used and torch.equal(sq, torch.full((4,), 5.0))
    sq, used = _masked_sq_sum(y, None)
    assert not used and torch.equal(sq, torch.full((4,), 5.0))
