import pytest
import torch

from vlcompress.errors import ModelError
from vlcompress.models import list_models, load_model


def test_prunable_layers_are_encoder_linears_only(tiny_random_clip):
    layers = tiny_random_clip.prunable_layers()
    names = [pl.name for pl in layers]
    assert len(names) == 2 * 2 * 6 and len(set(names)) == len(names)
    assert all(isinstance(pl.module, torch.nn.Linear) for pl in layers)
    assert all(".encoder.layers." in n for n in names)
    assert not any("projection" in n or "embeddings" in n for n in names)
    assert {pl.modality for pl in layers} == {"vision", "text"}
    assert {pl.role for pl in layers} == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out"}
    assert names == [pl.name for pl in tiny_random_clip.prunable_layers()]  # stable order


def test_encode_and_forward(tiny_random_clip, calib_small):
    b = next(iter(calib_small))
    enc = tiny_random_clip.encode(b)
    assert enc["pixel_values"].shape[0] == len(b)
    assert tiny_random_clip.token_mask("text", enc).dtype == torch.bool
    assert tiny_random_clip.token_mask("vision", enc) is None
    out = tiny_random_clip.forward(b)
    assert out.logits_per_image.shape == (len(b), len(b))


def test_bundled_tiny_clip_loads_offline():
    names = [e.name for e in list_models()]
    assert "tiny-clip" in names
    vlm = load_model("tiny-clip")
    assert vlm.family == "clip" and len(vlm.prunable_layers()) == 48


def test_save_and_reload_same_outputs(tiny_random_clip, tmp_path, calib_small):
    tiny_random_clip.save(tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    b = next(iter(calib_small))
    a1 = tiny_random_clip.embed_images(b.images)
    a2 = again.embed_images(b.images)
    assert torch.allclose(a1, a2, atol=1e-6)
    assert torch.allclose(tiny_random_clip.embed_texts(b.captions), again.embed_texts(b.captions), atol=1e-6)


@pytest.mark.parametrize("name,needle", [
    ("./no/such/dir", "does not exist"),
    ("/tmp", "config.json"),
])
def test_bad_model_paths(name, needle):
    with pytest.raises(ModelError, match=needle):
        load_model(name)


def test_unsupported_family(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 8}')
    with pytest.raises(ModelError, match="'gpt2'.*clip"):
        load_model(str(tmp_path))
