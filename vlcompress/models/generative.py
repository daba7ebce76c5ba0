"""The base of the generative families (llava, blip2, blip-caption): what they share."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelError
from .base import VLM
from .registry import model_card


class GenerativeVLM(VLM):
    """What the generative families (llava, blip2, blip-caption) share: their processor
    (built from the tokenizer where a folder has none), text decoding, the refusal of a
    per-tower export (their graphs are written by prune-export) and saving with the model
    card. A family sets :attr:`export_module` and passes its ``build_processor``."""

    generative = True
    #: the module that writes the family's ONNX graphs (named by :meth:`tower_module`)
    export_module = "vlcompress.exporters.generative"

    def _set_processor(self, model, tokenizer, image_processor, processor, build_processor):
        if processor is None:
            if tokenizer is None:
                raise ModelError(f"{self.family} model {self.name!r} has no tokenizer; allowed: "
                                 "a folder with the tokenizer files it was trained with")
            processor = build_processor(model.config, tokenizer, image_processor)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or for a model loaded with a
        ``device_map`` (offloaded, several GPUs) the first device of the map that is not
        ``disk`` (accelerate's hooks move activations between the others)."""
        dm = getattr(self.model, "hf_device_map", None)
        if dm:
            d = next((v for v in dm.values() if v != "disk"), "cpu")
            return torch.device(f"cuda:{d}" if isinstance(d, int) else d)
        return next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [" ".join(self.tokenizer.decode(s, skip_special_tokens=True).split()) for s in ids]

    def tower_module(self, tower):
        raise ModelError(f"{self.family} has no per-tower ONNX export; its graphs are written "
                         f"by prune-export ({self.export_module})")

    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.processor.save_pretrained(path)
        card = model_card(Path(self.source)) if self.source and Path(self.source).is_dir() else {}
        card = {**card, "family": self.family, "prompts": dict(self.prompts)}
        (path / "vlcompress.json").write_text(json.dumps(card, indent=2))
