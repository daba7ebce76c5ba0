"""--method auto: candidates tried from the dense weights, the most faithful one kept."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_random_clip

from vlcompress.config import PruneConfig
from vlcompress.methods.auto import auto_select, fidelity_to_dense, split_heldout
from vlcompress.prune import prune


@pytest.fixture(scope="module")
def calib():
    from vlcompress.data import load_calibration

    return load_calibration("shapes", n=8, batch_size=4)


def test_split_heldout(calib):
    fit, held = split_heldout(calib)
    assert (len(fit), len(held)) == (6, 2)
    assert fit.captions + held.captions == calib.captions


def test_fidelity_of_identical_embeddings_is_one():
    e = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    f = fidelity_to_dense((e, t), (e, t))
    assert f["score"] == pytest.approx(1.0)
    g = fidelity_to_dense((e, t), (-e, t))
    assert g["image_cosine"] == pytest.approx(-1.0) and g["score"] < f["score"]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_auto_picks_the_most_faithful_candidate(calib, pattern):
    vlm = make_tiny_random_clip()
    res = prune(vlm, "auto", 0.5 if pattern == "unstructured" else None, pattern,
                calibration=calib)
    d = res.details
    scores = {r["method"]: r["score"] for r in d["candidates"]}
    assert set(scores) == {"magnitude", "lamp", "wanda", "multiflow", "snip", "ecoflap",
                           "sparsegpt"}
    assert d["winner"] == max(scores, key=scores.get)
    assert d["margin"] == pytest.approx(scores[d["winner"]] - scores[d["runner_up"]], abs=1e-5)
    assert d["margin"] >= 0 and d["heldout_pairs"] == 2
    assert res.method == "auto" and res.allocation.startswith("auto:")
    assert res.achieved == pytest.approx(0.5, abs=0.01)

    # the weights kept are exactly those the winner gives from the dense model on the fit pairs
    ref = make_tiny_random_clip()
    fit, _ = split_heldout(calib)
    prune(ref, d["winner"], 0.5 if pattern == "unstructured" else None, pattern, calibration=fit)
    for a, b in zip(vlm.prunable_layers(), ref.prunable_layers(), strict=True):
        assert torch.equal(a.weight, b.weight), a.name
        assert torch.equal(res.masks[a.name], a.weight != 0) or (a.weight[~res.masks[a.name]] == 0).all()
    assert json.loads(json.dumps(res.to_dict()))["details"]["winner"] == d["winner"]


def test_auto_restores_dense_weights_between_candidates(calib):
    vlm = make_tiny_random_clip()
    dense = {ly.name: ly.weight.detach().clone() for ly in vlm.prunable_layers()}
    seen = []
    from vlcompress.methods import Context
    from vlcompress.prune import prune as real

    def spy(v, method, *a, **k):
        seen.append(all(torch.equal(ly.weight, dense[ly.name]) for ly in v.prunable_layers()))
        return real(v, method, *a, **k)

    cfg = PruneConfig(method="auto", sparsity=0.5, pattern="unstructured")
    ctx = Context(vlm=vlm, cfg=cfg, data=calib, prune=spy)
    solved = auto_select(ctx, vlm.prunable_layers(), candidates=("magnitude", "sparsegpt", "wanda"))
    assert seen == [True, True, True]
    assert solved.details["winner"] in ("magnitude", "sparsegpt", "wanda")


def test_auto_is_declared_a_solver_without_a_weight_score():
    from vlcompress.methods import get_method

    m = get_method("auto")
    assert m.kind == "solve" and m.score is None and "structured" not in m.patterns


def test_auto_shares_one_calibration_capture(calib, monkeypatch):
    """wanda and multiflow inside auto score from one dense capture of the fit pairs (one
    collect_stats call), and the winner's masks are those of the method run alone."""
    import vlcompress.calibrate as cal

    calls = []
    real = cal.collect_stats

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cal, "collect_stats", counting)
    vlm = make_tiny_random_clip()
    ref = make_tiny_random_clip()
    cfg = PruneConfig(method="auto", sparsity=0.5, pattern="2:4")
    from vlcompress.methods.registry import Context

    solved = auto_select(Context(vlm=vlm, cfg=cfg, data=calib, prune=prune),
                         vlm.prunable_layers(), candidates=("wanda", "multiflow"))
    assert len(calls) == 1
    fit, _ = split_heldout(calib)
    alone = prune(ref, solved.details["winner"], pattern="2:4", calibration=fit)
    assert len(calls) == 2  # run alone, it collects its own
    for k, keep in alone.masks.items():
        assert torch.equal(solved.masks[k], keep), k


def test_auto_on_a_text_encoder_with_sentences(tmp_path):
    """Text-only data (a .txt of sentences) reaches auto's held-out split and its fidelity."""
    from test_method_matrix import make_tiny_bert

    from vlcompress.data import load_calibration
    from vlcompress.prune import prune

    f = tmp_path / "s.txt"
    f.write_text("\n".join(f"a {c} {s} at the top" for c in ("red", "blue", "green")
                           for s in ("circle", "square", "star")) + "\n")
    data = load_calibration(f, n=9, batch_size=4)
    res = prune(make_tiny_bert(), "auto", 0.5, "unstructured", calibration=data)
    assert res.details["winner"] and res.details["heldout_pairs"] == 2
    assert all("text_cosine" in r for r in res.details["candidates"] if "error" not in r)
