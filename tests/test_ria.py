"""RIA (vlcompress/scoring/ria.py): the reference's score, its activation exponent as a checked
method option, and ``--method ria`` at unstructured and N:M."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_random_clip

from vlcompress.calibrate import LayerStats
from vlcompress.config import PruneConfig
from vlcompress.data import load_calibration
from vlcompress.errors import ConfigError
from vlcompress.methods import get_method
from vlcompress.prune import prune


def _layer(w):
    return SimpleNamespace(name="l", weight=torch.tensor(w))


def test_score_is_relative_importance_times_activation_power():
    w = [[1.0, -2.0], [3.0, 0.0]]
    stats = LayerStats(torch.tensor([4.0, 16.0], dtype=torch.float64), tokens=2)  # a = 2, 4
    score = get_method("ria").score
    got = score(_layer(w), stats, options={"a": 0.5})
    # |W|/column sum + |W|/row sum, times sqrt(a_j): worked by hand
    want = torch.tensor([[1 / 4 + 1 / 3, 2 / 2 + 2 / 3], [3 / 4 + 3 / 3, 0.0]])
    want = want * torch.tensor([2.0, 4.0]).sqrt()
    torch.testing.assert_close(got, want)
    # a = 0: relative importance alone; a = 1: activations weigh in fully
    ri = want / torch.tensor([2.0, 4.0]).sqrt()
    torch.testing.assert_close(score(_layer(w), stats, options={"a": 0.0}), ri)
    torch.testing.assert_close(score(_layer(w), stats, options={"a": 1.0}), ri * torch.tensor([2.0, 4.0]))
    # an all-zero column scores 0, not NaN
    z = score(_layer([[0.0, 1.0], [0.0, 2.0]]), stats, options={"a": 0.5})
    assert torch.isfinite(z).all() and (z[:, 0] == 0).all()


@pytest.mark.parametrize("value", ["-0.1", "2.5", "nan", "x"])
def test_exponent_out_of_range_is_one_line(value):
    with pytest.raises(ConfigError) as exc:
        PruneConfig(method="ria", pattern="2:4", method_options={"a": value})
    msg = str(exc.value)
    assert "\n" not in msg and "ria.a" in msg


def test_ria_prunes_unstructured_and_nm_and_the_exponent_reaches_it():
    calib = load_calibration("shapes", n=8, batch_size=8)
    masks = {}
    for a in ("0", "1"):
        vlm = make_tiny_random_clip()
        res = prune(vlm, "ria", None, "2:4", calibration=calib, method_options={"a": a})
        assert res.achieved == pytest.approx(0.5)
        assert res.details["method_options"] == {"a": float(a)}
        masks[a] = res.masks[vlm.prunable_layers()[0].name]
    assert not torch.equal(masks["0"], masks["1"])
    vlm = make_tiny_random_clip()
    res = prune(vlm, "ria", 0.6, "unstructured", calibration=calib)
    assert res.allocation == "layerwise"
    for v in res.per_layer.values():  # the reference prunes each layer as a whole
        assert v == pytest.approx(0.6, abs=0.01)


def test_cli_exponent_out_of_range_is_one_line_exit_2_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import vlcompress.data as data_mod
    import vlcompress.models as models_mod
    from vlcompress.cli import app

    def boom(*a, **k):
        raise AssertionError("loaded before the refusal")

    monkeypatch.setattr(data_mod, "load_calibration", boom)
    monkeypatch.setattr(models_mod, "load_model", boom)
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["prune-export", "--method", "ria", "--pattern", "2:4",
                                   "--method-option", "a=3", "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ria.a" in lines[0] and "2" in lines[0], res.output
    assert not out.exists()
