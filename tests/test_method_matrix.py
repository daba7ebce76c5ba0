"""Every method x pattern x family either runs, or is refused in one line before any work.

The registry's declarations (kind, patterns, families, needs) are the only source of truth:
a combination they accept must prune without a ConfigError; one they refuse must be refused
by prune() before it touches the calibration data, and by ``prune-export`` before it loads
data or weights (symptom: ``--pattern structured --method snip`` used to fail after dense
evaluation, export, calibration and scoring).
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import make_tiny_random_blip, make_tiny_random_clip, make_tiny_random_siglip
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.errors import VlcError
from vlcompress.methods import available_methods, check_family, check_method
from vlcompress.models import family_info
from vlcompress.prune import prune


def make_tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    from vlcompress.data.tokenizer import build_shapes_tokenizer
    from vlcompress.models.towers import BertTextTower

    torch.manual_seed(seed)
    tok = build_shapes_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=16)
    return BertTextTower(BertModel(cfg).eval(), tok, None, name="tiny-bert", source="test")


FACTORIES = {"clip": make_tiny_random_clip, "siglip": make_tiny_random_siglip,
             "blip": make_tiny_random_blip, "bert": make_tiny_bert}
PATTERNS = ("unstructured", "2:4", "structured")


class _Untouchable:
    """Calibration data that fails the test if anything reads it."""

    source = "untouchable"

    def __getattr__(self, name):
        raise AssertionError(f"calibration data was read ({name}) before the refusal")

    def __len__(self):
        raise AssertionError("calibration data was read before the refusal")


@pytest.fixture(autouse=True)
def few_steps(monkeypatch):
    from conftest import set_option_defaults

    set_option_defaults(monkeypatch, "upop", search_steps=2, retrain_steps=1)
    # the achieved sparsity is what its Lagrangian reaches: enough steps to get past 0.2
    set_option_defaults(monkeypatch, "efficientvlm", train_steps=60, retrain_steps=1)


def _accepted(method, pattern, vlm) -> str | None:
    """None when the registry accepts the combination, else the refusal's message."""
    try:
        m = check_method(method, pattern)
        check_family(m, pattern, family_info(vlm))
    except VlcError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_declared_combination_runs_or_is_refused_first(family, pattern):
    from vlcompress.data import load_calibration

    calib = load_calibration("shapes", n=8, batch_size=8)
    ran, refused = [], []
    for method in available_methods():
        vlm = FACTORIES[family]()
        why = _accepted(method, pattern, vlm)
        sparsity = None if pattern == "2:4" else 0.5
        if why is not None:
            assert "\n" not in why, why
            assert any(w in why for w in ("allowed", "supports", "supported", "needs", "distils")), why
            with pytest.raises(VlcError) as exc:
                prune(vlm, method, sparsity, pattern, calibration=_Untouchable())
            assert str(exc.value) == why
            refused.append(method)
            continue
        res = prune(vlm, method, sparsity, pattern, calibration=calib)
        assert res.achieved > 0.2, (method, pattern, family)
        ran.append(method)
    # the declarations are not vacuous: the refusals are the expected ones, the rest runs
    if pattern == "structured":
        assert {"snip", "sparsegpt", "ecoflap", "auto"} <= set(refused)
        if family == "bert":
            assert ran == [], ran  # its layers cannot be sliced
        else:
            assert {"magnitude", "multiflow", "upop", "efficientvlm"} <= set(ran)
    else:
        assert {"magnitude", "wanda", "multiflow", "sparsegpt"} <= set(ran)
    if family == "bert":
        assert {"snip", "ecoflap"} <= set(refused)  # no training loss of its own


def test_structured_snip_refused_before_any_work(tmp_path, monkeypatch):
    """The CLI refuses in one line, exit 2, under 10 s, loading neither data nor weights."""
    import vlcompress.data as data_mod
    import vlcompress.models as models_mod

    def boom(*a, **k):
        raise AssertionError("loaded before the refusal")

    monkeypatch.setattr(data_mod, "load_calibration", boom)
    monkeypatch.setattr(models_mod, "load_model", boom)
    out = tmp_path / "run"
    t = time.perf_counter()
    res = CliRunner().invoke(app, ["prune-export", "--pattern", "structured", "--method", "snip",
                                   "--out", str(out)])
    assert time.perf_counter() - t < 10
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "snip" in lines[0] and "structured" in lines[0], res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, words", [
    (["--model", "blip-itm-base", "--pattern", "structured", "--method", "sparsegpt"],
     ("sparsegpt", "structured")),
    (["--model", "siglip-base-p16", "--pattern", "structured", "--method", "mope"],
     ("mope", "siglip")),
    (["--pattern", "2:4", "--method", "upop"], ("upop", "structured")),
    (["--model", "tiny-clip", "--tower", "text", "--pattern", "2:4", "--method", "snip"],
     ("snip", "loss")),
])
def test_family_refusals_from_the_config_alone(tmp_path, monkeypatch, args, words):
    import vlcompress.data as data_mod
    import vlcompress.models as models_mod

    def boom(*a, **k):
        raise AssertionError("loaded before the refusal")

    monkeypatch.setattr(data_mod, "load_calibration", boom)
    monkeypatch.setattr(models_mod, "load_model", boom)
    res = CliRunner().invoke(app, ["prune-export", *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and all(w in lines[0] for w in words), res.output
