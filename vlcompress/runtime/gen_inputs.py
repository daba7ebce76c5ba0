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

A BLIP captioning / VQA export (``generation.json`` ``"kind"`` ``blip-caption`` /
``blip-vqa``: vision + [question] + decoder with cross-attention, no chat template, no image
tokens in the prompt) has its own front end, :class:`BlipPromptEncoder`: the prompt is the
caption's start (optional) or the question (required), and its :meth:`~BlipPromptEncoder.
generate` batches rows so that each gets the answer it gets alone.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["PromptEncoder", "BlipPromptEncoder", "read_image", "BLIP_KINDS"]


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


def load_processor(processor_dir):
    """The run's processor (tokenizer, image processor, chat template); one line when absent."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(processor_dir))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the processor of the run from {str(processor_dir)!r} "
                          f"({type(exc).__name__}); allowed: a run folder prune-export wrote"
                          ) from None


def pixel_shape(processor) -> tuple[int, ...]:
    """``(3, H, W)`` of the pixels the processor makes (from a blank image)."""
    from PIL import Image

    blank = Image.new("RGB", (32, 32))
    shape = processor.image_processor(images=[blank], return_tensors="np")["pixel_values"]
    return tuple(int(d) for d in shape.shape[1:])


def check_pixels(pixel_values, shape: tuple[int, ...]) -> np.ndarray:
    """Pixels a client made: float32 ``[batch, *shape]``, finite; one line otherwise."""
    px = np.asarray(pixel_values)
    if px.ndim != 4 or tuple(px.shape[1:]) != tuple(shape) or px.dtype != np.float32:
        raise ConfigError(f"pixel_values of shape {list(px.shape)} and dtype {px.dtype}; "
                          f"allowed: float32 [batch, {', '.join(map(str, shape))}] "
                          "(the processor's output)")
    if not np.isfinite(px).all():
        raise ConfigError("pixel_values hold NaN or infinity; allowed: finite values")
    return px


def decode_tokens(tokenizer, tokens) -> str:
    """The text of one row of new token ids (special tokens dropped, spaces collapsed)."""
    return " ".join(tokenizer.decode(list(tokens), skip_special_tokens=True).split())


class PromptEncoder:
    """The processor of a generative run, its chat template and the model's context."""

    def __init__(self, processor_dir: str | Path, model_name: str, context: int,
                 image_tokens: int | None = None):
        self.processor = load_processor(processor_dir)
        self.model_name = str(model_name)
        self.context = int(context)
        from ..models.registry import model_card

        card = model_card(Path(processor_dir))  # BLIP-2: plain-text prompts, no chat template
        self.question = ((card.get("prompts") or {}).get("question")
                         if card.get("family") == "blip2" else None)
        # image tokens per image: the export's generation.json (a --visual-tokens export
        # keeps fewer than the processor expands); None: the processor's count
        self.image_tokens = image_tokens
        self.pixel_shape = pixel_shape(self.processor)

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

        px = check_pixels(pixel_values, self.pixel_shape)
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
        return decode_tokens(self.processor.tokenizer, tokens)


#: generation.json kinds of BLIP's exports (vision + [question] + decoder, cross-attention)
BLIP_KINDS = ("blip-caption", "blip-vqa")


class BlipPromptEncoder:
    """The front end of a BLIP captioning / VQA export (``generation.json`` ``"kind"``
    ``blip-caption`` / ``blip-vqa``), for the Triton generation model and ``serve-check``.

    A request row is an image and a prompt. Captioning: the prompt is the caption's start
    (``None``: the run's caption prompt, BLIP's ``"a picture of"``; ``""``: none), and the
    decoder starts from ``[DEC] prompt`` (:func:`vlcompress.models.blip_caption.decoder_start`,
    what ``BlipCaption.generate`` and ``vlcompress generate`` feed); the answer is the tokens
    after it. VQA: the prompt is the question (required, not blank), tokenized as the model's
    tokenizer does (``[CLS] question [SEP]``), and the decoder starts from ``[DEC]``.

    :meth:`generate` batches rows for :class:`~vlcompress.runtime.ort_generate_blip.
    BlipOrtGenerator` (only its constructor and ``generate`` are used): decoder starts
    left-padded (their positions count from each row's first token, so a padded row equals
    the row alone); VQA questions are never padded: transformers' BLIP attends every question
    position, padding included (see :mod:`vlcompress.models.blip_caption`), so a padded
    question's answer would depend on its batch-mates. Rows are grouped by question length and
    each group is one generate call: every row gets the answer it gets alone."""

    def __init__(self, processor_dir: str | Path, model_name: str, spec: dict):
        kind = spec.get("kind")
        if kind not in BLIP_KINDS:
            raise ConfigError(f"generation.json kind {kind!r} is not a BLIP export; allowed: "
                              f"{', '.join(BLIP_KINDS)}")
        self.kind = str(kind)
        self.processor = load_processor(processor_dir)
        self.tokenizer = self.processor.tokenizer
        self.model_name = str(model_name)
        self.context = int(spec["context"])
        self.bos_id = int(spec["bos_token_id"])
        self.pad_id = int(spec["pad_token_id"])
        self.caption_prompt = str(spec.get("prompt") or "")
        self.pixel_shape = pixel_shape(self.processor)

    @property
    def vqa(self) -> bool:
        return self.kind == "blip-vqa"

    def _row(self, pixels: np.ndarray, prompt: str | None) -> dict:
        from ..models.blip_caption import decoder_start

        if self.vqa:
            if prompt is None or not prompt.strip():
                raise ConfigError(f"{self.model_name} ({self.kind}) answers a question about the "
                                  f"image, and the request has {'no' if prompt is None else 'a blank'}"
                                  " question; allowed: a non-empty question as the prompt")
            question = np.asarray(self.tokenizer(prompt)["input_ids"], np.int64)
            start = np.array([self.bos_id], np.int64)
        else:
            ids, _ = decoder_start(self.tokenizer, self.caption_prompt if prompt is None
                                   else prompt, 1, self.bos_id, return_tensors="np")
            start, question = np.asarray(ids[0], np.int64), None
        return {"start": start, "question": question,
                "pixel_values": np.ascontiguousarray(pixels, np.float32)}

    def encode(self, images, prompts: list[str | None]) -> list[dict]:
        """One row per (PIL image, prompt): ``start`` (the decoder's start ids), ``question``
        (VQA: the question's ids; else None) and ``pixel_values`` ``[3, H, W]``."""
        if len(images) != len(prompts):
            raise ConfigError(f"{len(images)} images and {len(prompts)} prompts; allowed: one "
                              "image per prompt")
        px = self.processor.image_processor(images=list(images), return_tensors="np")
        return self.encode_pixels(np.asarray(px["pixel_values"], np.float32), prompts)

    def encode_pixels(self, pixel_values, prompts: list[str | None]) -> list[dict]:
        """As :meth:`encode`, from pixels the processor made (``[batch, *pixel_shape]``)."""
        px = check_pixels(pixel_values, self.pixel_shape)
        if len(px) != len(prompts):
            raise ConfigError(f"{len(px)} images and {len(prompts)} prompts; allowed: one "
                              "image per prompt")
        return [self._row(p, q) for p, q in zip(px, prompts, strict=True)]

    def check_length(self, rows: list[dict], max_new_tokens: int) -> None:
        """One line when a row's decoder start plus the new tokens, or its question, exceeds
        the context (the text model's position embeddings)."""
        for r in rows:
            n = len(r["start"])
            q = 0 if r["question"] is None else len(r["question"])
            if n + max_new_tokens > self.context or q > self.context:
                what = f"the question is {q} tokens" if q > self.context else \
                    f"the prompt is {n} tokens with the decoder's start, and with " \
                    f"max_new_tokens {max_new_tokens}"
                raise ConfigError(f"{what} exceeds the context of {self.model_name} "
                                  f"({self.context} tokens); allowed: prompt tokens + new tokens "
                                  f"<= {self.context}")

    def batch(self, rows: list[dict]) -> dict[str, np.ndarray]:
        """The numpy inputs of ``BlipOrtGenerator.generate`` for ``rows``: decoder starts
        left-padded (mask 0), pixels stacked; VQA: the questions (right-padded, as the tokenizer
        pads; :meth:`generate` only batches questions of one length)."""
        width = max(len(r["start"]) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, width - len(r["start"]):] = r["start"]
            mask[i, width - len(r["start"]):] = 1
        out = {"input_ids": ids, "attention_mask": mask,
               "pixel_values": np.stack([r["pixel_values"] for r in rows])}
        if self.vqa:
            qw = max(len(r["question"]) for r in rows)
            q = np.full((len(rows), qw), self.pad_id, np.int64)
            qm = np.zeros((len(rows), qw), np.int64)
            for i, r in enumerate(rows):
                q[i, :len(r["question"])] = r["question"]
                qm[i, :len(r["question"])] = 1
            out.update(question_ids=q, question_mask=qm)
        return out

    def groups(self, rows: list[dict]) -> list[list[int]]:
        """Indices of ``rows`` generated together: all of them (captioning), or those whose
        questions have the same length (VQA; class doc)."""
        if not self.vqa:
            return [list(range(len(rows)))] if rows else []
        by: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by.setdefault(len(r["question"]), []).append(i)
        return list(by.values())

    def generate(self, generator, rows: list[dict], limits: list[int],
                 sampling=None) -> list[list[int]]:
        """New token ids of every row (a generate call per group), each cut to its own limit:
        a token does not depend on later steps, so a row generated with a longer limit and
        cut equals the row generated with its own. Greedy, or with ``sampling`` (a
        :class:`~vlcompress.runtime.ort_generate.Sampling`) seeded draws: each group's call
        starts a generator from the seed, so the same rows with the same seed give the same
        tokens; a sampled row, unlike a greedy one, depends on its group (its place in it and
        its size: one uniform per row per step)."""
        out: list[list[int]] = [[] for _ in rows]
        extra = {} if sampling is None else {"sampling": sampling}
        for idx in self.groups(rows):
            feeds = self.batch([rows[i] for i in idx])
            tokens = generator.generate(feeds["input_ids"], feeds["attention_mask"],
                                        feeds["pixel_values"], max(limits[i] for i in idx),
                                        question_ids=feeds.get("question_ids"),
                                        question_mask=feeds.get("question_mask"), **extra)
            for i, t in zip(idx, tokens, strict=True):
                out[i] = [int(x) for x in t][:limits[i]]
        return out

    def decode(self, tokens) -> str:
        return decode_tokens(self.tokenizer, tokens)
