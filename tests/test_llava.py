"""The llava family: loading a hub-layout folder, prompts, data, pruning every part, and
the generative metrics, on tiny random LLaVA models built offline."""

from __future__ import annotations

import json

import pytest
import torch
from llava_factory import make_tiny_llava_folder

from vlcompress.data import load_calibration
from vlcompress.errors import ConfigError, DataError, ModelError
from vlcompress.models import load_model, peek_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_llava_folder(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def calib():
    return load_calibration("shapes", n=4, batch_size=2)


def test_parts_layers_and_sequences(folder, calib):
    vlm = load_model(str(folder))
    assert vlm.family == "llava" and vlm.towers == ("vision", "bridge", "language")
    layers = vlm.prunable_layers()
    by = {m: [ly for ly in layers if ly.modality == m] for m in vlm.towers}
    # vision_feature_layer -2 of 3 layers: the last vision layer never reaches the output
    assert {ly.block for ly in by["vision"]} == {0, 1} and len(by["bridge"]) == 2
    assert len(by["language"]) == 2 * 7 and {ly.role for ly in by["language"]} >= {"attn.k", "mlp.in"}
    assert "lm_head" not in {ly.name for ly in layers}
    batch = next(iter(calib.batches()))
    enc = vlm.encode(batch)
    tok = vlm.tokenizer
    img_id = tok.convert_tokens_to_ids("<image>")
    assert int((enc["input_ids"][0] == img_id).sum()) == 16  # (32 / 8)^2 patches, CLS dropped
    # the target positions predict exactly the caption and the end token
    nxt = enc["input_ids"][0][1:][enc["target_mask"][0][:-1]]
    assert tok.decode(nxt, skip_special_tokens=True).split() == batch.captions[0].split()
    assert tok.convert_ids_to_tokens(int(nxt[-1])) == "</s>"
    ids = vlm.generate(batch.images, max_new_tokens=3)
    assert len(ids) == 2 and all(len(s) <= 3 for s in ids)


def test_select_parts_and_refusals(folder, tmp_path):
    vlm = load_model(str(folder)).select_towers(("language",))
    assert {ly.modality for ly in vlm.prunable_layers()} == {"language"}
    cfg = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg["vision_config"]["model_type"] = "vit"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="vision tower is 'vit'; allowed: clip_vision_model"):
        peek_model(str(bad))
    notpl = tmp_path / "notpl"
    notpl.mkdir()
    for f in folder.iterdir():
        (notpl / f.name).write_bytes(f.read_bytes())
    (notpl / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(DataError, match="renders no image token"):
        load_model(str(notpl))


@pytest.mark.parametrize("vision,text", [("siglip", "qwen2")])
def test_siglip_qwen2_loads_and_prunes(tmp_path, calib, vision, text):
    from vlcompress.prune import prune

    vlm = load_model(str(make_tiny_llava_folder(tmp_path, vision=vision, text=text)))
    res = prune(vlm, "wanda", pattern="2:4", calibration=calib)
    assert set(res.per_modality) == {"vision", "bridge", "language"}
    assert all(abs(v - 0.5) < 1e-6 for v in res.per_modality.values())


def test_blockwise_captures_the_decoder_inputs_the_model_feeds_it(folder, calib):
    """The engine walks vision, bridge, then the decoder on its real inputs (image tokens from
    the vision tower, causal + padding masks, rotary positions): with nothing pruned, every
    layer's input statistics equal a whole-model pass's."""
    from vlcompress.blockwise import run_blockwise
    from vlcompress.calibrate import collect_stats

    vlm = load_model(str(folder))
    layers = vlm.prunable_layers()
    ref = collect_stats(vlm, calib, layers)
    got = {}
    run = run_blockwise(vlm, calib, layers, lambda b, st: got.update(st))
    assert set(got) == set(ref) and run.order[0] == "model.multi_modal_projector"
    for name, s in ref.items():
        assert got[name].tokens == s.tokens, name
        torch.testing.assert_close(got[name].sq_sum, s.sq_sum, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("wanda", "2:4"),
                                            ("multiflow", "unstructured"), ("sparsegpt", "2:4")])
def test_every_method_prunes_every_part(folder, calib, method, pattern):
    from vlcompress.prune import prune

    vlm = load_model(str(folder))
    res = prune(vlm, method, pattern=pattern, calibration=calib)
    assert set(res.per_modality) == {"vision", "bridge", "language"}
    assert abs(res.achieved - 0.5) < 0.01
    assert all(v > 0.1 for v in res.per_modality.values())  # magnitude: one global threshold
    for ly in vlm.prunable_layers():
        assert bool((ly.weight == 0).any()), ly.name
    if pattern == "2:4":
        w = vlm.model.get_submodule("model.language_model.layers.1.mlp.down_proj").weight
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2


def test_parts_scope_prunes_only_those(folder, calib):
    from vlcompress.prune import prune

    vlm = load_model(str(folder))
    vis = vlm.model.get_submodule("model.vision_tower.encoder.layers.0.mlp.fc1").weight.clone()
    prune(vlm, "wanda", pattern="2:4", calibration=calib, scope=("bridge", "language"))
    assert torch.equal(vlm.model.get_submodule("model.vision_tower.encoder.layers.0.mlp.fc1").weight,
                       vis)
    with pytest.raises(ConfigError, match="allowed: vision, text, fusion, bridge, language"):
        prune(vlm, "wanda", calibration=calib, scope=("decoder",))


def test_presets_are_configs_of_the_published_shapes():
    """Presets build random full-size models; tests read their configs only (7B weights)."""
    import transformers

    from vlcompress.models.registry import presets

    by = {e.name: e for e in presets()}
    for name, hidden, layers, vis in (("llava-1.5-7b", 4096, 32, "clip_vision_model"),
                                      ("llava-qwen2-0.5b", 896, 24, "siglip_vision_model")):
        d = json.loads(by[name].path.read_text())
        d.pop("_description")
        cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
        assert cfg.text_config.hidden_size == hidden and cfg.text_config.num_hidden_layers == layers
        assert cfg.vision_config.model_type == vis
        assert peek_model(name).family == "llava"
    with torch.device("meta"):
        from transformers import LlavaForConditionalGeneration

        m = LlavaForConditionalGeneration(cfg)
    assert 0.8e9 < sum(p.numel() for p in m.parameters()) < 1.0e9


def test_own_loss_enables_snip_and_ecoflap(folder, calib):
    """The next-token loss on the answer tokens is LLaVA's own: gradient and zeroth-order
    methods (snip, ecoflap's allocation across vision, bridge and language) run on it."""
    from vlcompress.prune import prune

    vlm = load_model(str(folder))
    enc = vlm.encode(next(iter(calib.batches())))
    loss = vlm.loss(enc)
    loss.backward()
    assert torch.isfinite(loss) and vlm.model.lm_head.weight.grad is not None
    vlm.model.zero_grad(set_to_none=True)
    for method in ("snip", "ecoflap"):
        vlm = load_model(str(folder))
        res = prune(vlm, method, pattern="unstructured", calibration=calib)
        assert set(res.per_modality) == {"vision", "bridge", "language"}
        assert abs(res.achieved - 0.5) < 0.02, (method, res.achieved)
