"""Every registered model family: prune with each pattern, export, validate; plus the
family-specific behaviour (SigLIP padding, BLIP's three modalities and ITM, single towers,
LLaVA-style vision towers)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_random_blip, make_tiny_random_clip, make_tiny_random_siglip
from typer.testing import CliRunner

from vlcompress import load_calibration, prune
from vlcompress.calibrate import collect_stats
from vlcompress.cli import app
from vlcompress.errors import ModelError, PatternError
from vlcompress.exporters.onnx import export_model
from vlcompress.models import families, load_model


def make_clip_vision():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from vlcompress.models.towers import ClipVisionTower

    torch.manual_seed(0)
    m = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8)).eval()
    img = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return ClipVisionTower(m, None, img, name="tiny-clip-vision")


def make_siglip_vision():
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from vlcompress.models.towers import SiglipVisionTower

    torch.manual_seed(0)
    m = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)).eval()
    return SiglipVisionTower(m, None, SiglipImageProcessor(size={"height": 32, "width": 32}))


def make_bert():
    from transformers import BertConfig, BertModel

    from vlcompress.data.tokenizer import build_shapes_tokenizer
    from vlcompress.models.towers import BertTextTower

    torch.manual_seed(0)
    tok = build_shapes_tokenizer()
    m = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, vocab_size=len(tok), max_position_embeddings=32)).eval()
    return BertTextTower(m, tok, None, name="tiny-bert")


FACTORIES = {
    "clip": make_tiny_random_clip,
    "siglip": make_tiny_random_siglip,
    "blip": make_tiny_random_blip,
    "clip_vision_model": make_clip_vision,
    "siglip_vision_model": make_siglip_vision,
    "bert": make_bert,
}
PATTERNS = [("unstructured", 0.5), ("2:4", None), ("structured", 0.5)]
STRUCTURED = {"clip", "siglip", "blip", "clip_vision_model", "siglip_vision_model"}


@pytest.fixture(scope="module")
def calib():
    return load_calibration(n=8, batch_size=4)


@pytest.fixture(scope="module")
def batches():
    it = iter(load_calibration(n=5, batch_size=3, seed=1).batches())
    return next(it), next(it)


#: generative families: no per-tower ONNX export; their three-graph export and pruning are
#: exercised by their own tests (tests/test_llava.py, tests/test_generative_export.py,
#: tests/test_blip_caption.py, tests/test_blip2.py; blip2's model_type is "blip-2")
GENERATIVE = {"llava", "blip-caption", "blip-vqa", "blip-2"}


def test_every_registered_family_is_exercised():
    assert set(FACTORIES) | GENERATIVE == set(families()), "add a factory for every registered family"


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("pattern,sparsity", PATTERNS)
def test_family_prune_export_validate(family, pattern, sparsity, calib, batches, tmp_path):
    vlm = FACTORIES[family]()
    assert vlm.family == family
    layers = vlm.prunable_layers()
    assert layers and all(isinstance(pl.module, torch.nn.Linear) for pl in layers)
    if pattern == "structured" and family not in STRUCTURED:
        with pytest.raises(PatternError, match=f"not supported for family '{family}'"):
            prune(vlm, "multiflow", sparsity, pattern, calibration=calib)
        return
    res = prune(vlm, "multiflow", sparsity, pattern, calibration=calib)
    if pattern == "structured":  # physically smaller; sliced == masked was verified inside prune
        def n_params(v):
            return sum(p.numel() for p in v.model.parameters())

        assert n_params(vlm) < n_params(FACTORIES[family]())
        assert all(d < 1e-4 for d in res.details["structured"]["verify_max_abs_diff"].values())
    else:
        for mod, s in res.per_modality.items():
            assert abs(s - 0.5) < 1e-6, (mod, s)
        for pl in layers:  # masked weights really are zero
            assert (pl.weight[~res.masks[pl.name]] == 0).all()
    ex = export_model(vlm, tmp_path / "onnx", *batches)
    assert set(ex.paths) == set(vlm.towers)
    assert all(d < 1e-3 for d in ex.max_abs_diff.values()), ex.max_abs_diff


def test_siglip_pads_to_max_length_without_mask_but_calibration_skips_pads(calib):
    vlm = make_tiny_random_siglip()
    enc = vlm.encode_texts(["a red circle", "a large blue square at the top left"])
    assert enc["input_ids"].shape[1] == vlm.text_max_length
    assert vlm.tower_inputs("text", next(iter(calib))).keys() == {"input_ids"}
    stats = collect_stats(vlm, calib)
    real = sum(int(vlm.encode_texts(b.captions)["real_tokens"].sum()) for b in calib.batches())
    assert stats["text_model.encoder.layers.0.mlp.fc1"].tokens == real < 8 * vlm.text_max_length


def test_blip_three_modalities_heads_kept(calib):
    vlm = make_tiny_random_blip()
    mods = {pl.modality for pl in vlm.prunable_layers()}
    assert mods == {"vision", "text", "fusion"}
    names = [pl.name for pl in vlm.prunable_layers()]
    assert not any(k in n for n in names for k in ("itm_head", "vision_proj", "text_proj", "embeddings"))
    assert any("crossattention" in n for n in names)
    b = next(iter(calib))
    p = vlm.itm_scores(b.images[:2], b.captions[:2])
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()


def test_blip_eval_has_itm_rerank():
    from vlcompress import evaluate, load_eval

    m = evaluate(make_tiny_random_blip(), load_eval(n=12))
    assert {"i2t_r1_itm", "t2i_r1_itm"} <= set(m)


def test_tower_selection_and_errors():
    vlm = make_tiny_random_clip().select_towers("vision")
    assert vlm.towers == ("vision",) and {pl.modality for pl in vlm.prunable_layers()} == {"vision"}
    with pytest.raises(ModelError, match="no tower fusion; towers: vision, text"):
        make_tiny_random_clip().select_towers("fusion")


def _llava_folder(tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=64))
    m = LlavaForConditionalGeneration(cfg)
    m.save_pretrained(tmp_path / "llava")
    return tmp_path / "llava", m


def test_llava_vision_tower_loads_its_weights(tmp_path):
    folder, full = _llava_folder(tmp_path)
    vlm = load_model(str(folder), tower="vision")
    assert vlm.family == "clip_vision_model" and vlm.feature_layer == -2
    ref = full.model.vision_tower.state_dict()
    for k, v in vlm.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # the whole model is the llava family now: a folder without its tokenizer is refused
    with pytest.raises(ModelError, match="llava model .* has no tokenizer"):
        load_model(str(folder))


def test_prune_export_llava_vision_tower_cli(tmp_path):
    folder, _ = _llava_folder(tmp_path)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", str(folder), "--tower", "vision",
                                   "--out", str(out), "--calibration-size", "8", "--eval-size", "8",
                                   "--batch-sizes", "1", "--iterations", "2"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["accuracy"]["metrics"] == {} and 0 < rep["accuracy"]["fidelity"]["image_cosine"] <= 1
    assert {r["tower"] for r in rep["latency"]} == {"vision"}
    assert (out / "pruned" / "vision.onnx").is_file() and not (out / "pruned" / "text.onnx").exists()


def test_missing_tower_is_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["prune-export", "--tower", "fusion", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "towers: vision, text" in res.stderr and "Traceback" not in res.output
