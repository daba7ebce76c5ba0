"""Architecture presets: real CLIP configs shipped as JSON, randomly initialised models."""

from __future__ import annotations

import json

import pytest

from vlcompress.models import list_models, load_model
from vlcompress.models.registry import ASSETS

# (vision hidden, heads, layers, mlp, patch), (text hidden, heads, layers), projection
EXPECTED = {
    "clip-vit-b32": ((768, 12, 12, 3072, 32), (512, 8, 12), 512),
    "clip-vit-b16": ((768, 12, 12, 3072, 16), (512, 8, 12), 512),
    "clip-vit-l14": ((1024, 16, 24, 4096, 14), (768, 12, 12), 768),
}


def test_presets_listed():
    names = {e.name: e for e in list_models()}
    for name in EXPECTED:
        assert names[name].kind == "preset" and names[name].family == "clip"
        assert "randomly initialised" in names[name].description


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_configs_are_the_real_architectures(name):
    import transformers

    d = json.loads((ASSETS / "presets" / f"{name}.json").read_text())
    d.pop("_description")
    cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    (vh, vheads, vl, vmlp, patch), (th, theads, tl), proj = EXPECTED[name]
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_attention_heads, v.num_hidden_layers, v.intermediate_size,
            v.patch_size, v.image_size) == (vh, vheads, vl, vmlp, patch, 224)
    assert (t.hidden_size, t.num_attention_heads, t.num_hidden_layers, t.intermediate_size,
            t.max_position_embeddings, t.vocab_size) == (th, theads, tl, 4 * th, 77, 49408)
    assert cfg.projection_dim == proj and v.hidden_act == t.hidden_act == "quick_gelu"


def test_preset_builds_real_size_model():
    from vlcompress.flops import tower_size

    vlm = load_model("clip-vit-b32")
    assert vlm.source == "preset:clip-vit-b32"
    assert sum(p.numel() for p in vlm.model.parameters()) == 151_277_313  # openai/clip-vit-base-patch32
    size = tower_size(vlm)
    assert size["vision"]["tokens"] == 50 and size["text"]["tokens"] == 77
    assert 8.5e9 < size["vision"]["flops"] < 9.0e9  # ViT-B/32: ~4.4 GMACs per image
