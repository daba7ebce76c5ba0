"""Held-out early stopping in recovery: a slice of the training data the optimiser never
sees, fidelity on it every k steps, the best state kept; bad slices refused in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_random_clip

from vlcompress.data import shapes_pairs
from vlcompress.distill import dense_copy
from vlcompress.errors import ConfigError
from vlcompress.prune import prune
from vlcompress.recover import holdout_scorer, recover, split_holdout


def _pruned():
    vlm = make_tiny_random_clip()
    teacher = dense_copy(vlm)
    prune(vlm, "magnitude", None, "2:4")
    return vlm, teacher


def test_split_is_disjoint_seeded_and_sized():
    data = shapes_pairs("train", 20, 8)
    train, held = split_holdout(data, 0.25, seed=3)
    assert (len(train), len(held)) == (15, 5)
    assert sorted(train.captions + held.captions) == sorted(data.captions)
    assert len(train.images) == 15 and len(held.labels) == 5
    assert "held out 5 of 20" in held.source and train.batch_size == 8
    again = split_holdout(data, 0.25, seed=3)[1]
    assert again.captions == held.captions
    assert split_holdout(data, 0.25, seed=4)[1].captions != held.captions


def test_best_state_is_kept_when_training_hurts():
    """A rate that wrecks the student: the held-out score falls, the start state comes back."""
    vlm, teacher = _pruned()
    start = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    res = recover(vlm, steps=6, teacher=teacher, data=shapes_pairs("train", 16, 4), n=16,
                  lr=0.5, schedule="constant", holdout_fraction=0.25, holdout_every=2)
    h = res.holdout
    assert h["n"] == 4 and res.data["n"] == 12
    assert [s for s, _ in h["history"]] == [0, 2, 4, 6]
    assert h["best_step"] == 0 and h["history"][-1][1] < h["history"][0][1]
    assert all(torch.equal(v, start[k]) for k, v in vlm.model.state_dict().items())
    assert len(res.losses) == 6 and res.pattern_preserved


def test_best_state_is_the_one_scored_and_patience_stops():
    vlm, teacher = _pruned()
    data = shapes_pairs("train", 16, 4)
    res = recover(vlm, steps=8, teacher=teacher, data=data, n=16, lr=2e-3,
                  holdout_fraction=0.25, holdout_every=2)
    h = res.holdout
    assert h["best_score"] == pytest.approx(max(x for _, x in h["history"]), abs=1e-6)
    held = split_holdout(data, 0.25, seed=0)[1]
    assert holdout_scorer(teacher, vlm, held)() == pytest.approx(h["best_score"], abs=1e-5)
    vlm2, teacher2 = _pruned()
    res2 = recover(vlm2, steps=40, teacher=teacher2, data=data, n=16, lr=0.5,
                   schedule="constant", holdout_fraction=0.25, holdout_every=1, patience=2)
    assert res2.holdout["stopped_at"] is not None and len(res2.losses) < 40


@pytest.mark.parametrize("fraction,match", [(1.0, "allowed: a number in"),
                                            (-0.1, "allowed: a number in"),
                                            (0.9, "leaving none to train on")])
def test_bad_fraction_refused_before_training(fraction, match):
    vlm, teacher = _pruned()
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        recover(vlm, steps=2, teacher=teacher, data=shapes_pairs("train", 2, 2), n=2,
                holdout_fraction=fraction)
    assert all(torch.equal(v, before[k]) for k, v in vlm.model.state_dict().items())


def test_cli_slice_larger_than_training_data_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from vlcompress.cli import app

    for extra in (["--recover-steps", "5", "--train-size", "10", "--holdout-fraction", "0.95"],
                  ["--holdout-fraction", "0.1"]):  # without recovery: nothing to stop early
        res = CliRunner().invoke(app, ["prune-export", *extra, "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        assert "holdout" in res.output and "Traceback" not in res.output
        assert not (tmp_path / "o").exists()


def test_cli_recover_slice_larger_than_training_data_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from vlcompress.cli import app

    run = tmp_path / "run"  # refused before the run folder is even read
    res = CliRunner().invoke(app, ["recover", str(run), "--steps", "5", "--size", "10",
                                   "--holdout-fraction", "0.95"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "leaving none to train on" in lines[0], res.output
    assert not run.exists()
