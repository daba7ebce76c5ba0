"""Reconstruction after a scorer's mask (methods/reconstruct.py): SparseGPT's sweep with the
mask fixed; the default policy; the refusals; the report's speedup expectation."""

from __future__ import annotations

import pytest
import torch

from vlcompress.config import PruneConfig
from vlcompress.errors import ConfigError
from vlcompress.prune import prune
from vlcompress.sparsity.obs import obs_prune, reconstruction_error


@pytest.fixture(scope="module")
def calib():
    from vlcompress.data import load_calibration

    return load_calibration("shapes", n=8, batch_size=4)


def _layer_problem(seed=0, d_out=24, d_in=32, tokens=200):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs (as real activations are): a pruned column's signal lives on in others
    x = torch.randn(tokens, 8, generator=g) @ torch.randn(8, d_in, generator=g)
    x = x + 0.1 * torch.randn(tokens, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g)
    return w, x.T @ x


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_fixed_mask_sweep_equals_sparsegpt_with_its_own_mask(pattern):
    """Given the mask SparseGPT chose, the mask-fixed sweep gives SparseGPT's own weights."""
    w, gram = _layer_problem()
    kw = {"sparsity": 0.5} if pattern == "unstructured" else {"n": 2, "m": 4}
    new, keep = obs_prune(w, gram, blocksize=8, **kw)
    again, keep2 = obs_prune(w, gram, blocksize=8, keep=keep)
    assert torch.equal(keep2, keep)
    torch.testing.assert_close(again, new, rtol=1e-4, atol=1e-4)


def test_fixed_mask_sweep_keeps_the_mask_and_lowers_the_error():
    w, gram = _layer_problem(seed=1)
    keep = w.abs() > w.abs().median()  # a magnitude mask, not what SparseGPT would choose
    new, got = obs_prune(w, gram, keep=keep)
    assert torch.equal(got, keep)
    assert (new[~keep] == 0).all() and not torch.equal(new[keep], w[keep])
    plain = reconstruction_error(w, w * keep, gram)
    assert reconstruction_error(w, new, gram) < 0.8 * plain


def _outputs(vlm, calib):
    from vlcompress.eval import embed_eval

    return embed_eval(vlm, calib)


@pytest.mark.parametrize("method,pattern", [("multiflow", "2:4"), ("magnitude", "unstructured")])
def test_prune_reconstructs_scorer_masks(tiny_random_clip, calib, method, pattern):
    """Same masks with and without reconstruction; survivors change, the pattern holds, the
    model's embeddings come closer to the dense ones."""
    from conftest import make_tiny_random_clip

    from vlcompress.eval import fidelity

    dense = _outputs(make_tiny_random_clip(), calib)
    plain_vlm, rec_vlm = make_tiny_random_clip(), make_tiny_random_clip()
    sp = 0.5 if pattern == "unstructured" else None
    plain = prune(plain_vlm, method, sp, pattern, calibration=calib, reconstruct=False)
    rec = prune(rec_vlm, method, sp, pattern, calibration=calib)  # default: on
    assert plain.reconstruct == {"enabled": False, "why": "off (--no-reconstruct)"}
    assert rec.reconstruct["enabled"] and rec.reconstruct["error_ratio"] < 1.0
    assert rec.to_dict()["reconstruct"]["enabled"]
    assert rec.achieved == plain.achieved == 0.5
    layers = {ly.name: ly for ly in rec_vlm.prunable_layers()}
    for ly in plain_vlm.prunable_layers():
        keep = plain.masks[ly.name]
        assert torch.equal(rec.masks[ly.name], keep)
        w = layers[ly.name].weight.detach()
        assert (w[~keep] == 0).all()
        if pattern == "2:4":
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    changed = [n for n, ly in layers.items() if not torch.equal(
        ly.weight.detach(), dict((x.name, x) for x in plain_vlm.prunable_layers())[n].weight)]
    assert len(changed) == len(layers)
    f_plain = fidelity(dense, _outputs(plain_vlm, calib))
    f_rec = fidelity(dense, _outputs(rec_vlm, calib))
    assert sum(f_rec.values()) > sum(f_plain.values())


def test_default_policy_without_data_and_for_solvers(tiny_random_clip, calib):
    r = prune(tiny_random_clip, "magnitude", 0.5, "unstructured")  # no data: nothing to fit
    assert r.reconstruct["enabled"] is False and "no calibration data" in r.reconstruct["why"]
    from conftest import make_tiny_random_clip

    r = prune(make_tiny_random_clip(), "sparsegpt", None, "2:4", calibration=calib)
    assert r.reconstruct == {"enabled": False,
                             "why": "implied by sparsegpt (its sweep updates the weights)"}


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "sparsegpt", "pattern": "2:4"}, "implied by method 'sparsegpt'"),
    ({"method": "auto", "pattern": "2:4"}, "follows a scorer's mask"),
    ({"method": "multiflow", "pattern": "structured"}, "not structured"),
])
def test_refused_where_it_does_not_apply(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(reconstruct=True, **kwargs)
    PruneConfig(reconstruct=False, **kwargs)  # asking for it off is always fine


def test_refused_without_calibration_before_any_work(tiny_random_clip):
    before = {ly.name: ly.weight.detach().clone() for ly in tiny_random_clip.prunable_layers()}
    with pytest.raises(ConfigError, match="needs calibration data"):
        prune(tiny_random_clip, "magnitude", 0.5, "unstructured", reconstruct=True)
    assert all(torch.equal(ly.weight.detach(), before[ly.name])
               for ly in tiny_random_clip.prunable_layers())


def test_cli_refusals_are_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from vlcompress.cli import app

    for args in (["--method", "sparsegpt", "--reconstruct"],
                 ["--pattern", "structured", "--reconstruct"]):
        res = CliRunner().invoke(app, ["prune-export", *args, "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        assert "--reconstruct" in res.output and "Traceback" not in res.output
        assert not (tmp_path / "o").exists()


def test_speedup_expectation_is_derived_from_the_registry():
    from vlcompress.runtime import get_runtime, runtimes
    from vlcompress.runtime.registry import expected_speedup

    ort = expected_speedup(get_runtime("onnxruntime"), "2:4")
    assert not ort["accelerated"] and "expect 1.0x" in ort["text"]
    fast = {f"{r.name}/{r.device}" for r in runtimes() if "2:4" in r.accelerates}
    assert set(ort["by"]) == fast and "tensorrt/cuda" in fast and "torch-2:4/cuda" in fast
    assert "structured pruning speeds up every runtime" in ort["text"]
    trt = expected_speedup(get_runtime("trt"), "2:4")
    assert trt["accelerated"] and "expect 1.0x" not in trt["text"]
    assert expected_speedup(get_runtime("torch"), "structured")["accelerated"]
    un = expected_speedup(get_runtime("onnxruntime"), "unstructured")
    assert un["by"] == [] and "no registered runtime accelerates unstructured" in un["text"]


def test_report_says_reconstruction_and_expectation_before_latency():
    from vlcompress.report import build_report, to_markdown
    from vlcompress.runtime import get_runtime
    from vlcompress.runtime.registry import expected_speedup

    lat = [{"runtime": "onnxruntime", "device": "cpu", "tower": "vision", "batch": 1,
            "dense_ms": {"p50": 2.0, "p90": 2.2, "p99": 2.5},
            "pruned_ms": {"p50": 2.0, "p90": 2.1, "p99": 2.2}, "speedup": 1.0}]
    r = build_report(
        model={"name": "m", "family": "clip", "params_total": 10, "params_nonzero": 5},
        prune={"method": "wanda", "pattern": "2:4", "target": 0.5, "achieved": 0.5,
               "per_modality": {}, "seconds": 1.0,
               "reconstruct": {"enabled": True, "why": "on (asked)", "seconds": 0.5,
                               "error_ratio": 0.27}},
        export={}, accuracy=None, latency=lat, env={}, config={})
    r["speedup_expectation"] = expected_speedup(get_runtime("onnxruntime"), "2:4")
    md = to_markdown(r)
    assert "**reconstruction** on (asked): survivors fitted" in md and "0.27x" in md
    exp = md.index("**Expected:** 2:4 runs dense on onnxruntime/cpu/fp32: expect 1.0x")
    assert md.index("## Latency") < exp < md.index("| runtime | device |")
