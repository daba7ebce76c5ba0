"""CLIP (``CLIPModel``): two towers, vision and text, joined by a contrastive loss."""

from __future__ import annotations

import torch
from torch import nn

from ..data.pairs import PairBatch
from .base import VLM, PrunableLayer
from .registry import register_family

_ROLES = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.out_proj": "attn.o",
    "mlp.fc1": "mlp.in",
    "mlp.fc2": "mlp.out",
}


class _VisionTower(nn.Module):
    """``get_image_features``: the vision encoder's pooled output, projected. It holds only
    the vision modules (not the whole model), so a runner that moves or copies it to a GPU
    moves the vision tower alone."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model
        # CLIP projects the pooled output; SigLIP's pooling head is inside its vision_model
        self.visual_projection = getattr(model, "visual_projection", None) or nn.Identity()

    def forward(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class _TextTower(nn.Module):
    """``get_text_features``, holding only the text modules (as :class:`_VisionTower`)."""

    def __init__(self, model):
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection

    def forward(self, input_ids, attention_mask):
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_projection(out.pooler_output)


def encoder_linears(encoder_layers, prefix: str, modality: str) -> list[PrunableLayer]:
    """Every attention and MLP Linear of a stack of CLIP-style encoder layers, in order."""
    out = []
    for b, layer in enumerate(encoder_layers):
        for sub, role in _ROLES.items():
            mod = layer.get_submodule(sub)
            out.append(PrunableLayer(f"{prefix}.{b}.{sub}", mod, modality, role, b))
    return out


@register_family("clip")
class CLIP(VLM):
    family = "clip"
    structured = True
    towers = ("vision", "text")

    @property
    def text_max_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def prunable_layers(self) -> list[PrunableLayer]:
        m = self.model
        return encoder_linears(
            m.vision_model.encoder.layers, "vision_model.encoder.layers", "vision"
        ) + encoder_linears(m.text_model.encoder.layers, "text_model.encoder.layers", "text")

    # --- data ----------------------------------------------------------------------------
    def encode_images(self, images) -> torch.Tensor:
        px = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return px.to(self.device)

    def encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.text_max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def encode(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        if batch.images is None:  # text-only data: the text tower alone (--tower text)
            return self.encode_texts(batch.captions)
        return {"pixel_values": self.encode_images(batch.images), **self.encode_texts(batch.captions)}

    def token_mask(self, modality, encoded):
        if modality == "text":
            return encoded["attention_mask"].bool()
        return None

    def features(self, encoded):
        """Both towers: embeddings, image-text logits and the model's own contrastive loss;
        one selected tower: that tower's output (the base default)."""
        if set(self.towers) != {"vision", "text"}:
            return super().features(encoded)
        out = self.model(**self.model_inputs(encoded), return_loss=True)
        return {"vision": out.image_embeds, "text": out.text_embeds,
                "logits": out.logits_per_image, "loss": out.loss}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        px = images if isinstance(images, torch.Tensor) else self.encode_images(images)
        return self.model.get_image_features(pixel_values=px).pooler_output

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        enc = texts if isinstance(texts, dict) else self.encode_texts(texts)
        return self.model.get_text_features(**enc).pooler_output

    def loss(self, encoded):
        return self.model(**encoded, return_loss=True).loss

    def save(self, path) -> None:
        """Save as HF does; a structurally pruned model also gets its per-layer shapes
        (``vlcompress_manifest.json``) and a README on how to load it."""
        from .surgery import write_manifest

        super().save(path)
        write_manifest(self, path)

    # --- export --------------------------------------------------------------------------
    def tower_module(self, tower: str) -> nn.Module:
        if tower == "vision":
            return _VisionTower(self.model).eval()
        if tower == "text":
            return _TextTower(self.model).eval()
        raise ValueError(f"CLIP has no tower {tower!r}; towers: {', '.join(self.towers)}")

    def tower_inputs(self, tower: str, batch: PairBatch) -> dict[str, torch.Tensor]:
        if tower == "vision":
            return {"pixel_values": self.encode_images(batch.images)}
        if tower == "text":
            return self.encode_texts(batch.captions)
        raise ValueError(f"CLIP has no tower {tower!r}; towers: {', '.join(self.towers)}")

    def dynamic_axes(self, tower: str) -> dict[str, dict[int, str]]:
        if tower == "vision":
            return {"pixel_values": {0: "batch"}, "embeds": {0: "batch"}}
        return {"input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"}, "embeds": {0: "batch"}}


def _hf_class():
    from transformers import CLIPModel

    return CLIPModel


def _default_processors(cfg):
    """Processors for a preset that ships no tokenizer: the shapes word tokenizer (ids fit any
    CLIP vocabulary) and a plain resize/normalise image processor at the config's size."""
    from transformers import CLIPImageProcessor

    from ..data.tokenizer import build_shapes_tokenizer

    size = cfg.vision_config.image_size
    img = CLIPImageProcessor(size={"shortest_edge": size},
                             crop_size={"height": size, "width": size})
    return build_shapes_tokenizer(cfg.text_config.max_position_embeddings), img


CLIP.hf_class = staticmethod(_hf_class)
CLIP.default_processors = staticmethod(_default_processors)
