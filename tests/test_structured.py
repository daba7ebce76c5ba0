"""Structured pruning: group scores, rounding, surgery (masked == sliced), save/load, ONNX,
MoPE and bad input. Tiny random CLIPs with uneven shapes; seconds."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_random_clip

from vlcompress import prune
from vlcompress.config import PruneConfig
from vlcompress.errors import ConfigError, PatternError
from vlcompress.models import load_model
from vlcompress.models.surgery import MANIFEST, find_blocks, is_sliced, read_manifest
from vlcompress.sparsity import apply_masks
from vlcompress.sparsity.structured import (
    group_scores_from_weights,
    head_step,
    nearest_allowed,
    probe_inputs,
    round_heads,
    round_neurons,
    tower_outputs,
)


def uneven_clip(seed=0, layers=2):
    # 3 heads of 8, MLP width 50 (not a multiple of 8)
    return make_tiny_random_clip(seed=seed, layers=layers, hidden=24, heads=3, mlp=50)


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --- rounding ---------------------------------------------------------------------------------
def test_rounding_rules():
    assert head_step(64, 8) == 1 and head_step(10, 8) == 4 and head_step(8, 16) == 2
    assert nearest_allowed(1536.0, 3072, 8) == 1536
    assert nearest_allowed(1539.9, 3072, 8) == 1536 and nearest_allowed(1540, 3072, 8) == 1544
    assert nearest_allowed(2.0, 3072, 8) == 8  # never below one step
    assert nearest_allowed(49.0, 50, 8) == 50  # the full width is allowed too
    assert nearest_allowed(45.0, 50, 8) == 48
    assert nearest_allowed(3.0, 5, 8) == 5  # narrower than round_to: stays whole
    assert round_heads(0.2, 12, 64, 8) == 1  # at least one head
    assert round_heads(6.4, 12, 64, 8) == 6
    assert round_heads(5.0, 12, 10, 8) == 4  # 4 heads * 10 = 40, a multiple of 8
    assert round_neurons(1000.0, 3072, 8) == 1000


def test_group_scores_sum_q_k_v_rows_and_o_columns():
    vlm = uneven_clip()
    b = find_blocks(vlm)[0]
    scores = {ly.name: torch.zeros(ly.weight.shape) for ly in b.linears.values()}
    scores[b.linears["attn.q"].name][8:16] = 1.0  # head 1, all its q rows
    scores[b.linears["attn.o"].name][:, 16:24] = 2.0  # head 2, its out-proj columns
    scores[b.linears["mlp.in"].name][7] = 1.0
    scores[b.linears["mlp.out"].name][:, 7] = 1.0
    heads, neurons = group_scores_from_weights(b, scores)
    assert heads.tolist() == [0.0, 8 * 24, 2 * 24 * 8]
    assert neurons[7] == 48 and neurons.sum() == 48


# --- surgery -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,round_to", [("magnitude", 1), ("multiflow", 8), ("wanda", 4),
                                             ("random", 8)])
def test_masked_equals_sliced_uneven(method, round_to, calib_small):
    vlm = uneven_clip()
    masked = copy.deepcopy(vlm)
    res = prune(vlm, method, 0.4, "structured", calibration=calib_small, round_to=round_to)
    # the masks are shaped like the original weights; zeroing them gives the masked model
    apply_masks(masked, res.masks)
    probe = probe_inputs(vlm)
    assert _max_diff(tower_outputs(masked, probe), tower_outputs(vlm, probe)) < 1e-5
    info = res.details["structured"]
    for b in find_blocks(vlm):
        heads, mlp = info["layers"][b.prefix]["heads"], info["layers"][b.prefix]["mlp"]
        assert b.num_heads == heads[0] >= 1 and heads[1] == 3
        assert b.mlp_width == mlp[0] and (mlp[0] % round_to == 0 or mlp[0] == 50)
        assert b.lin("attn.q").weight.shape == (8 * b.num_heads, 24)
        assert b.lin("attn.o").weight.shape == (24, 8 * b.num_heads)
        assert b.lin("mlp.out").weight.shape == (24, b.mlp_width)
    assert is_sliced(vlm)
    assert 0.2 < res.achieved < 0.6
    # the sliced model is smaller and dense
    assert sum(p.numel() for p in vlm.model.parameters()) < sum(
        p.numel() for p in masked.model.parameters())


def test_units_heads_only_keeps_mlp(calib_small):
    vlm = make_tiny_random_clip(hidden=32, heads=4, mlp=64)
    res = prune(vlm, "magnitude", 0.5, "structured", units="heads", round_to=8)
    blocks = find_blocks(vlm)
    assert all(b.mlp_width == 64 and b.num_heads >= 1 for b in blocks)
    for tower in ("vision", "text"):  # magnitude: pooled per tower, half of each tower's 8 heads
        assert sum(b.num_heads for b in blocks if b.modality == tower) == 4
    assert res.details["structured"]["units"] == ["heads"]


def test_uniform_allocation_matches_hand_slicing():
    vlm = make_tiny_random_clip(hidden=32, heads=4, mlp=64)
    prune(vlm, "random", 0.5, "structured", round_to=8)
    assert {(b.num_heads, b.mlp_width) for b in find_blocks(vlm)} == {(2, 32)}


def test_save_load_same_outputs_and_manifest(tmp_path):
    vlm = uneven_clip()
    prune(vlm, "magnitude", 0.5, "structured", round_to=1)
    vlm.save(tmp_path)
    man = read_manifest(tmp_path)
    assert man is not None and (tmp_path / "README.md").is_file()
    shapes = man["stacks"]["vision_model.encoder.layers"]["layers"]
    assert [s["num_heads"] for s in shapes] == [b.num_heads for b in find_blocks(vlm)
                                                if b.modality == "vision"]
    loaded = load_model(tmp_path)
    probe = probe_inputs(vlm)
    assert _max_diff(tower_outputs(vlm, probe), tower_outputs(loaded, probe)) == 0.0
    assert type(loaded.model).__name__ == "CLIPModel" and is_sliced(loaded)


def test_readme_snippet_loads_with_plain_transformers(tmp_path):
    vlm = uneven_clip()
    prune(vlm, "magnitude", 0.3, "structured", round_to=1)
    vlm.save(tmp_path)
    text = (tmp_path / "README.md").read_text()
    code = text.split("```python\n")[2].split("```")[0].replace("path/to/this/folder", str(tmp_path))
    ns: dict = {}
    exec(code, ns)  # noqa: S102 - our own generated instructions
    probe = probe_inputs(vlm)
    ref = vlm.model.get_image_features(**probe["vision"]).pooler_output
    got = ns["model"].eval().get_image_features(**probe["vision"]).pooler_output
    assert torch.allclose(ref, got, atol=1e-6)


def test_unsliced_save_has_no_manifest(tmp_path):
    vlm = uneven_clip()
    vlm.save(tmp_path)
    assert not (tmp_path / MANIFEST).exists()


def test_onnx_export_of_sliced_model(tmp_path):
    from vlcompress.data import load_calibration
    from vlcompress.exporters.onnx import export_model

    vlm = uneven_clip(layers=1)
    prune(vlm, "magnitude", 0.5, "structured", round_to=1)
    batches = iter(load_calibration("shapes", n=5, batch_size=3, seed=1).batches())
    example, check = next(batches), next(batches)
    res = export_model(vlm, tmp_path, example, check)
    assert set(res.paths) == {"vision", "text"}
    assert max(res.max_abs_diff.values()) < 1e-4


def test_depth_only_with_structured_mope():
    with pytest.raises(ConfigError, match="--depth"):
        PruneConfig(method="magnitude", pattern="structured", depth=1)
    with pytest.raises(ConfigError, match="structured"):
        PruneConfig(method="mope", pattern="unstructured")


def test_mope_width_and_depth(calib_small):
    vlm = make_tiny_random_clip(layers=3, hidden=32, heads=4, mlp=64)
    res = prune(vlm, "mope", 0.5, "structured", calibration=calib_small, round_to=8, depth=1)
    info = res.details["structured"]
    assert info["allocation"] == "per_tower"
    assert set(info["removed_layers"]) == {"vision_model.encoder.layers", "text_model.encoder.layers"}
    assert len(vlm.model.vision_model.encoder.layers) == 2
    assert vlm.model.config.vision_config.num_hidden_layers == 2
    # per tower, half the heads (pooled across layers), at least one per layer
    heads = [b.num_heads for b in find_blocks(vlm)]
    assert min(heads) >= 1
    out = tower_outputs(vlm, probe_inputs(vlm))
    assert all(torch.isfinite(v).all() for v in out.values())
    assert res.achieved > 0.5  # width + one whole layer of three


def test_mope_drops_are_zero_for_the_identity(calib_small):
    from vlcompress.methods.mope import _Context, _layer_parts, _Variants

    vlm = make_tiny_random_clip(layers=2)
    blocks = find_blocks(vlm)
    ctx = _Context(vlm, blocks, calib_small)
    for b in blocks:
        *_, y = _layer_parts(ctx, b)
        d = ctx.drops(b, _Variants(1, lambda s, e, y=y: y))
        assert abs(float(d[0])) < 1e-4


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-8", "x", 0, 2.5, True])
def test_round_to_must_be_positive_int(value):
    with pytest.raises(ConfigError, match="--round-to"):
        PruneConfig(method="magnitude", pattern="structured", round_to=value)


def test_units_validated():
    with pytest.raises(ConfigError, match="units"):
        PruneConfig(method="magnitude", pattern="structured", units="heads,layers")
    assert PruneConfig(method="magnitude", pattern="structured", units="neurons").units == ("neurons",)


def test_sparsity_removing_every_head_is_an_error():
    vlm = uneven_clip()
    before = copy.deepcopy(vlm.model.state_dict())
    with pytest.raises(PatternError, match="every attention head"):
        prune(vlm, "magnitude", 0.8, "structured")
    after = vlm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched
    prune(vlm, "magnitude", 0.8, "structured", units="neurons")  # neurons only: fine


def test_depth_beyond_layers_is_an_error(calib_small):
    vlm = make_tiny_random_clip(layers=2)
    with pytest.raises(ConfigError, match="--depth 2"):
        prune(vlm, "mope", 0.2, "structured", calibration=calib_small, depth=2)


def test_cli_bad_round_to_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from vlcompress.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["prune-export", "--pattern", "structured", "--round-to", "0",
                                 "--out", str(out)])
    assert r.exit_code == 2
    assert "--round-to" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_prune_all_heads_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from vlcompress.cli import app

    out = tmp_path / "pruned"
    r = CliRunner().invoke(app, ["prune", "--method", "magnitude", "--pattern", "structured",
                                 "--sparsity", "0.9", "--out", str(out)])
    assert r.exit_code == 2 and "every attention head" in r.output
    assert not out.exists()


def test_report_has_params_and_flops_per_tower():
    from vlcompress.flops import size_section, tower_size

    vlm = make_tiny_random_clip(hidden=32, heads=4, mlp=64)
    dense = tower_size(vlm, text_length=8)
    prune(vlm, "random", 0.5, "structured", round_to=8)
    sec = size_section(dense, tower_size(vlm, text_length=8))
    for t in ("vision", "text"):
        assert sec[t]["params_pruned"] < sec[t]["params_dense"]
        assert 0.4 < sec[t]["flops_ratio"] < 0.75
    assert json.dumps(sec)
