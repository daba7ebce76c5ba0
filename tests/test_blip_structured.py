"""Structured pruning of BLIP: heads across the vision encoder's fused qkv, the text layers'
self-attention and cross-attention heads (key/value read image tokens of the vision width)
and MLP neurons, sliced, verified against the masked model, saved and reloaded; UPop and
EfficientVLM search over them; the text decoder of ``BlipForConditionalGeneration`` (the
same ``BlipTextLayer``) slices and reloads too. Tiny random configs built offline, with the
vision width (48) unlike the text width (32) so cross-attention shapes are checked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import set_option_defaults
from typer.testing import CliRunner

from vlcompress.data import load_calibration
from vlcompress.models import load_model
from vlcompress.models.surgery import (
    find_blocks,
    is_sliced,
    load_sliced,
    read_manifest,
    slice_block,
    write_manifest,
)
from vlcompress.prune import prune
from vlcompress.sparsity.structured import (
    _group_sizes,
    group_scores_from_weights,
    probe_inputs,
    tower_outputs,
    weight_masks,
)

VISION, TEXT, HEADS = 48, 32, 4


def _configs(vocab: int, layers: int = 2):
    vision = dict(hidden_size=VISION, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=HEADS, image_size=32, patch_size=8,
                  initializer_range=0.02)  # BLIP's default 1e-10 makes every check vacuous
    text = dict(vocab_size=vocab, hidden_size=TEXT, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=HEADS, max_position_embeddings=16, encoder_hidden_size=VISION,
                pad_token_id=0, bos_token_id=2, eos_token_id=3, sep_token_id=3)
    return text, vision


def tiny_blip(seed: int = 0, layers: int = 2):
    """A random ``BlipForImageTextRetrieval`` adapter, vision 48 wide, text 32 wide."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    from vlcompress.data.tokenizer import build_shapes_tokenizer
    from vlcompress.models.blip import BLIP

    torch.manual_seed(seed)
    tok = build_shapes_tokenizer()
    text, vision = _configs(len(tok), layers)
    cfg = BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)
    img = BlipImageProcessor(size={"height": 32, "width": 32})
    return BLIP(BlipForImageTextRetrieval(cfg).eval(), tok, img, name="tiny-blip", source="test")


def tiny_caption_model(seed: int = 0):
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(seed)
    text, vision = _configs(40)
    cfg = BlipConfig(text_config=text, vision_config=vision)
    return BlipForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def calib():
    return load_calibration("shapes", n=16, batch_size=8)


def _diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_blocks_cover_fused_qkv_self_and_cross_attention():
    vlm = tiny_blip()
    blocks = {b.prefix: b for b in find_blocks(vlm)}
    assert len(blocks) == 6  # 2 vision layers, 2 text layers x (self + MLP, cross)
    v = blocks["vision_model.encoder.layers.0"]
    assert (v.layout.name, v.modality, v.num_heads, v.head_dim, v.mlp_width) == \
        ("blip-vision", "vision", 4, 12, 96)
    assert v.attn_roles == ("attn.qkv", "attn.o")
    t = blocks["text_encoder.encoder.layer.1"]
    assert (t.layout.name, t.modality, t.num_heads, t.head_dim, t.mlp_width) == \
        ("blip-text", "text", 4, 8, 64)
    x = blocks["text_encoder.encoder.layer.1.crossattention"]
    assert (x.modality, x.num_heads, x.head_dim, x.mlp_width, x.stack, x.index) == \
        ("fusion", 4, 8, 0, "text_encoder.encoder.layer", 1)
    # a head's weights: q rows read the text width, k/v rows the vision width, o columns
    assert _group_sizes(x) == (8 * (TEXT + VISION + VISION) + TEXT * 8, 0)
    assert _group_sizes(v) == (3 * 12 * VISION + VISION * 12, VISION + VISION)


def test_group_scores_of_fused_qkv_sum_each_third():
    vlm = tiny_blip()
    b = find_blocks(vlm)[0]
    scores = {ly.name: torch.rand(ly.weight.shape) for ly in b.linears.values()}
    heads, neurons = group_scores_from_weights(b, scores)
    qkv = scores[b.linears["attn.qkv"].name]
    o = scores[b.linears["attn.o"].name]
    for h in range(HEADS):
        rows = [c * VISION + h * 12 + j for c in range(3) for j in range(12)]
        want = qkv[rows].sum() + o[:, h * 12:(h + 1) * 12].sum()
        assert heads[h] == pytest.approx(float(want), rel=1e-5)
    assert neurons.shape == (96,)
    # a cross-attention unit has heads only
    x = next(b for b in find_blocks(vlm) if b.prefix.endswith("crossattention"))
    h, f = group_scores_from_weights(x, {ly.name: torch.rand(ly.weight.shape)
                                         for ly in x.linears.values()})
    assert h.shape == (HEADS,) and f.numel() == 0


def _uneven_slice(blocks):
    """Keep different heads / neurons per unit (not a prefix: order matters)."""
    g = torch.Generator().manual_seed(1)
    keep = {}
    for i, b in enumerate(blocks):
        hk = torch.randperm(b.num_heads, generator=g)[: 1 + i % b.num_heads].sort().values
        fk = torch.randperm(b.mlp_width, generator=g)[: max(1, b.mlp_width // (2 + i % 3))].sort().values \
            if b.has_mlp else None
        keep[b.prefix] = (hk, fk)
    return keep


@pytest.mark.parametrize("method", ["multiflow", "magnitude"])
def test_structured_prune_slices_verifies_and_reloads(method, calib, tmp_path):
    vlm = tiny_blip()
    res = prune(vlm, method, 0.5, "structured", calibration=calib, round_to=1)
    st = res.details["structured"]
    assert set(st["verify_max_abs_diff"]) == {"vision", "text", "fusion"}
    assert "text_encoder.encoder.layer.0.crossattention" in st["layers"]
    assert res.achieved == pytest.approx(0.5, abs=0.1)
    m = vlm.model
    assert sum(p.numel() for p in m.parameters()) < sum(
        p.numel() for p in tiny_blip().model.parameters())
    for layer in m.text_encoder.encoder.layer:  # cross-attention keys still read the vision width
        assert layer.crossattention.self.key.in_features == VISION
    vlm.save(tmp_path)
    man = read_manifest(tmp_path)
    assert man["stacks"]["text_encoder.encoder.layer"]["layouts"] == ["blip-text", "blip-text-cross"]
    again = load_model(tmp_path)
    assert is_sliced(again) and type(again.model).__name__ == "BlipForImageTextRetrieval"
    probe = probe_inputs(vlm)
    assert _diff(tower_outputs(vlm, probe), tower_outputs(again, probe)) == 0.0
    readme = (tmp_path / "README.md").read_text()
    assert "crossattention heads" in readme and "apply_manifest" in readme


def test_uneven_hand_slicing_equals_masking_and_generic_snippet_loads(tmp_path):
    vlm = tiny_blip()
    blocks = find_blocks(vlm)
    keep = _uneven_slice(blocks)
    probe = probe_inputs(vlm)
    with torch.no_grad():
        for b in blocks:
            hk, fk = keep[b.prefix]
            for ly in b.linears.values():
                w = weight_masks(b, hk, fk if fk is not None else torch.arange(b.mlp_width))
                ly.module.weight.mul_(w[ly.name])
    masked = tower_outputs(vlm, probe)
    for b in blocks:
        slice_block(b, *keep[b.prefix])
    sliced = tower_outputs(vlm, probe)
    assert _diff(masked, sliced) < 1e-5
    assert [b.num_heads for b in find_blocks(vlm)] == [len(keep[b.prefix][0]) for b in blocks]
    vlm.save(tmp_path)
    code = (tmp_path / "README.md").read_text().split("```python\n")[2].split("```")[0]
    ns: dict = {}
    exec(code.replace("path/to/this/folder", str(tmp_path)), ns)  # noqa: S102 - our own text
    vlm.model = ns["model"].eval()
    assert _diff(sliced, tower_outputs(vlm, probe)) == 0.0


def test_caption_decoder_text_layers_slice_and_reload(tmp_path):
    """``BlipTextLayer`` of the captioning decoder (``text_decoder.bert``): same layouts."""
    from transformers import BlipForConditionalGeneration

    from vlcompress.models.blip import blip_linears

    model = tiny_caption_model()
    shim = SimpleNamespace(model=model, family="blip", prunable_layers=lambda: blip_linears(model))
    blocks = find_blocks(shim)
    assert {b.stack for b in blocks} == {"vision_model.encoder.layers",
                                        "text_decoder.bert.encoder.layer"}
    assert sum(b.prefix.endswith("crossattention") for b in blocks) == 2
    torch.manual_seed(0)
    px = torch.randn(2, 3, 32, 32)
    ids = torch.randint(4, 40, (2, 7))
    keep = _uneven_slice(blocks)
    with torch.no_grad():
        for b in blocks:
            hk, fk = keep[b.prefix]
            masks = weight_masks(b, hk, fk if fk is not None else torch.arange(b.mlp_width))
            for ly in b.linears.values():
                ly.module.weight.mul_(masks[ly.name])
        masked = model(pixel_values=px, input_ids=ids.clone()).logits
        for b in blocks:
            slice_block(b, *keep[b.prefix])
        sliced = model(pixel_values=px, input_ids=ids.clone()).logits
    assert torch.isfinite(sliced).all() and (sliced - masked).abs().max() < 1e-4
    gen = model.generate(pixel_values=px[:1], input_ids=ids[:1, :2].clone(),
                         max_new_tokens=3)  # HF writes BOS into input_ids: copies
    assert gen.shape[1] >= 3  # generation with the KV cache runs on the sliced layers
    model.save_pretrained(tmp_path)
    assert write_manifest(shim, tmp_path) is not None
    again = load_sliced(tmp_path, BlipForConditionalGeneration, model.config)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=px, input_ids=ids.clone()).logits, sliced)


def test_gates_on_blip_modules_equal_masking():
    """The UPop / EfficientVLM hooks sit on BLIP's out-projections (vision ``projection``,
    ``attention.output.dense``, cross ``output.dense``) and fc2s: a zero gate equals a
    removed head or neuron."""
    from vlcompress.methods._search import GroupGates

    vlm = tiny_blip()
    blocks = find_blocks(vlm)
    probe = probe_inputs(vlm)
    gates = GroupGates(blocks, ("heads", "neurons"))
    assert set(gates.neurons) == {b.prefix for b in blocks if b.has_mlp}
    keep = {}
    with torch.no_grad():
        for b in blocks:
            gates.heads[b.prefix][1] = 0.0
            if b.has_mlp:
                gates.neurons[b.prefix][:5] = 0.0
            keep[b.prefix] = (torch.tensor([0, 2, 3]), torch.arange(min(5, b.mlp_width), b.mlp_width))
    with gates:
        gated = tower_outputs(vlm, probe)
    with torch.no_grad():
        for b in blocks:
            masks = weight_masks(b, *keep[b.prefix])
            for ly in b.linears.values():
                if ly.role.endswith(".o") or ly.role == "mlp.out":
                    ly.module.weight.mul_(masks[ly.name])
    assert _diff(gated, tower_outputs(vlm, probe)) < 1e-5


@pytest.mark.parametrize("method", ["upop", "efficientvlm"])
def test_search_methods_run_on_blip_and_reload(method, calib, monkeypatch, tmp_path):
    set_option_defaults(monkeypatch, "upop", search_steps=4, retrain_steps=2)
    set_option_defaults(monkeypatch, "efficientvlm", train_steps=30, retrain_steps=2)
    vlm = tiny_blip()
    res = prune(vlm, method, 0.5, "structured", calibration=calib, round_to=1)
    d = res.details[method]
    kept = d.get("kept_by_search") or d.get("kept_by_gates")
    assert set(kept) == {"vision", "text", "fusion"} and kept["fusion"]["neurons"] is None
    assert d["retrain"]["steps"] == 2
    assert res.achieved > 0.1
    vlm.save(tmp_path)
    again = load_model(tmp_path)
    probe = probe_inputs(vlm)
    out = tower_outputs(again, probe)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert _diff(tower_outputs(vlm, probe), out) == 0.0


@pytest.mark.parametrize("method", ["upop", "efficientvlm", "multiflow"])
def test_cli_prune_on_a_blip_folder(method, tmp_path):
    """``vlcompress prune`` on a saved BLIP folder: pruned, sliced, saved, reloadable."""
    from vlcompress.cli import app

    folder = tmp_path / "blip"
    tiny_blip(layers=1).save(folder)
    out = tmp_path / "pruned"
    res = CliRunner().invoke(app, [
        "prune", "--model", str(folder), "--method", method, "--pattern", "structured",
        "--sparsity", "0.5", "--round-to", "1", "--method-option", "search_steps=2",
        "--method-option", "retrain_steps=1", "--calibration-size", "8", "--out", str(out)]
        if method == "upop" else [
        "prune", "--model", str(folder), "--method", method, "--pattern", "structured",
        "--sparsity", "0.5", "--round-to", "1", "--calibration-size", "8", "--out", str(out),
        *(["--method-option", "train_steps=20", "--method-option", "retrain_steps=1"]
          if method == "efficientvlm" else [])])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "prune.json").read_text())["achieved"] > 0.1
    assert read_manifest(out) is not None and is_sliced(load_model(out))


@pytest.mark.slow
def test_prune_export_cli_upop_on_a_blip_folder(tmp_path):
    """``prune-export`` end to end on a saved BLIP folder: export of every tower (dense and
    sliced) and validation against PyTorch (about 90 s on a loaded 2-core machine)."""
    from vlcompress.cli import app

    folder = tmp_path / "blip"
    tiny_blip(layers=1).save(folder)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "prune-export", "--model", str(folder), "--method", "upop", "--pattern", "structured",
        "--sparsity", "0.5", "--round-to", "1", "--method-option", "search_steps=2",
        "--method-option", "retrain_steps=1", "--calibration-size", "8", "--eval-size", "8",
        "--batch-sizes", "1", "--iterations", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["prune"]["pattern"] == "structured" and rep["prune"]["method"] == "upop"
    assert max(rep["export"]["max_abs_diff"]["pruned"].values()) < 1e-4
    for tower in ("vision", "text", "fusion"):
        assert (out / "pruned" / f"{tower}.onnx").is_file(), tower
    assert is_sliced(load_model(out / "pruned" / "model"))


def test_onnx_export_of_sliced_blip_vision(tmp_path):
    from vlcompress.exporters.onnx import export_model

    vlm = tiny_blip(layers=1)
    for b in find_blocks(vlm):
        if b.modality == "vision":
            slice_block(b, torch.tensor([1, 3]), torch.arange(0, 96, 3))
    vlm.select_towers(("vision",))
    batches = iter(load_calibration("shapes", n=5, batch_size=3, seed=1).batches())
    res = export_model(vlm, tmp_path, next(batches), next(batches))
    assert set(res.paths) == {"vision"} and res.max_abs_diff["vision"] < 1e-4
