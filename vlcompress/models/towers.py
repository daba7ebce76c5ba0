"""Single-tower models: a CLIP/SigLIP vision encoder alone, or a BERT-style text encoder
(the text tower of BLIP and of many retrieval models), and the vision tower nested in a
larger VLM's config (LLaVA-style: ``config.vision_config`` of a CLIP or SigLIP vision model).

A one-tower model goes through the same prune -> export -> bench path; with nothing to pair
its embeddings with, its quality is its fidelity to the dense model (mean cosine of the
tower's output features, per token for vision towers, per sentence for text encoders).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .base import VLM, PrunableLayer
from .clip import encoder_linears
from .registry import register_family

_BERT_ROLES = {"attention.self.query": "attn.q", "attention.self.key": "attn.k",
               "attention.self.value": "attn.v", "attention.output.dense": "attn.o",
               "intermediate.dense": "mlp.in", "output.dense": "mlp.out"}


class _VisionFeatures(nn.Module):
    """Hidden states of one encoder layer (``feature_layer``), the features a VLM consumes."""

    def __init__(self, model, feature_layer: int):
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer

    def forward(self, pixel_values):
        if self.feature_layer == -1:
            return self.model(pixel_values=pixel_values).last_hidden_state
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer]


class _TextFeatures(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # mean over real tokens


class _VisionTowerBase(VLM):
    towers = ("vision",)
    structured = True
    feature_layer = -1

    @property
    def device(self):
        return next(self.model.parameters()).device

    def prunable_layers(self) -> list[PrunableLayer]:
        return encoder_linears(self.model.encoder.layers, "encoder.layers", "vision")

    def encode_images(self, images):
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)

    def encode(self, batch):
        return {"pixel_values": self.encode_images(batch.images)}

    @torch.no_grad()
    def embed_images(self, images):
        px = images if isinstance(images, torch.Tensor) else self.encode_images(images)
        return _VisionFeatures(self.model, self.feature_layer)(px)

    def tower_module(self, tower):
        if tower != "vision":
            raise ModelError(f"this model has no tower {tower!r}; towers: vision")
        return _VisionFeatures(self.model, self.feature_layer).eval()

    def tower_inputs(self, tower, batch):
        return {"pixel_values": self.encode_images(batch.images)}

    def dynamic_axes(self, tower):
        return {"pixel_values": {0: "batch"}, "embeds": {0: "batch"}}


@register_family("clip_vision_model")
class ClipVisionTower(_VisionTowerBase):
    family = "clip_vision_model"

    @staticmethod
    def hf_class():
        from transformers import CLIPVisionModel

        return CLIPVisionModel

    @staticmethod
    def default_processors(cfg):
        from transformers import CLIPImageProcessor

        return None, CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                                        crop_size={"height": cfg.image_size, "width": cfg.image_size})


@register_family("siglip_vision_model")
class SiglipVisionTower(_VisionTowerBase):
    family = "siglip_vision_model"

    @staticmethod
    def hf_class():
        from transformers import SiglipVisionModel

        return SiglipVisionModel

    @staticmethod
    def default_processors(cfg):
        from transformers import SiglipImageProcessor

        return None, SiglipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size})


@register_family("bert")
class BertTextTower(VLM):
    family = "bert"
    towers = ("text",)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @staticmethod
    def hf_class():
        from transformers import BertModel

        return BertModel

    @staticmethod
    def default_processors(cfg):
        from ..data.tokenizer import build_shapes_tokenizer

        return build_shapes_tokenizer(min(cfg.max_position_embeddings, 64)), None

    def prunable_layers(self):
        out = []
        for b, layer in enumerate(self.model.encoder.layer):
            for sub, role in _BERT_ROLES.items():
                out.append(PrunableLayer(f"encoder.layer.{b}.{sub}", layer.get_submodule(sub), "text",
                                         role, b))
        return out

    def encode_texts(self, texts):
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=int(self.model.config.max_position_embeddings), return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def encode(self, batch):
        return self.encode_texts(batch.captions)

    def token_mask(self, modality, encoded):
        return encoded["attention_mask"].bool()

    @torch.no_grad()
    def embed_texts(self, texts):
        enc = texts if isinstance(texts, dict) else self.encode_texts(texts)
        return _TextFeatures(self.model)(enc["input_ids"], enc["attention_mask"])

    def tower_module(self, tower):
        if tower != "text":
            raise ModelError(f"this model has no tower {tower!r}; towers: text")
        return _TextFeatures(self.model).eval()

    def tower_inputs(self, tower, batch):
        return self.encode_texts(batch.captions)

    def dynamic_axes(self, tower):
        return {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "embeds": {0: "batch"}}


NESTED_VISION = {"clip_vision_model": ClipVisionTower, "siglip_vision_model": SiglipVisionTower}
_PREFIXES = ("vision_tower.", "model.vision_tower.", "vision_model.", "model.vision_model.")


def load_nested_vision_tower(path: str, cfg, *, random_init: bool, name: str) -> VLM:
    """The vision tower of a VLM whose config nests a CLIP/SigLIP vision config (LLaVA-style):
    build the tower from ``cfg.vision_config`` and load only its weights (by key prefix)."""
    vcfg = getattr(cfg, "vision_config", None)
    if vcfg is None or vcfg.model_type not in NESTED_VISION:
        kind = getattr(vcfg, "model_type", None)
        raise ModelError(f"model_type {cfg.model_type!r} has no CLIP or SigLIP vision tower "
                         f"(vision_config: {kind}); --tower vision needs one")
    fam = NESTED_VISION[vcfg.model_type]
    model = fam.hf_class()(vcfg)
    if not random_init:
        model.load_state_dict(_tower_state_dict(Path(path)), strict=True)
    feature_layer = getattr(cfg, "vision_feature_layer", -1)
    if isinstance(feature_layer, (list, tuple)):
        feature_layer = feature_layer[-1]
    from transformers import AutoImageProcessor

    try:
        img = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        img = fam.default_processors(vcfg)[1]
    vlm = fam(model.eval(), None, img, name=name, source=path)
    vlm.feature_layer = int(feature_layer)
    return vlm


def _tower_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    out = {}
    for fname in files:
        f = folder / fname
        if not f.is_file():
            raise ModelError(f"model folder {str(folder)!r} lacks {fname} (safetensors weights needed)")
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                for pre in _PREFIXES:
                    if key.startswith(pre):
                        out[key[len(pre):]] = sf.get_tensor(key)
                        break
    if not out:
        raise ModelError(f"no vision tower weights (prefixes {', '.join(_PREFIXES)}) in {str(folder)!r}")
    return out
