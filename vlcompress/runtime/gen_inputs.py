"""From a user's image and prompt to the numpy inputs of a generative export, and from its
token ids back to text: the one front end that ``vlcompress generate``, the Triton
generation model (:mod:`vlcompress.exporters._triton_generate_model`) and ``serve-check``'s
reference share, so the served answer and the direct one are encoded the same way.

    enc = PromptEncoder(run / "pruned" / "model", "tiny-llava", context=128)
    feeds = enc.encode([read_image("x.png")], ["describe the picture."])
    tokens = OrtGenerator(run / "pruned").generate(**feeds, max_new_tokens=12)
    print(enc.decode(tokens[0]))

A prompt is the user's text; it is rendered with the model's chat template (one image turn,
:func:`vlcompress.models.llava.render_prompt`; a BLIP-2 run: its question prompt,
``Question: {} Answer:``, from the saved model card) and tokenized with the image tokens expanded by
the model's processor; a batch is left-padded. ``encode_pixels`` takes pixels the processor
already made (``[batch, 3, H, W]`` float32 at the processor's size): the prompt is tokenized
with a blank image of that size (the image-token count depends on the size only) and the
given pixels are used.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["PromptEncoder", "read_image"]


def read_image(source, name: str = "image"):
    """An RGB PIL image from a path or encoded bytes (PNG, JPEG, ...); one DataError line
    when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    what = f"{name} ({len(source)} bytes)" if isinstance(source, (bytes, bytearray)) \
        else f"{name} {str(source)!r}"
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray))
                        else source) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{what} cannot be read ({type(exc).__name__}); allowed: an image file "
                        "PIL opens (PNG, JPEG, ...)") from None


class PromptEncoder:
    """The processor of a generative run, its chat template and the model's context."""

    def __init__(self, processor_dir: str | Path, model_name: str, context: int,
                 image_tokens: int | None = None):
        from transformers import AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(str(processor_dir))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the processor of the run from {str(processor_dir)!r} "
                              f"({type(exc).__name__}); allowed: a run folder prune-export wrote"
                              ) from None
        self.model_name = str(model_name)
        self.context = int(context)
        from ..models.registry import model_card

        card = model_card(Path(processor_dir))  # BLIP-2: plain-text prompts, no chat template
        self.question = ((card.get("prompts") or {}).get("question")
                         if card.get("family") == "blip2" else None)
        # image tokens per image: the export's generation.json (a --visual-tokens export
        # keeps fewer than the processor expands); None: the processor's count
        self.image_tokens = image_tokens
        from PIL import Image

        blank = Image.new("RGB", (32, 32))
        shape = self.processor.image_processor(images=[blank], return_tensors="np")["pixel_values"]
        self.pixel_shape = tuple(int(d) for d in shape.shape[1:])  # (3, H, W)

    def encode(self, images, prompts: list[str]) -> dict[str, np.ndarray]:
        """Left-padded ``input_ids``, ``attention_mask`` and ``pixel_values`` of one image per
        prompt (PIL images)."""
        from transformers.utils import logging as hf_logging

        from ..models.llava import render_prompt
        from .ort_generate import prompt_inputs

        if len(images) != len(prompts):
            raise ConfigError(f"{len(images)} images and {len(prompts)} prompts; allowed: one "
                              "image per prompt")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its "longer than the maximum" warning: see check_length
        try:
            text = [self.question.format(p) if self.question else
                    render_prompt(self.processor, p, self.model_name) for p in prompts]
            return prompt_inputs(self.processor, text, images, image_tokens=self.image_tokens)
        finally:
            hf_logging.set_verbosity(verbosity)

    def encode_pixels(self, pixel_values: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
        """As :meth:`encode`, from pixels the processor made (``[batch, *pixel_shape]``)."""
        from PIL import Image

        px = np.asarray(pixel_values)
        if px.ndim != 4 or tuple(px.shape[1:]) != self.pixel_shape or px.dtype != np.float32:
            raise ConfigError(f"pixel_values of shape {list(px.shape)} and dtype {px.dtype}; "
                              f"allowed: float32 [batch, {', '.join(map(str, self.pixel_shape))}] "
                              "(the processor's output)")
        if not np.isfinite(px).all():
            raise ConfigError("pixel_values hold NaN or infinity; allowed: finite values")
        h, w = self.pixel_shape[1:]
        out = self.encode([Image.new("RGB", (w, h))] * len(px), prompts)
        out["pixel_values"] = np.ascontiguousarray(px)
        return out

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """One line when the prompt (image tokens included) plus the new tokens exceed the
        context."""
        if prompt_tokens + max_new_tokens > self.context:
            raise ConfigError(f"--prompt is {prompt_tokens} tokens with the image's, and with "
                              f"--max-new-tokens {max_new_tokens} exceeds the context of "
                              f"{self.model_name} ({self.context} tokens); allowed: prompt "
                              f"tokens + new tokens <= {self.context}")

    def decode(self, tokens) -> str:
        """The text of one row of new token ids (special tokens dropped, spaces collapsed)."""
        return " ".join(self.processor.tokenizer.decode(list(tokens),
                                                        skip_special_tokens=True).split())
