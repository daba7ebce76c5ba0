"""Visual token reduction (``--visual-tokens K``, VisionZip): the reduction itself, its
identity between the PyTorch evaluation path and ``vision.onnx``, the prompts' image token
count, the run's four variants, and the bad-input lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from llava_factory import make_tiny_llava_folder, make_tiny_llava_model
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.data import load_eval
from vlcompress.errors import ConfigError
from vlcompress.exporters.generative import export_generative
from vlcompress.models import load_model
from vlcompress.models.visual_tokens import (
    attention_scores,
    check_visual_tokens,
    image_features,
    position_ids,
    reduced_tokens,
    split_tokens,
    tower_tokens,
    visionzip,
)
from vlcompress.runtime.ort_generate import OrtGenerator, prompt_inputs


def _images(n):
    return list(load_eval("shapes", n=n, batch_size=n).images)


def test_split_follows_visionzip_ratio():
    assert split_tokens(64) == (54, 10) and split_tokens(128) == (108, 20)
    assert split_tokens(192) == (162, 30) and split_tokens(1) == (1, 0) and split_tokens(2) == (1, 1)
    assert split_tokens(9) == (7, 2) and split_tokens(182) == (153, 29)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_recomputed_attention_equals_the_towers_own(vision):
    """The score is the [CLS] row summed over heads (CLIP) or the attention received, averaged
    over heads and queries (SigLIP), of the towers' own eager attention weights."""
    model, _ = make_tiny_llava_model(0, vision)
    model.config.vision_config._attn_implementation = "eager"
    px = torch.randn(2, 3, 32, 32)
    tower = model.model.vision_tower
    out = tower(px, output_hidden_states=True, output_attentions=True, return_dict=True)
    enc = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
    score, keys = attention_scores(enc.layers[1], out.hidden_states[1], vision == "clip")
    a = out.attentions[1]
    ref = a.sum(1)[:, 0] if vision == "clip" else a.mean(1).mean(1)
    assert torch.allclose(score, ref, atol=1e-6) and keys.shape == (2, 17 if vision == "clip"
                                                                    else 16, 8)


def test_visionzip_keeps_dominant_in_order_and_merges_the_rest():
    """Hand-checkable case: the top scores are kept in spatial order; the rest are merged onto
    uniformly spaced targets by key similarity, target + mean of its members."""
    feats = torch.arange(16, dtype=torch.float32).view(1, 16, 1).repeat(1, 1, 2)
    score = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6] + [20.0 - i for i in range(10)]])
    metric = torch.ones(1, 16, 2)
    metric[0, :6] = torch.tensor([[1.0, 0], [1, 0.1], [0.1, 1], [0, 1], [0.2, 1], [1, 0.2]])
    assert split_tokens(12) == (10, 2)
    out = visionzip(feats, score, metric, 12)
    assert out.shape == (1, 12, 2)
    assert out[0, :10, 0].tolist() == [float(i) for i in range(6, 16)]  # spatial order
    # remaining tokens 0..5; targets every 3rd: tokens 0 and 3; 1, 5 join 0 and 2, 4 join 3
    assert out[0, 10, 0].item() == pytest.approx(0 + (1 + 5) / 2)
    assert out[0, 11, 0].item() == pytest.approx(3 + (2 + 4) / 2)
    _, index = visionzip(feats, score, metric, 12, with_index=True)
    assert index[0].tolist() == list(range(6, 16)) + [0, 3]
    # [CLS] kept first under "full", whatever its score
    out1 = visionzip(feats, -score, metric, 12, keep_first=True)
    assert out1[0, 0, 0].item() == 0.0
    assert torch.equal(visionzip(feats, score, metric, 16), feats)  # K = all: unchanged
    # batched rows choose their own tokens
    both = visionzip(torch.cat([feats, feats]), torch.cat([score, score.flip(1)]),
                     torch.cat([metric, metric]), 12)
    assert torch.equal(both[:1], out) and both[1, 0, 0].item() == 0.0


@pytest.mark.parametrize("vision,text", [("clip", "llama"), ("siglip", "qwen2")])
def test_vision_onnx_keeps_k_tokens_and_generates_like_torch(tmp_path, vision, text):
    """The token-reduced vision.onnx equals the PyTorch path; greedy generation on ONNX
    Runtime with K-token prompts equals PyTorch's generate with the reduction installed; the
    variant shares its twin's embed and decoder."""
    vlm = load_model(str(make_tiny_llava_folder(tmp_path, seed=1, vision=vision, text=text)))
    full = tower_tokens(vlm.model.config)
    assert full == 16
    images, qs = _images(4), [None, "what color is it ?", "where is it ?", None]
    export_generative(vlm, tmp_path / "dense", images=images[:1], max_new_tokens=4)
    res = export_generative(vlm, tmp_path / "dense_tokens", images=images, questions=qs,
                            max_new_tokens=8, visual_tokens=4, reuse=tmp_path / "dense")
    assert res.validation["token_exact"] == 1.0 and res.validation["max_abs_diff"]["vision"] < 1e-4
    spec = json.loads((tmp_path / "dense_tokens" / "generation.json").read_text())
    assert spec["image_tokens"] == 4 and spec["tower_tokens"] == 16
    assert spec["visual_tokens"] == {"method": "visionzip", "kept": 4, "of": 16, "dominant": 3,
                                     "contextual": 1, "positions": "original"}
    assert spec["files"]["decoder"] == "../dense/decoder.onnx"
    assert not (tmp_path / "dense_tokens" / "decoder.onnx").exists()
    gen = OrtGenerator(tmp_path / "dense_tokens")
    px = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got, index = gen.image_outputs(px)
    assert got.shape[:2] == (2, 4) and index.shape == (2, 4)
    ref, ref_index = image_features(vlm.model, torch.from_numpy(px), 4, with_index=True)
    assert np.abs(got - ref.detach().numpy()).max() < 1e-4
    assert np.array_equal(index, ref_index.numpy()) and index.max() < 16
    enc = prompt_inputs(vlm.processor, [vlm.prompt(q) for q in qs], images, image_tokens=4)
    n_img = (enc["input_ids"] == spec["image_token_id"]).sum(1)
    assert n_img.tolist() == [4] * 4
    toks = gen.generate(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], 8)
    with reduced_tokens(vlm.model, vlm.processor, 4):
        want = vlm.generate(images, qs, max_new_tokens=8)
    assert toks == want and sum(map(len, toks)) >= 8
    # outside the context nothing is left installed: full prompts again
    assert "get_image_features" not in vlm.model.model.__dict__
    full_enc = prompt_inputs(vlm.processor, [vlm.prompt(None)], images[:1])
    assert int((full_enc["input_ids"] == spec["image_token_id"]).sum()) == 16


def test_reduction_changes_what_the_decoder_sees(tmp_path):
    """The reduced path is not the full one: fewer embeddings, and a forward pass with the
    reduction installed reads K image tokens (a prompt with the full count is refused)."""
    vlm = load_model(str(make_tiny_llava_folder(tmp_path, seed=2)))
    batch = next(iter(load_eval("shapes", n=2, batch_size=2).batches()))
    with reduced_tokens(vlm.model, vlm.processor, 5):
        enc = vlm.encode(batch)
        assert int((enc["input_ids"] == vlm.model.config.image_token_index).sum()) == 10
        red = vlm.logits(enc)
        pos = enc["position_ids"]
    full = vlm.logits(vlm.encode(batch))
    assert red.shape[1] == full.shape[1] - 11  # 16 image tokens per prompt became 5
    # the kept tokens sit where the full prompt had them: positions run 11 past the length
    assert int(pos.max()) == int(enc["attention_mask"].sum(1).max()) - 1 + 11
    with reduced_tokens(vlm.model, vlm.processor, 5, keep_positions=False):  # VisionZip's
        enc2 = vlm.encode(batch)
        assert int(enc2["position_ids"].max()) == int(enc2["attention_mask"].sum(1).max()) - 1
        assert not torch.allclose(vlm.logits(enc2), red)


def test_position_ids_put_kept_tokens_where_the_full_prompt_had_them():
    """T = 6 tokens per image, K = 2 kept: with all 6 the row reads text at 0, image at 1..6,
    text at 7, 8; the kept tokens (indices 1 and 4) sit at 2 and 5, the text after at 7, 8.
    Left padding stays 0; a second row with two images shifts after each block."""
    img = 9
    ids = np.array([[0, 5, img, img, 5, 5, 5, 5],
                    [5, img, img, 5, img, img, 5, 5]])
    mask = np.array([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])
    index = np.array([[1, 4], [0, 5], [2, 3]])
    pos = position_ids(ids, mask, img, index, 6)
    assert pos[0].tolist() == [0, 0, 2, 5, 7, 8, 9, 10]
    # row 1: image 1 at 1..6 (kept 0, 5 -> 1, 6), text 7, image 2 at 8..13 (kept 2, 3)
    assert pos[1].tolist() == [0, 1, 6, 7, 10, 11, 14, 15]
    # K = T: the contiguous positions
    full = position_ids(ids[:1, :4], mask[:1, :4], img, np.array([[0, 1]]), 2)
    assert full.tolist() == [[0, 0, 1, 2]]


def test_check_visual_tokens_bounds():
    assert check_visual_tokens(36, 36) == 36
    for bad in (0, 37, -1, True, 2.5):
        with pytest.raises(ConfigError, match="allowed: 1..36"):
            check_visual_tokens(bad, 36, "tiny-llava")


@pytest.mark.parametrize("args,message", [
    (["--model", "tiny-llava", "--visual-tokens", "0"], "--visual-tokens 0 is not valid"),
    (["--model", "tiny-llava", "--visual-tokens", "37"],
     "--visual-tokens 37 is not valid: the vision tower of tiny-llava produces 36 tokens"),
    (["--model", "tiny-clip", "--visual-tokens", "4"], "tiny-clip (clip) is not one"),
])
def test_bad_visual_tokens_is_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", *args, "--method", "magnitude",
                                   "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.output, res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_prune_export_with_visual_tokens_reports_four_variants(tmp_path):
    """The issue's command (2:4, K a quarter of tiny-llava's 36 tokens): four validated
    variants, their accuracy, and `generate --reduced-tokens` from the exported files."""
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", "tiny-llava", "--method",
                                   "sparsegpt", "--pattern", "2:4", "--visual-tokens", "9",
                                   "--out", str(out), "--calibration-size", "8",
                                   "--eval-size", "4", "--max-new-tokens", "8",
                                   "--batch-sizes", "1", "--iterations", "2"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    gen = rep["export"]["generative"]
    assert set(gen) == {"dense", "pruned", "dense_tokens", "pruned_tokens"}
    for v in gen.values():
        assert v["validation"]["token_exact"] == 1.0
    assert gen["pruned_tokens"]["paths"] == {"vision": "pruned_tokens/vision.onnx",
                                             "embed": "pruned/embed.onnx",
                                             "decoder": "pruned/decoder.onnx"}
    assert gen["dense_tokens"]["visual_tokens"]["kept"] == 9
    acc = rep["accuracy"]
    assert set(acc["variants"]) == set(gen) and acc["visual_tokens"]["of"] == 36
    assert acc["variants"]["dense"]["fidelity"]["greedy_agreement"] == 1.0
    assert "vqa_accuracy" in acc["variants"]["pruned_tokens"]["metrics"]
    assert rep["config"]["visual_tokens"] == 9
    md = (out / "report.md").read_text()
    assert "Visual tokens" in md and "pruned_tokens" in md
    img = tmp_path / "x.png"
    _images(1)[0].save(img)
    vlm = load_model(str(out / "pruned" / "model"))
    with reduced_tokens(vlm.model, vlm.processor, 9):
        want = vlm.decode(vlm.generate(_images(1), ["what color is it ?"], max_new_tokens=8))[0]
    r = CliRunner().invoke(app, ["generate", str(out), "--image", str(img), "--prompt",
                                 "what color is it ?", "--max-new-tokens", "8",
                                 "--reduced-tokens"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == want


def test_reduced_tokens_on_genai_is_one_line(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"model": {"name": "x",
                                                                "generative": True}}))
    res = CliRunner().invoke(app, ["generate", str(tmp_path), "--image", "x.png", "--prompt",
                                   "hi", "--reduced-tokens", "--runtime", "genai"])
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--reduced-tokens needs --runtime onnxruntime" in lines[0]


def test_token_variants_get_precision_twins_in_prune_export(tmp_path):
    """--visual-tokens with --quantize int8: dense_tokens_int8/ and pruned_tokens_int8/ beside
    dense_int8/ and pruned_int8/ (their vision graph int8, the text graphs their twin's),
    validated, evaluated from their files and timed."""
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", "tiny-llava", "--method",
                                   "magnitude", "--visual-tokens", "9", "--quantize", "int8",
                                   "--quantize-method", "dynamic", "--out", str(out),
                                   "--calibration-size", "8", "--eval-size", "4",
                                   "--max-new-tokens", "6", "--batch-sizes", "1",
                                   "--iterations", "3"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    gen = rep["export"]["generative"]
    names = {"dense_int8", "pruned_int8", "dense_tokens_int8", "pruned_tokens_int8"}
    assert set(gen) == {"dense", "pruned", "dense_tokens", "pruned_tokens"} | names
    assert gen["pruned_tokens_int8"]["paths"] == {"vision": "pruned_tokens_int8/vision.onnx",
                                                  "embed": "pruned_int8/embed.onnx",
                                                  "decoder": "pruned_int8/decoder.onnx"}
    v = gen["dense_tokens_int8"]["validation"]
    assert v["precision"] == "int8" and "kept_agreement" in v["logits"]["vision"]
    q = rep["quantize"]
    assert set(q["files"]) == set(q["validation"]) == names
    acc = q["accuracy"]["variants"]
    assert names <= set(acc)
    assert 0 <= acc["pruned_tokens_int8"]["fidelity_to_float_twin"]["greedy_agreement"] <= 1
    timed = {name for row in rep["latency"] for name in row.get("variants", {})}
    assert names <= timed, timed
