"""Structured pruning of LLaVA: the decoder's query heads (grouped-query consistent) and gated
MLP neurons, and the CLIP/SigLIP vision tower, sliced into a smaller dense model that equals
the masked one and reloads with identical logits; on tiny random LLaVAs and on tiny-llava."""

from __future__ import annotations

import copy

import pytest
import torch
from llava_factory import make_tiny_llava_folder

from vlcompress.data import load_calibration
from vlcompress.models import load_model
from vlcompress.models.surgery import find_blocks, read_manifest
from vlcompress.prune import prune
from vlcompress.sparsity.apply import apply_masks
from vlcompress.sparsity.structured import keep_heads, round_heads


@pytest.fixture(scope="module")
def calib():
    return load_calibration("shapes", n=4, batch_size=2)


def _decoder_blocks(vlm):
    return [b for b in find_blocks(vlm) if b.modality == "language"]


def _check_sliced(dense, vlm, res, calib, tmp_path):
    """sliced == masked dense, != dense; GQA groups even; reload gives identical logits."""
    enc = dense.encode(next(iter(calib.batches())))
    masked = copy.deepcopy(dense)
    apply_masks(masked.prunable_layers(), res.masks)
    ref, got = masked.logits(enc), vlm.logits(enc)
    assert torch.allclose(ref, got, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(dense.logits(enc), got, atol=1e-3)
    for layer in vlm.model.model.language_model.layers:
        attn = layer.self_attn
        heads = attn.q_proj.out_features // attn.head_dim
        kv = attn.k_proj.out_features // attn.head_dim
        assert heads % kv == 0 and attn.num_key_value_groups == heads // kv
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features \
            == layer.mlp.down_proj.in_features
    vlm.save(tmp_path / "m")
    man = read_manifest(tmp_path / "m")
    assert man is not None and "llama-decoder" in man["stacks"]["model.language_model.layers"]["layouts"]
    back = load_model(str(tmp_path / "m"))
    assert torch.equal(back.logits(enc), got)
    assert back.generate(next(iter(calib.batches())).images, max_new_tokens=4) == \
        vlm.generate(next(iter(calib.batches())).images, max_new_tokens=4)


@pytest.mark.parametrize("method,vision,text,parts", [
    ("wanda", "clip", "llama", ("language",)),
    ("magnitude", "siglip", "qwen2", ("vision", "bridge", "language")),
    ("multiflow", "clip", "llama", ("vision", "bridge", "language")),
])
def test_structured_slices_reloads_and_keeps_groups(tmp_path, calib, method, vision, text, parts):
    folder = make_tiny_llava_folder(tmp_path, vision=vision, text=text)
    dense = load_model(str(folder))
    vlm = copy.deepcopy(dense)
    res = prune(vlm, method, 0.5, "structured", calibration=calib, scope=parts)
    layers = res.details["structured"]["layers"]
    dec = {p: v for p, v in layers.items() if v["modality"] == "language"}
    assert dec and all(v["heads"][0] % 2 == 0 and v["heads"][0] < v["heads"][1] for v in dec.values())
    assert any(v["mlp"][0] < v["mlp"][1] for v in dec.values())
    assert ("vision" in parts) == any(v["modality"] == "vision" for v in layers.values())
    assert res.per_modality.get("bridge", 0.0) == 0.0  # the projector has no groups: stays
    _check_sliced(dense, vlm, res, calib, tmp_path)


def test_gqa_heads_kept_evenly_per_group(tmp_path):
    vlm = load_model(str(make_tiny_llava_folder(tmp_path)))
    b = _decoder_blocks(vlm)[0]
    assert (b.num_heads, b.kv_groups) == (4, 2)
    # head 1 and head 2 score highest, one in each group: each group keeps its best
    assert keep_heads(b, torch.tensor([0.0, 5.0, 4.0, 1.0]), 2).tolist() == [1, 2]
    # heads 0 and 1 (both group 0) score highest: group 1 still keeps one (head 3)
    assert keep_heads(b, torch.tensor([9.0, 8.0, 0.0, 1.0]), 2).tolist() == [0, 3]
    with pytest.raises(ValueError, match="evenly"):
        keep_heads(b, torch.zeros(4), 3)
    assert round_heads(3.4, 4, 8, 8, groups=2) == 4 and round_heads(2.6, 4, 8, 8, groups=2) == 2
    assert round_heads(0.2, 4, 8, 8, groups=2) == 2  # at least one query head per group


def test_tiny_llava_structured_decoder(tmp_path, calib):
    dense = load_model("tiny-llava")
    vlm = copy.deepcopy(dense)
    res = prune(vlm, "wanda", 0.3, "structured", calibration=calib, scope=("language",))
    dec = _decoder_blocks(vlm)
    assert len(dec) == 4 and all(b.num_heads % b.kv_groups == 0 for b in dec)
    assert all(b.mlp_width < 352 for b in dec)
    assert 0.1 < res.per_modality["language"] < 0.4
    _check_sliced(dense, vlm, res, calib, tmp_path)


def _prune_export_language(tmp_path, *options):
    """``prune-export`` of a tiny LLaVA folder, language part only, on a 4-pair captions
    folder; returns the CLI result and the run folder."""
    from typer.testing import CliRunner

    from vlcompress.cli import app
    from vlcompress.data import load_eval, save_pairs

    folder = make_tiny_llava_folder(tmp_path)
    pairs = load_eval("shapes", n=4, batch_size=4)
    caps = save_pairs(pairs, tmp_path / "caps", captions=pairs.retrieval_captions)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "prune-export", "--model", str(folder), "--method", "wanda", *options,
        "--parts", "language", "--calibration", str(caps),
        "--calibration-size", "4", "--eval-size", "4", "--max-new-tokens", "4",
        "--batch-sizes", "1", "--iterations", "2", "--out", str(out)])
    return res, out


def test_prune_export_structured_language_reloads(tmp_path):
    import json

    res, out = _prune_export_language(tmp_path, "--pattern", "structured", "--sparsity", "0.5")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["prune"]["per_modality"]) == {"language"}
    assert rep["prune"]["per_modality"]["language"] > 0.2
    back = load_model(str(out / "pruned" / "model"))
    assert all(b.num_heads == 2 for b in _decoder_blocks(back))


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.8), ("structured", 0.5)])
def test_recover_distils_next_token_logits_and_keeps_the_pattern(tmp_path, calib, pattern,
                                                                 sparsity):
    from vlcompress.distill import distill_gap, zero_masks
    from vlcompress.recover import recover

    dense = load_model(str(make_tiny_llava_folder(tmp_path)))
    vlm = copy.deepcopy(dense)
    prune(vlm, "magnitude", sparsity, pattern, calibration=calib, scope=("language",))
    masks = zero_masks(vlm)
    before = distill_gap(vlm, dense, calib)
    res = recover(vlm, steps=30, teacher=dense, data=calib, lr=1e-3, evaluate=False)
    assert res.pattern_preserved and before > 0
    assert distill_gap(vlm, dense, calib) < 0.8 * before
    if pattern == "unstructured":
        named = dict(vlm.model.named_parameters())
        assert masks and all(not bool(named[f"{n}.weight"][~m].any()) for n, m in masks.items())


def test_prune_export_recover_steps_on_a_generative_model(tmp_path):
    import json

    from typer.testing import CliRunner

    from vlcompress.cli import app

    res, out = _prune_export_language(tmp_path, "--pattern", "2:4", "--recover-steps", "3")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    rec = rep["prune"]["details"]["recover"]
    assert rec["steps"] == 3 and rec["pattern_preserved"] and len(rec["losses"]) == 3
    assert rec["data"]["source"].endswith("caps")
    # `vlcompress recover RUN_DIR` on the generative run: generative metrics and fidelity
    res = CliRunner().invoke(app, ["recover", str(out), "--steps", "2", "--batch-size", "2",
                                   "--size", "4", "--eval-size", "4"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "recover.json").read_text())
    m = doc["metrics"]
    assert {"attribute_accuracy", "cider"} <= set(m["dense"]) and doc["pattern_preserved"]
    assert set(m["fidelity"]["recovered"]) >= {"token_kl", "greedy_agreement"}
    assert "attribute_accuracy: dense" in res.output
    assert load_model(str(out / "recovered" / "model")).family == "llava"


# --------------------------------------------------------------------------------------------
# whole key/value groups (--method-option kv_groups=whole|auto)
# --------------------------------------------------------------------------------------------
def test_keep_heads_kv_chooses_groups_by_score(tmp_path):
    from vlcompress.sparsity.structured import keep_heads_kv, round_gqa_heads

    vlm = load_model(str(make_tiny_llava_folder(tmp_path)))
    b = _decoder_blocks(vlm)[0]  # 4 query heads in 2 groups of 2
    s = torch.tensor([1.0, 2.0, 9.0, 8.0])
    hk, kv, mode = keep_heads_kv(b, s, 2, "whole")
    assert (hk.tolist(), kv.tolist(), mode) == ([2, 3], [1], "whole")
    # the k/v heads' own scores can outweigh the query heads': group 0 wins
    hk, kv, _ = keep_heads_kv(b, s, 2, "whole", kv_scores=torch.tensor([100.0, 0.0]))
    assert (hk.tolist(), kv.tolist()) == ([0, 1], [0])
    assert keep_heads_kv(b, s, 2, "within")[1:] == (None, "within")
    # auto: group 0's heads are both weak -> dropping the group (with its k/v) is cheaper per
    # removed weight than one head from each group; strong heads in both groups -> within
    assert keep_heads_kv(b, torch.tensor([0.1, 0.1, 9.0, 8.0]), 2, "auto",
                         kv_scores=torch.tensor([0.0, 5.0]))[2] == "whole"
    assert keep_heads_kv(b, torch.tensor([0.1, 9.0, 0.1, 9.0]), 2, "auto",
                         kv_scores=torch.tensor([5.0, 5.0]))[2] == "within"
    # rounding: 'whole' keeps multiples of the group size, 'within' of the group count
    assert round_gqa_heads(3.4, b, 8, "whole") == 4 and round_gqa_heads(1.2, b, 8, "whole") == 2


def _mha_block(tmp_path):
    """A multi-head decoder block seen as 4 groups of one head (the llava-1.5-7b case)."""
    vlm = load_model(str(make_tiny_llava_folder(tmp_path)))
    b = _decoder_blocks(vlm)[0]
    attn = b.attn
    # give the layer as many k/v heads as query heads (MHA): copy q's shape into k and v
    for lin in (attn.k_proj, attn.v_proj):
        lin.weight = torch.nn.Parameter(torch.randn(attn.q_proj.out_features, lin.in_features))
        lin.out_features = attn.q_proj.out_features
    attn.num_key_value_groups = 1
    return b


def test_multi_head_attention_loses_heads_only_as_whole_groups(tmp_path):
    from vlcompress.sparsity.structured import round_gqa_heads

    b = _mha_block(tmp_path)
    assert (b.num_heads, b.kv_groups) == (4, 4)
    assert round_gqa_heads(2.0, b, 8, "within") == 4  # one query head per group: none can go
    assert round_gqa_heads(2.0, b, 8, "whole") == 2 and round_gqa_heads(2.0, b, 8, "auto") == 2


@pytest.mark.parametrize("mode", ["whole", "auto"])
def test_kv_groups_whole_slices_kv_projections_reloads_and_exports(tmp_path, calib, mode):
    import json

    from vlcompress.exporters.generative import export_generative

    folder = make_tiny_llava_folder(tmp_path, seed=3)
    dense = load_model(str(folder))
    vlm = copy.deepcopy(dense)
    res = prune(vlm, "wanda", 0.5, "structured", calibration=calib, scope=("language",),
                method_options={"kv_groups": mode})
    st = res.details["structured"]
    assert st["kv_groups"] == mode
    for b, v in zip(_decoder_blocks(vlm), [v for v in st["layers"].values()
                                           if v["modality"] == "language"], strict=True):
        assert v["heads"] == [2, 4] and b.num_heads == 2
        whole = v["kv_groups"] == "whole"
        assert v["kv_heads"] == ([1, 2] if whole else [2, 2]) and b.kv_groups == v["kv_heads"][0]
        assert b.attn.num_key_value_groups == (2 if whole else 1)
    if mode == "whole":
        kv = [n for n in res.masks if n.endswith("self_attn.k_proj")]
        assert kv and all(res.masks[n].float().mean() == 0.5 for n in kv)
    _check_sliced(dense, vlm, res, calib, tmp_path)
    man = read_manifest(tmp_path / "m")
    heads = [ly["num_key_value_heads"] for ly in man["stacks"]["model.language_model.layers"]["layers"]]
    assert heads == [b.kv_groups for b in _decoder_blocks(vlm)]
    if mode == "whole":
        out = tmp_path / "onnx"
        exp = export_generative(load_model(str(tmp_path / "m")), out,
                                images=next(iter(calib.batches())).images, max_new_tokens=4)
        assert exp.validation["token_exact"] == 1.0
        assert json.loads((out / "generation.json").read_text())["num_key_value_heads"] == 1


def test_layers_with_different_kv_heads_export_per_layer_caches(tmp_path, calib):
    import json

    from vlcompress.exporters.generative import export_generative
    from vlcompress.models.surgery import slice_block

    vlm = load_model(str(make_tiny_llava_folder(tmp_path, seed=5)))
    b0 = _decoder_blocks(vlm)[0]
    slice_block(b0, heads_keep=torch.tensor([2, 3]), kv_keep=torch.tensor([1]))
    assert [b.kv_groups for b in _decoder_blocks(vlm)] == [1, 2]
    out = tmp_path / "onnx"
    exp = export_generative(vlm, out, images=next(iter(calib.batches())).images, max_new_tokens=4)
    assert exp.validation["token_exact"] == 1.0
    assert json.loads((out / "generation.json").read_text())["num_key_value_heads"] == [1, 2]
    # GenAI's config has one KV head count for all layers: refused in one line, not truncated
    from vlcompress.errors import ExportError
    from vlcompress.runtime.genai_generate import genai_config

    with pytest.raises(ExportError, match=r"has \[1, 2\].*allowed: the onnxruntime generator"):
        genai_config(out)


@pytest.mark.parametrize("method,pattern,model,needle", [
    ("wanda", "2:4", "llava", "kv_groups=whole removes whole key/value groups of a structured"),
    ("upop", "structured", "llava", "not available with 'upop'"),
    ("wanda", "structured", "tiny-clip", "has none in scope"),
])
def test_kv_groups_refused_where_it_cannot_apply(tmp_path, calib, method, pattern, model, needle):
    from vlcompress.errors import ConfigError

    vlm = load_model(str(make_tiny_llava_folder(tmp_path)) if model == "llava" else model)
    before = [p.detach().clone() for p in vlm.model.parameters()]
    with pytest.raises(ConfigError, match=needle):
        prune(vlm, method, None if pattern == "2:4" else 0.5, pattern, calibration=calib,
              method_options={"kv_groups": "whole"})
    assert all(torch.equal(a, p) for a, p in zip(before, vlm.model.parameters(), strict=True))
    with pytest.raises(ConfigError, match=r"kv_groups='some'.*within\|whole\|auto"):
        prune(vlm, "wanda", 0.5, "structured", method_options={"kv_groups": "some"})


def test_prune_export_kv_groups_whole_reloads(tmp_path):
    import json

    res, out = _prune_export_language(tmp_path, "--pattern", "structured", "--sparsity", "0.5",
                                      "--method-option", "kv_groups=whole")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["prune"]["per_modality"]["language"] > 0.3  # k/v rows went too
    back = load_model(str(out / "pruned" / "model"))
    assert all((b.num_heads, b.kv_groups) == (2, 1) for b in _decoder_blocks(back))
