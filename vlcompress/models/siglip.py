"""SigLIP (``SiglipModel``): CLIP's two towers with a sigmoid loss (Zhai et al., ICCV 2023).

Differences from CLIP that matter here:

- Text is padded to the full ``max_position_embeddings`` and the model is run *without* an
  attention mask, as SigLIP is trained (its standard processor returns none); the text tower
  pools the last position, which is usually padding. So inference, export and latency feed
  ``input_ids`` alone, at a fixed length.
- Calibration still excludes padding from the activation statistics: the token mask comes
  from the tokenizer's own attention mask (real tokens, end-of-sequence included), not from
  the model inputs.
- The vision tower's attention-pooling head and the text head are task heads: never pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from .clip import CLIP, encoder_linears
from .registry import register_family


class _SiglipTextTower(nn.Module):
    """``get_text_features`` holding the text encoder alone (its pooling head is inside)."""

    def __init__(self, model):
        super().__init__()
        self.text_model = model.text_model

    def forward(self, input_ids):
        return self.text_model(input_ids=input_ids).pooler_output


@register_family("siglip")
class SigLIP(CLIP):
    family = "siglip"
    structured = True
    towers = ("vision", "text")

    def prunable_layers(self):
        m = self.model
        return encoder_linears(
            m.vision_model.encoder.layers, "vision_model.encoder.layers", "vision"
        ) + encoder_linears(m.text_model.encoder.layers, "text_model.encoder.layers", "text")

    def encode_texts(self, texts):
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.text_max_length, return_tensors="pt",
                             return_attention_mask=True)
        # "real_tokens" is not a model input: calibration reads it to skip padding.
        return {"input_ids": enc["input_ids"].to(self.device),
                "real_tokens": enc["attention_mask"].bool().to(self.device)}

    def encode(self, batch):
        if batch.images is None:  # text-only data: the text tower alone (--tower text)
            return self.encode_texts(batch.captions)
        return {"pixel_values": self.encode_images(batch.images), **self.encode_texts(batch.captions)}

    def token_mask(self, modality, encoded):
        if modality == "text":
            return encoded["real_tokens"]
        return None

    def model_inputs(self, encoded):
        return {k: v for k, v in encoded.items() if k != "real_tokens"}

    @torch.no_grad()
    def embed_texts(self, texts):
        enc = texts if isinstance(texts, dict) else self.encode_texts(texts)
        return self.model.get_text_features(input_ids=enc["input_ids"]).pooler_output

    def loss(self, encoded):
        return self.model(**self.model_inputs(encoded), return_loss=True).loss

    def tower_module(self, tower):
        if tower == "text":
            return _SiglipTextTower(self.model).eval()
        return super().tower_module(tower)

    def tower_inputs(self, tower, batch):
        if tower == "text":
            return {"input_ids": self.encode_texts(batch.captions)["input_ids"]}
        return super().tower_inputs(tower, batch)

    def dynamic_axes(self, tower):
        if tower == "text":
            return {"input_ids": {0: "batch"}, "embeds": {0: "batch"}}
        return super().dynamic_axes(tower)


def _hf_class():
    from transformers import SiglipModel

    return SiglipModel


def _default_processors(cfg):
    """Presets ship no tokenizer: the shapes word tokenizer (ids fit any vocabulary) and a
    resize/normalise image processor at the config's size (SigLIP normalises with 0.5/0.5)."""
    from transformers import SiglipImageProcessor

    from ..data.tokenizer import build_shapes_tokenizer

    size = cfg.vision_config.image_size
    img = SiglipImageProcessor(size={"height": size, "width": size})
    return build_shapes_tokenizer(cfg.text_config.max_position_embeddings), img


SigLIP.hf_class = staticmethod(_hf_class)
SigLIP.default_processors = staticmethod(_default_processors)
