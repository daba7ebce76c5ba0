"""upop and efficientvlm: training-based structured pruning gives sliced models at the
requested structured sparsity (tiny random CLIP, a handful of steps)."""

import pytest
from conftest import make_tiny_random_clip

from vlcompress.data import load_calibration
from vlcompress.errors import ConfigError
from vlcompress.prune import prune


@pytest.fixture(autouse=True)
def few_steps(monkeypatch):
    import vlcompress.methods.efficientvlm as E
    import vlcompress.methods.upop as U

    monkeypatch.setattr(U, "SEARCH_STEPS", 4)
    monkeypatch.setattr(U, "RETRAIN_STEPS", 2)
    monkeypatch.setattr(E, "TRAIN_STEPS", 4)
    monkeypatch.setattr(E, "RETRAIN_STEPS", 2)


@pytest.mark.parametrize("method", ["upop", "efficientvlm"])
def test_sliced_at_requested_sparsity(method, tmp_path):
    from vlcompress.models import load_model

    vlm = make_tiny_random_clip()
    calib = load_calibration("shapes", n=16, batch_size=8)
    res = prune(vlm, method, 0.5, "structured", calibration=calib)
    assert res.pattern == "structured"
    assert res.achieved == pytest.approx(0.5, abs=0.07)
    layers = res.details["structured"]["layers"]
    assert all(v["heads"][0] >= 1 for v in layers.values())
    widths = [b.self_attn.num_heads for b in vlm.model.vision_model.encoder.layers] + \
        [b.mlp.fc1.out_features for b in vlm.model.text_model.encoder.layers]
    assert widths != [4, 4, 64, 64]  # physically sliced
    assert res.details[method]["retrain"]["steps"] == 2
    # the sliced model saves and reloads, and still runs
    vlm.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.embed_texts(["a red circle"]).shape[-1] == 16


@pytest.mark.parametrize("method", ["upop", "efficientvlm"])
def test_structured_only(method):
    with pytest.raises(ConfigError, match="structured"):
        prune(make_tiny_random_clip(), method, 0.5, "unstructured",
              calibration=load_calibration("shapes", n=8, batch_size=8))


def test_upop_uses_cosine_ramp_and_global_ranking():
    vlm = make_tiny_random_clip()
    res = prune(vlm, "upop", 0.5, "structured",
                calibration=load_calibration("shapes", n=16, batch_size=8))
    d = res.details["upop"]
    assert d["ratios"][-1] == pytest.approx(0.5) and d["ratios"] == sorted(d["ratios"])
    assert res.allocation == "upop-global"


def test_efficientvlm_learns_lagrange_multipliers():
    vlm = make_tiny_random_clip()
    res = prune(vlm, "efficientvlm", 0.5, "structured",
                calibration=load_calibration("shapes", n=16, batch_size=8))
    fin = res.details["efficientvlm"]["final"]
    assert fin["lambda1"] < 0 and fin["lambda2"] > 0  # ascent on an under-sparse model
    assert set(res.details["efficientvlm"]["kept_fraction_per_modality"]) == {"vision", "text"}
