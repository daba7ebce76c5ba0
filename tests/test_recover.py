"""vlcompress.recover: distillation after pruning keeps the sparsity pattern exactly,
checkpoints resume, bad inputs fail in one line with nothing written."""

import json
import math
import shutil

import pytest
import torch
from conftest import make_tiny_random_clip, make_tiny_random_siglip

from vlcompress.data import shapes_pairs
from vlcompress.distill import dense_copy
from vlcompress.errors import ConfigError, ModelError
from vlcompress.prune import prune
from vlcompress.recover import recover


def _data(n=8, bs=8):
    return shapes_pairs("train", n, bs)


def _pruned(pattern, sparsity=None, method="magnitude"):
    vlm = make_tiny_random_clip()
    teacher = dense_copy(vlm)
    prune(vlm, method, sparsity, pattern)
    return vlm, teacher


def test_unstructured_zeros_stay_zero_and_loss_decreases():
    vlm, teacher = _pruned("unstructured", 0.5)
    before = {ly.name: (ly.weight == 0).clone() for ly in vlm.prunable_layers()}
    w0 = {ly.name: ly.weight.detach().clone() for ly in vlm.prunable_layers()}
    res = recover(vlm, steps=8, teacher=teacher, data=_data(), lr=2e-3)
    assert res.pattern_preserved and res.masked_layers == len(before)
    for ly in vlm.prunable_layers():
        assert torch.equal(ly.weight == 0, before[ly.name]), ly.name
    assert any(not torch.equal(ly.weight, w0[ly.name]) for ly in vlm.prunable_layers())
    assert res.losses[-1] < res.losses[0]


def test_two_four_stays_exactly_two_four():
    vlm, teacher = _pruned("2:4")
    recover(vlm, steps=4, teacher=teacher, data=_data(), lr=2e-3)
    for ly in vlm.prunable_layers():
        nz = (ly.weight != 0).reshape(ly.weight.shape[0], -1, 4).sum(-1)
        assert int(nz.max()) <= 2, ly.name


def test_sliced_shapes_unchanged():
    vlm, teacher = _pruned("structured", 0.5)
    shapes = {k: tuple(v.shape) for k, v in vlm.model.state_dict().items()}
    recover(vlm, steps=3, teacher=teacher, data=_data(), lr=1e-3)
    assert {k: tuple(v.shape) for k, v in vlm.model.state_dict().items()} == shapes
    assert vlm.model.vision_model.encoder.layers[0].self_attn.num_heads < 4 or \
        vlm.model.vision_model.encoder.layers[0].mlp.fc1.out_features < 64


def _run_dir(tmp_path, name="run"):
    """A minimal prune-export-like folder: report.json naming the dense model's folder."""
    dense = make_tiny_random_clip()
    dense_dir = tmp_path / "dense-model"
    if not dense_dir.exists():
        dense.save(dense_dir)
    prune(dense, "magnitude", None, "2:4")
    run = tmp_path / name
    dense.save(run / "pruned" / "model")
    (run / "report.json").write_text(json.dumps({"model": {"name": str(dense_dir)},
                                                 "prune": {"method": "magnitude"}}))
    return run


def _weights(folder):
    from vlcompress.models import load_model

    return load_model(folder).model.state_dict()


class _StopAt:
    """A Progress that raises KeyboardInterrupt on the n-th advance (a Ctrl-C mid-run)."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def task(self, description, total=None):
        from contextlib import contextmanager

        outer = self

        @contextmanager
        def cm():
            class T:
                def advance(self, k=1):
                    outer.seen += k
                    if outer.seen == outer.n:
                        raise KeyboardInterrupt

                def update(self, **kw):
                    pass

            yield T()

        return cm()


def test_resume_after_interrupt_matches_uninterrupted(tmp_path):
    a = _run_dir(tmp_path, "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    kw = dict(steps=4, data=_data(16, 8), lr=2e-3, checkpoint_every=2, evaluate=False)
    full = recover(a, **kw)
    with pytest.raises(KeyboardInterrupt):
        recover(b, progress=_StopAt(3), **kw)
    assert (b / "recover" / "last.pt").is_file() and not (b / "recovered").exists()
    ck = torch.load(b / "recover" / "last.pt", weights_only=False)
    assert ck["step"] == 3
    res = recover(b, **kw)
    assert res.start_step == 3 and res.resumed and len(res.losses) == 1
    assert res.losses[-1] == pytest.approx(full.losses[-1], rel=1e-5, abs=1e-6)
    wa, wb = _weights(a / "recovered" / "model"), _weights(b / "recovered" / "model")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    doc = json.loads((b / "recover.json").read_text())
    assert doc["start_step"] == 3 and doc["pattern_preserved"] is True
    # a longer run continues the finished one; --no-resume starts over
    assert recover(b, **{**kw, "steps": 5}).start_step == 4
    assert recover(b, resume=False, **kw).start_step == 0


def test_run_dir_writes_metrics(tmp_path):
    run = _run_dir(tmp_path)
    res = recover(run, steps=2, data=_data(), eval_size=16)
    m = json.loads((run / "recover.json").read_text())["metrics"]
    assert set(m) >= {"dense", "pruned", "recovered", "retained"}
    assert res.model_path == "recovered/model" and (run / "recovered" / "model").is_dir()


def test_bad_inputs_write_nothing(tmp_path):
    with pytest.raises(ModelError, match="not a vlcompress output"):
        recover(tmp_path, steps=2)
    run = _run_dir(tmp_path)
    listing = sorted(p.name for p in run.iterdir())
    for steps in (0, -3):
        with pytest.raises(ConfigError, match="steps"):
            recover(run, steps=steps)
    with pytest.raises(ModelError, match="family"):
        recover(run, steps=2, teacher=make_tiny_random_siglip())
    assert sorted(p.name for p in run.iterdir()) == listing
    vlm, _ = _pruned("2:4")
    with pytest.raises(ConfigError, match="teacher"):
        recover(vlm, steps=2)


def test_cli_recover(tmp_path):
    from typer.testing import CliRunner

    from vlcompress.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["recover", str(tmp_path), "--steps", "2"])
    assert res.exit_code == 2 and "not a vlcompress output" in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1
    run = _run_dir(tmp_path)
    res = runner.invoke(app, ["recover", str(run), "--steps", "0"])
    assert res.exit_code == 2 and "steps" in res.stderr and not (run / "recovered").exists()
    for bad, needle in (("w_nope=1", "unknown distillation weight 'w_nope'"),
                        ("w_relation=-1", "w_relation='-1'"), ("temperature=0", "> 0"),
                        ("w_relation=x", "w_relation='x'")):
        res = runner.invoke(app, ["recover", str(run), "--steps", "2", "--distill-weight", bad])
        assert res.exit_code == 2 and needle in res.stderr, (bad, res.output)
        assert "Traceback" not in res.output and not (run / "recovered").exists()
    res = runner.invoke(app, ["recover", str(run), "--steps", "2", "--schedule", "sideways"])
    assert res.exit_code == 2 and "schedule 'sideways'" in res.stderr and "cosine" in res.stderr
    assert "Traceback" not in res.output and not (run / "recovered").exists()
    res = runner.invoke(app, ["recover", str(run), "--steps", "2", "--size", "8",
                              "--batch-size", "4", "--eval-size", "16",
                              "--distill-weight", "w_relation=1", "--schedule", "constant"])
    assert res.exit_code == 0, res.output
    assert (run / "recover.json").is_file() and (run / "recovered" / "model").is_dir()
    import json

    rec = json.loads((run / "recover.json").read_text())
    assert "w_relation" in json.dumps(rec)  # the weights used are recorded
    assert rec["schedule"] == "constant"


def test_recovery_recipe_fills_what_the_user_left(tmp_path):
    """lr and loss weights the user does not set come from the dense model's recovery recipe
    (its vlcompress.json), else from the defaults; what the recipe set is recorded."""
    from typer.testing import CliRunner

    from vlcompress.cli import app
    from vlcompress.distill import DEFAULTS

    run = _run_dir(tmp_path)
    kw = dict(steps=2, data=_data(), evaluate=False, resume=False)
    res = recover(run, **kw)  # no model card: the generic defaults
    assert res.lr == DEFAULTS["lr"] and res.recipe is None
    card = tmp_path / "dense-model" / "vlcompress.json"
    card.write_text(json.dumps({"family": "clip", "recover_recipe": {
        "lr": 2e-3, "min_steps": 2, "weights": {"w_relation": 0.5}, "measured": "a test"}}))
    res = recover(run, **kw)
    assert res.lr == 2e-3
    assert res.recipe == {"from": str(card), "applied": {"lr": 2e-3, "w_relation": 0.5}}
    rec = json.loads((run / "recover.json").read_text())
    assert rec["lr"] == 2e-3 and rec["distill_weights"]["w_relation"] == 0.5
    assert rec["recipe"]["applied"] == {"lr": 2e-3, "w_relation": 0.5}
    res = recover(run, lr=1e-4, weights={"w_relation": 0}, **kw)  # the user's choices win
    assert res.lr == 1e-4 and res.recipe is None
    res = recover(run, lr=1e-4, **kw)
    assert res.lr == 1e-4 and res.recipe["applied"] == {"w_relation": 0.5}
    # a run shorter than the recipe's min_steps keeps the default rate, and says so
    res = recover(run, **{**kw, "steps": 1})
    assert res.lr == DEFAULTS["lr"] and res.recipe["applied"] == {"w_relation": 0.5}
    assert res.recipe["not_applied"] == {"lr": 2e-3} and res.recipe["min_steps"] == 2
    out = CliRunner().invoke(app, ["recover", str(run), "--steps", "2", "--size", "8",
                                   "--batch-size", "4", "--eval-size", "16", "--no-resume"])
    assert out.exit_code == 0, out.output
    assert "recovery used lr 0.002, w_relation=0.5 from the dense model's recovery recipe" \
        in " ".join(out.stdout.split())
    for bad, needle in (({"lr": -1}, "recover_recipe lr -1"), ({"lr": 1e-3, "speed": 2},
                        "allowed keys: lr, min_steps"), ({"weights": {"w_nope": 1}}, "w_nope"),
                        ({"min_steps": 0}, "steps 0"), ([1], "allowed keys")):
        card.write_text(json.dumps({"recover_recipe": bad}))
        shutil.rmtree(run / "recovered", ignore_errors=True)
        with pytest.raises(ModelError, match=needle) as exc:
            recover(run, **kw)
        assert "vlcompress.json" in str(exc.value) and "\n" not in str(exc.value)
        assert not (run / "recovered").exists()
    card.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        recover(run, **kw)


def test_tiny_clip_ships_its_recipe():
    from vlcompress.models import load_model
    from vlcompress.recover import recovery_recipe

    recipe, where = recovery_recipe(load_model("tiny-clip"))
    assert recipe == {"lr": 1e-3, "min_steps": 100, "weights": {"w_relation": 1.0}}
    assert where.endswith("tiny-clip/vlcompress.json")


def test_cosine_schedule():
    """Linear warm-up over 5% of the steps (at most 100), then cosine to 0; constant is lr."""
    from vlcompress.distill import DEFAULTS, lr_at

    assert DEFAULTS["schedule"] == "cosine"
    lrs = [lr_at(s, 600, 1e-3, "cosine") for s in range(600)]
    assert lrs[0] == pytest.approx(1e-3 / 30) and lrs[29] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:30], lrs[1:30], strict=False))
    assert all(a >= b for a, b in zip(lrs[30:], lrs[31:], strict=False))
    assert lrs[-1] < 1e-7 and lrs[315] == pytest.approx(5e-4, rel=1e-2)
    assert lr_at(5000, 10000, 1.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(
        math.pi * 4900 / 9900)))  # warm-up capped at 100 steps
    assert {lr_at(s, 50, 3e-4, "constant") for s in range(50)} == {3e-4}
    assert lr_at(0, 1, 2e-4, "cosine") == 2e-4


def test_run_config_recover_steps():
    from vlcompress.pipeline import RunConfig

    assert RunConfig(recover_steps=3).recover_steps == 3
    with pytest.raises(ConfigError, match="recover steps"):
        RunConfig(recover_steps=-1)


def test_prune_export_recover_steps_keeps_2_4(tmp_path):
    """End to end: --recover-steps distils after pruning; the exported pruned ONNX is still 2:4."""
    import json

    from typer.testing import CliRunner

    from vlcompress.cli import app
    from vlcompress.exporters.onnx import check_nm

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--out", str(out), "--recover-steps", "3",
                                   "--calibration-size", "16", "--eval-size", "48",
                                   "--batch-sizes", "1", "--iterations", "2"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    rec = rep["prune"]["details"]["recover"]
    assert rec["steps"] == 3 and rec["pattern_preserved"]
    # tiny-clip's recovery recipe set the relation weight; its rate is for runs of 100+ steps,
    # so these 3 steps keep the default rate; the report says both
    assert rec["lr"] == 5e-5 and rec["recipe"]["applied"] == {"w_relation": 1.0}
    assert rec["recipe"]["not_applied"] == {"lr": 1e-3}
    assert any("recovery used w_relation=1 from the dense model's recovery recipe" in n
               and "at least 100 steps, so this 3-step run used lr 5e-05" in n
               for n in rep["data"]["notes"]), rep["data"]["notes"]
    assert "recovery recipe" in (out / "report.md").read_text()
    assert abs(rep["prune"]["achieved"] - 0.5) < 1e-6
    pruned = [n for n in rep["prune"]["per_layer"]]
    for tower in ("vision", "text"):
        bad = [w for w in check_nm(out / "pruned" / f"{tower}.onnx", 2, 4)
               if any(w.startswith(p) for p in pruned)]
        assert bad == [], bad
