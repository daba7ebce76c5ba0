"""Channel permutation for N:M (vlcompress/sparsity/permute.py): the permuted model computes
the same function before masking, the search keeps more importance and moves channels only
inside a head, prune(permute=true) masks valid 2:4 weights that the exported ONNX still
shows, and a permutation asked for a pattern that is not N:M is refused in one line."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import make_tiny_random_clip
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.config import PruneConfig
from vlcompress.data import load_calibration
from vlcompress.errors import ConfigError
from vlcompress.prune import prune
from vlcompress.sparsity.permute import (
    kept_importance,
    objective_scores,
    permutable_pairs,
    permute_for_nm,
    reallocation_order,
    search_permutation,
)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    from vlcompress.data.tokenizer import build_shapes_tokenizer
    from vlcompress.models.towers import BertTextTower

    torch.manual_seed(0)
    tok = build_shapes_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=16)
    return BertTextTower(BertModel(cfg).eval(), tok, None, name="tiny-bert", source="test")


def _outputs(vlm, batch):
    enc = vlm.encode(batch)
    with torch.no_grad():
        out = vlm.model(**enc)
    if hasattr(out, "image_embeds"):
        return [out.image_embeds, out.text_embeds]
    return [out.last_hidden_state]


def _spiky_scores(layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {ly.name: torch.rand(ly.weight.shape, generator=g)
            * torch.rand(ly.weight.shape[1], generator=g).pow(4) for ly in layers}


@pytest.mark.parametrize("make", [make_tiny_random_clip, _tiny_bert], ids=["clip", "bert"])
def test_permuted_model_computes_the_same_function(make):
    vlm = make()
    with torch.no_grad():  # biases that are not zero, so a bias left unpermuted would show
        for ly in vlm.prunable_layers():
            if ly.module.bias is not None:
                ly.module.bias.normal_()
    batch = next(iter(load_calibration("shapes", n=4, batch_size=4)))
    before = _outputs(vlm, batch)
    layers = vlm.prunable_layers()
    w0 = {ly.name: ly.weight.detach().clone() for ly in layers}
    scores = _spiky_scores(layers)
    s0 = {k: v.clone() for k, v in scores.items()}
    det = permute_for_nm(vlm, layers, scores, 2, 4, seconds=2.0)
    # every block's MLP output and attention output are permuted; q/k/v/fc1 are left, and why
    assert det["permuted"] == 2 * 2 * (2 if vlm.family == "clip" else 1)
    assert any("residual" in why for why in det["left"])
    moved = 0
    for ly in layers:
        info = det["layers"].get(ly.name)
        if info is None:
            continue
        assert info["kept_after"] >= info["kept_before"] - 1e-9
        moved += int(not torch.equal(ly.weight, w0[ly.name]))
        # the scores follow the weights: the same columns, in the new order
        order = [int(torch.nonzero((w0[ly.name] == ly.weight[:, k:k + 1]).all(0))[0])
                 for k in range(ly.weight.shape[1])]
        assert torch.equal(scores[ly.name], s0[ly.name][:, order])
    assert moved > 0
    for a, b in zip(before, _outputs(vlm, batch), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_search_gains_and_keeps_channels_inside_their_head():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(16, 64, generator=g) * torch.rand(64, generator=g).pow(4)
    order, info = search_permutation(s, 2, 4, segment=16, deadline=time.perf_counter() + 5)
    assert sorted(order.tolist()) == list(range(64))
    for k, src in enumerate(order.tolist()):
        assert src // 16 == k // 16  # within its head of 16 channels
    assert info["kept_after"] > info["kept_before"]
    # the fractions it reports are of the total score, in the order it returns
    total = float(s.double().sum())
    assert info["kept_after"] == pytest.approx(kept_importance(s[:, order], 2, 4) / total, rel=1e-5)
    assert info["kept_before"] == pytest.approx(kept_importance(s, 2, 4) / total, rel=1e-5)
    assert kept_importance(s[:, order], 2, 4) > kept_importance(s, 2, 4)
    # M > 4: the single-channel swaps; a row of 1s keeps everything whatever the order
    order8, info8 = search_permutation(s, 4, 8, deadline=time.perf_counter() + 2)
    assert sorted(order8.tolist()) == list(range(64)) and info8["gain"] >= 0
    ones = torch.ones(4, 16)
    assert search_permutation(ones, 2, 4)[1]["gain"] == pytest.approx(0.0)


def test_reallocation_deals_one_strong_channel_to_each_group():
    s = torch.arange(1.0, 9.0).repeat(3, 1)  # columns 1..8, strongest last
    order = reallocation_order(s, 4)
    # runs [0,1] [2,3] [4,5] [6,7] (every other reversed) dealt over the 4 slots
    assert order.tolist() == [0, 3, 4, 7, 1, 2, 5, 6]
    assert kept_importance(s[:, order], 2, 4) > kept_importance(s, 2, 4)


def test_prune_with_permutation_exports_valid_24_onnx(tmp_path):
    from vlcompress.exporters import check_nm, export_tower

    vlm = make_tiny_random_clip()
    calib = load_calibration("shapes", n=8, batch_size=8)
    res = prune(vlm, "wanda", None, "2:4", calibration=calib,
                method_options={"permute": "true", "permute_seconds": "2"})
    d = res.details["permute"]
    assert res.achieved == pytest.approx(0.5)
    assert d["permuted"] == 8 and d["budget_seconds"] == 2.0 and d["seconds"] < 10
    assert d["mean_gain"] > 0
    assert res.details["method_options"]["permute"] is True
    for ly in vlm.prunable_layers():  # the stored weights are 2:4 in memory order
        nz = (ly.weight != 0).reshape(ly.weight.shape[0], -1, 4).sum(-1)
        assert (nz <= 2).all(), ly.name
    path = export_tower(vlm, "vision", tmp_path / "vision.onnx", next(iter(calib)))
    assert check_nm(path) == ["visual_projection.weight"]  # the unpruned projection alone


def test_solver_permutes_on_wanda_importance():
    vlm = make_tiny_random_clip()
    res = prune(vlm, "sparsegpt", None, "2:4", calibration=load_calibration("shapes", n=8, batch_size=8),
                method_options={"permute": True, "permute_seconds": 1})
    d = res.details["permute"]
    assert d["permuted"] == 8 and "wanda" in d["importance"]
    assert res.achieved == pytest.approx(0.5)


def test_blip_fused_qkv_is_left_and_said():
    from conftest import make_tiny_random_blip

    vlm = make_tiny_random_blip()
    pairs, left = permutable_pairs(vlm, vlm.prunable_layers())
    assert any("fused qkv" in why for why in left.values())
    roles = {p.consumer.role for p in pairs}
    assert {"mlp.out", "attn.o"} <= roles


def test_permutation_for_a_pattern_that_is_not_nm_is_refused():
    with pytest.raises(ConfigError, match="permute=true .* N:M pattern, not unstructured"):
        PruneConfig(method="wanda", pattern="unstructured", sparsity=0.5,
                    method_options={"permute": "true"})
    with pytest.raises(ConfigError, match="permute_seconds"):
        PruneConfig(method="wanda", pattern="2:4", method_options={"permute_seconds": "-1"})
    # a method without N:M has no such option
    with pytest.raises(ConfigError, match="has no option 'permute'"):
        PruneConfig(method="upop", pattern="structured", sparsity=0.5,
                    method_options={"permute": "true"})
    # without it the result records no options it was not given
    assert PruneConfig(method="wanda", pattern="2:4").method_options == {}


def test_cli_refuses_permutation_without_nm_before_any_work(tmp_path, monkeypatch):
    import vlcompress.data as data_mod
    import vlcompress.models as models_mod

    def boom(*a, **k):
        raise AssertionError("loaded before the refusal")

    monkeypatch.setattr(data_mod, "load_calibration", boom)
    monkeypatch.setattr(models_mod, "load_model", boom)
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["prune-export", "--pattern", "unstructured", "--sparsity",
                                   "0.5", "--method-option", "permute=true", "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "permute" in lines[0] and "N:M" in lines[0], res.output
    assert not out.exists()


def test_search_settings_without_permute_and_structured_permute_are_refused():
    for opts in ({"permute_rounds": "5"}, {"permute": "false", "permute_seconds": "5"},
                 {"permute_objective": "row"}):
        with pytest.raises(ConfigError, match="runs only with permute=true"):
            PruneConfig(method="wanda", pattern="2:4", method_options=opts)
    # a recorded options dict (every value, defaults included) is accepted again
    full = PruneConfig(method="wanda", pattern="2:4", method_options={"permute": "false"})
    assert PruneConfig(method="wanda", pattern="2:4",
                       method_options=full.method_options).method_options == full.method_options
    with pytest.raises(ConfigError, match="permute=true .* N:M pattern, not structured"):
        PruneConfig(method="wanda", pattern="structured", sparsity=0.3,
                    method_options={"permute": "true"})
    for bad in ({"permute": "true", "permute_rounds": "-1"},
                {"permute": "true", "permute_objective": "column"}):
        with pytest.raises(ConfigError, match="allowed"):
            PruneConfig(method="wanda", pattern="2:4", method_options=bad)


def test_row_objective_ignores_row_scales_and_rounds_cap_repeats():
    g = torch.Generator().manual_seed(3)
    base = torch.rand(8, 32, generator=g) * torch.rand(32, generator=g).pow(4)
    row_scale = torch.logspace(-3, 3, 8).unsqueeze(1)  # rows weighted 1e-3 .. 1e3
    # the row objective is blind to a factor per row (N:M ranks inside each row) ...
    o1, i1 = search_permutation(base, 2, 4, objective="row", seed=1)
    o2, i2 = search_permutation(base * row_scale, 2, 4, objective="row", seed=1)
    assert torch.equal(o1, o2) and i1["objective"] == "row"
    # ... the summed score is not: the heaviest rows dominate what it keeps
    share = objective_scores(base, "row")
    o3 = search_permutation(base * row_scale, 2, 4, objective="score", seed=1)[0]
    assert kept_importance(share[:, o1], 2, 4) >= kept_importance(share[:, o3], 2, 4)
    # a rounds cap stops the search there, and the same seed and cap give the same order
    a, ia = search_permutation(base, 2, 4, max_rounds=2, seed=5, patience=100)
    b, ib = search_permutation(base, 2, 4, max_rounds=2, seed=5, patience=100)
    assert ia["rounds"] == 2 and ia["stopped"] == "rounds" and torch.equal(a, b)
    _, ic = search_permutation(base, 2, 4, deadline=time.perf_counter() - 1)
    assert ic["stopped"] == "budget" and ic["rounds"] == 0


def test_prune_records_objective_and_rounds():
    vlm = make_tiny_random_clip()
    res = prune(vlm, "multiflow", None, "2:4",
                calibration=load_calibration("shapes", n=8, batch_size=8), reconstruct=False,
                method_options={"permute": "true", "permute_rounds": "3",
                                "permute_objective": "row", "permute_seconds": "60"})
    d = res.details["permute"]
    assert d["objective"] == "row" and d["max_rounds"] == 3
    assert all(ly["rounds"] <= 3 and ly["objective"] == "row" for ly in d["layers"].values())
    assert sum(d["stopped"].values()) == d["permuted"] == 8


def test_auto_objective_divides_out_multiflows_row_factor_only():
    from vlcompress.methods import get_method

    assert get_method("multiflow").permute_objective("auto") == "row"
    for name in ("wanda", "magnitude", "ria", "sparsegpt"):
        assert get_method(name).permute_objective("auto") == "score", name
    assert get_method("multiflow").permute_objective("score") == "score"  # asked wins
    calib = load_calibration("shapes", n=8, batch_size=8)
    for name, want in (("multiflow", "row"), ("wanda", "score")):
        res = prune(make_tiny_random_clip(), name, None, "2:4", calibration=calib,
                    reconstruct=False, method_options={"permute": "true", "permute_rounds": "2"})
        d = res.details["permute"]
        assert d["objective"] == want and res.details["method_options"]["permute_objective"] == "auto"
