"""upop and efficientvlm: faithful to their reference code (sdc17/UPop, swaggy-TN/EfficientVLM)
on small hand-checkable cases, and end to end they give sliced models (tiny random CLIP, a
handful of steps, set through the methods' declared options)."""

import math

import pytest
import torch
from conftest import make_tiny_random_clip, set_option_defaults

from vlcompress.data import load_calibration
from vlcompress.errors import ConfigError
from vlcompress.prune import prune


@pytest.fixture(autouse=True)
def few_steps(monkeypatch):
    set_option_defaults(monkeypatch, "upop", search_steps=4, retrain_steps=2)
    set_option_defaults(monkeypatch, "efficientvlm", train_steps=4, retrain_steps=2)


# --- UPop: update_alpha_parameters ---------------------------------------------------------
def test_upop_ratio_schedule_is_the_references():
    from vlcompress.methods.upop import ratio_at

    assert ratio_at(0.5, 10, 10) == pytest.approx(0.5)
    assert ratio_at(0.5, 5, 10) == pytest.approx(0.5 * math.sqrt(0.5))  # sqrt of the cos ramp
    assert ratio_at(0.5, 1, 4) == pytest.approx(0.5 * ((1 - math.cos(math.pi / 4)) / 2) ** 0.5)


def test_upop_prunes_largest_signed_gradient_in_one_cost_weighted_pool():
    from vlcompress.methods.upop import prune_sets

    # two layers (a, b), 2 heads and 4 neurons each; a head costs 3 neurons
    g = {("h", "a"): torch.tensor([5.0, -1.0]), ("h", "b"): torch.tensor([0.0, 2.0]),
         ("f", "a"): torch.tensor([1.0, 9.0, -3.0, 0.0]), ("f", "b"): torch.tensor([2.0, 2.0, 8.0, -7.0])}
    costs = {("h", "a"): 3.0, ("h", "b"): 3.0, ("f", "a"): 1.0, ("f", "b"): 1.0}
    pruned, z = prune_sets(g, costs, 0.25)
    # z-scores per unit type, pooled over layers (sample std, as torch.std)
    h = torch.tensor([5.0, -1.0, 0.0, 2.0])
    assert torch.allclose(torch.cat([z[("h", "a")], z[("h", "b")]]), (h - h.mean()) / h.std())
    # descending by z: neuron a1 (1.42, cost 1), head a0 (1.32, cost 3), neuron b2 (1.23, cost 1),
    # ...; total cost 4 heads * 3 + 8 neurons = 20, 25% = 5: cumulative 1, 4, 5 -> the first
    # three go, cost 5 exactly (the reference keeps the unit where the sum is nearest, b2,
    # and prunes only cost 4: one unit short, our documented deviation)
    order = sorted(((float(v), k, i) for k, t in z.items() for i, v in enumerate(t)), reverse=True)
    assert [(k, i) for _, k, i in order[:3]] == [(("f", "a"), 1), (("h", "a"), 0), (("f", "b"), 2)]
    assert pruned[("f", "a")].tolist() == [False, True, False, False]
    assert pruned[("h", "a")].tolist() == [True, False]
    assert pruned[("f", "b")].tolist() == [False, False, True, False] and not pruned[("h", "b")].any()
    cost = sum(float(costs[k]) * int(v.sum()) for k, v in pruned.items())
    assert cost == 5.0
    # the largest gradient goes first: at 60% every head but one per layer goes too
    pruned, _ = prune_sets(g, costs, 0.6)
    assert pruned[("h", "a")].tolist() == [True, False]  # the lowest of a layer always stays
    assert pruned[("h", "b")].tolist() == [False, True]
    assert pruned[("f", "b")].tolist() == [True, True, True, False]


def test_upop_lowest_unit_of_each_layer_is_kept():
    from vlcompress.methods.upop import prune_sets

    g = {("f", "a"): torch.tensor([9.0, 8.0]), ("f", "b"): torch.tensor([0.0, 0.1])}
    pruned, _ = prune_sets(g, {("f", "a"): 1.0, ("f", "b"): 1.0}, 0.75)
    assert pruned[("f", "a")].tolist() == [True, False]


def test_upop_floor_does_not_shrink_the_prune():
    """The ranking wants every head of layer a (largest gradients); the floor keeps one.
    The reference cuts the pool where all units' cost meets the ratio, then applies the
    floor, so it prunes less than asked (here 2 of the 6 units' cost instead of 3); the
    floor-kept units are left out of the ranking, so the cut moves on to layer b."""
    from vlcompress.methods.upop import prune_sets

    g = {("h", "a"): torch.tensor([9.0, 8.0, 7.0]), ("h", "b"): torch.tensor([0.0, 0.5, 0.2])}
    pruned, _ = prune_sets(g, {("h", "a"): 1.0, ("h", "b"): 1.0}, 0.5)
    assert pruned[("h", "a")].tolist() == [True, True, False]  # the lowest of a stays
    assert pruned[("h", "b")].tolist() == [False, True, False]  # the next largest goes
    assert sum(int(v.sum()) for v in pruned.values()) == 3


def test_upop_trains_weights_and_accumulates_signed_gradients():
    vlm = make_tiny_random_clip()
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    res = prune(vlm, "upop", 0.5, "structured", round_to=1,
                calibration=load_calibration("shapes", n=16, batch_size=8),
                method_options={"search_steps": 3, "retrain_steps": 0, "search_lr": 1e-3})
    d = res.details["upop"]
    assert d["ratios"][-1] == pytest.approx(0.5) and d["ratios"] == sorted(d["ratios"])
    assert d["method_options"]["search_steps"] == 3 and res.allocation == "upop-global"
    # the weights moved during the search (no retraining here), the embeddings too
    emb = "text_model.embeddings.token_embedding.weight"
    assert not torch.equal(dict(vlm.model.named_parameters())[emb], before[emb])
    assert all(p.grad is None for p in vlm.model.parameters())
    # round_to=1: the slicing keeps exactly what the search kept
    assert d["kept_by_search"] == d["kept_after_rounding"]


# --- EfficientVLM: XVLML0Module -------------------------------------------------------------
def test_efficientvlm_deterministic_gates_per_layer():
    from vlcompress.methods.efficientvlm import deterministic_gate, p_open

    la = torch.tensor([4.0, -4.0, 0.5, -0.2, 3.0, -3.0])
    zeros = round(6 - float(p_open(la).sum()))
    g = deterministic_gate(la)
    assert set(g.tolist()) <= {0.0, 1.0} and int((g == 0).sum()) == zeros
    # the removed ones are the lowest log_alpha (monotone soft mask), survivors are exactly 1
    assert g[torch.argsort(la)[:zeros]].eq(0).all() and g[torch.argsort(la)[zeros:]].eq(1).all()
    assert deterministic_gate(torch.full((4,), 4.6)).eq(1).all()  # all open: none removed
    # P(z != 0) = 1 - cdf_qz(0): sigmoid(log_alpha - beta * log(-gamma / zeta))
    assert float(p_open(torch.tensor(0.0))) == pytest.approx(
        1 / (1 + math.exp((2 / 3) * math.log(0.1 / 1.1))))


def test_efficientvlm_gates_start_as_the_reference_and_are_constrained():
    from vlcompress.methods.efficientvlm import LOG_ALPHA_RANGE, HardConcreteGates
    from vlcompress.models.surgery import find_blocks

    vlm = make_tiny_random_clip()
    g = HardConcreteGates(find_blocks(vlm), ("heads", "neurons"), head_init=10.0, neuron_init=0.0)
    heads = torch.cat(list(g.heads.values()))
    neurons = torch.cat(list(g.neurons.values()))
    assert heads.mean().item() == pytest.approx(10.0, abs=0.05)
    assert neurons.mean().item() == pytest.approx(0.0, abs=0.05)
    g.constrain()
    assert torch.cat(list(g.heads.values())).max().item() == pytest.approx(LOG_ALPHA_RANGE[1])


def test_efficientvlm_lagrangian_decides_and_survivors_are_not_scaled():
    vlm = make_tiny_random_clip()
    res = prune(vlm, "efficientvlm", 0.5, "structured", round_to=1,
                calibration=load_calibration("shapes", n=16, batch_size=8),
                method_options={"train_steps": 60, "retrain_steps": 0, "weight_lr": 0.0})
    d = res.details["efficientvlm"]
    fin = d["final"]
    assert fin["lambda2"] > 0  # the multipliers were learned (ascent)
    # the expected sparsity reached the target's neighbourhood; heads and neurons split unevenly
    assert abs(d["expected_sparsity_final"] - 0.5) < 0.12
    k = d["kept_by_gates"]["vision"]
    assert k["heads"] != k["neurons"]
    # the sliced model has the asked sparsity, whatever the Lagrangian reached
    assert abs(res.achieved - 0.5) <= d["budget_fit"]["tolerance"]


# --- both, end to end ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["upop", "efficientvlm"])
def test_sliced_and_reloads(method, tmp_path):
    from vlcompress.models import load_model

    vlm = make_tiny_random_clip()
    calib = load_calibration("shapes", n=16, batch_size=8)
    res = prune(vlm, method, 0.5, "structured", calibration=calib)
    assert res.pattern == "structured"
    layers = res.details["structured"]["layers"]
    assert all(v["heads"][0] >= 1 for v in layers.values())
    assert res.details[method]["retrain"]["steps"] == 2
    assert res.details[method]["retrain"]["schedule"] == "cosine"  # the shipped default
    vlm.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.embed_texts(["a red circle"]).shape[-1] == 16


def test_upop_sliced_near_requested_sparsity():
    vlm = make_tiny_random_clip()
    res = prune(vlm, "upop", 0.5, "structured", round_to=1,
                calibration=load_calibration("shapes", n=16, batch_size=8))
    assert res.achieved == pytest.approx(0.5, abs=0.07)
    widths = [b.self_attn.num_heads for b in vlm.model.vision_model.encoder.layers] + \
        [b.mlp.fc1.out_features for b in vlm.model.text_model.encoder.layers]
    assert widths != [4, 4, 64, 64]  # physically sliced


@pytest.mark.parametrize("method", ["upop", "efficientvlm"])
def test_structured_only(method):
    with pytest.raises(ConfigError, match="structured"):
        prune(make_tiny_random_clip(), method, 0.5, "unstructured",
              calibration=load_calibration("shapes", n=8, batch_size=8))


def test_method_options_are_checked_in_one_line():
    calib = load_calibration("shapes", n=8, batch_size=8)
    with pytest.raises(ConfigError, match=r"has no option 'steps'; its options: search_steps=4"):
        prune(make_tiny_random_clip(), "upop", 0.5, "structured", calibration=calib,
              method_options={"steps": 3})
    with pytest.raises(ConfigError, match=r"upop\.retrain_lr='fast' is not valid"):
        prune(make_tiny_random_clip(), "upop", 0.5, "structured", calibration=calib,
              method_options={"retrain_lr": "fast"})
    with pytest.raises(ConfigError, match=r"efficientvlm\.retrain_schedule='sideways'.*cosine\|constant"):
        prune(make_tiny_random_clip(), "efficientvlm", 0.5, "structured", calibration=calib,
              method_options={"retrain_schedule": "sideways"})
    with pytest.raises(ConfigError, match=r"ecoflap\.estimator='x'.*tensor\|block-spsa"):
        prune(make_tiny_random_clip(), "ecoflap", 0.5, calibration=calib,
              method_options={"estimator": "x"})
    with pytest.raises(ConfigError, match="method 'magnitude' has no option 'eps'; "
                                          r"its options: permute=False \(bool\), permute_seconds"):
        prune(make_tiny_random_clip(), "magnitude", 0.5, method_options={"eps": "1"})


def test_method_options_parse_from_cli_text():
    from vlcompress.config import PruneConfig, parse_method_options

    assert parse_method_options(["search_steps=7", "retrain_lr=1e-3"]) == \
        {"search_steps": "7", "retrain_lr": "1e-3"}
    pc = PruneConfig(method="upop", sparsity=0.5, pattern="structured",
                     method_options=["search_steps=7", "retrain_lr=1e-3"])
    assert pc.method_options["search_steps"] == 7 and pc.method_options["retrain_lr"] == 1e-3
    assert pc.method_options["retrain_steps"] == 2  # the (test's) default
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_method_options(["search_steps"])
