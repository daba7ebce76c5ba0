"""Greedy generation of BLIP captioning / VQA on ONNX Runtime, over its exported graphs
(:mod:`vlcompress.exporters.generative_blip`; ``generation.json`` ``"kind"``: ``blip-caption``
or ``blip-vqa``):

- ``vision.onnx``: ``pixel_values`` -> ``image_embeds`` [batch, tokens, vision width];
- ``question.onnx`` (VQA only): ``input_ids``, ``attention_mask`` (the question) and
  ``image_embeds`` -> ``question_states`` [batch, question tokens, text width];
- ``decoder.onnx``: ``input_ids``, ``position_ids`` [batch, sequence], ``attention_mask``
  [batch, past + sequence], ``encoder_hidden_states`` (image embeds, or question states;
  every encoder token attended, as transformers' BLIP text layers do) and ``past.{i}.key``
  / ``past.{i}.value`` [batch, heads of layer i, past, head_dim] -> ``logits`` and
  ``present.{i}.*``. The token embedding (word + position, LayerNorm) lives in the decoder graph: BLIP has no
  inputs_embeds merge to do, so no ``embed.onnx``. One merged graph: prefill with an empty
  past, decode with one token; the cross-attention keys/values are recomputed from
  ``encoder_hidden_states`` at each call (the graph stays one file; the cost is two
  [tokens x width] products per layer and step).

The loop follows transformers' ``generate`` as :meth:`vlcompress.models.blip_caption.
BlipCaption.generate` calls it: the decoder starts from ``[DEC] prompt`` (captioning, left
padding) or ``[DEC]`` (VQA), position ids ``cumsum(mask) - 1`` (0 at padding), each step
appends the arg-max token and a 1 to the mask, a finished row is fed the pad token; it stops
when every row has produced ``[SEP]`` or after ``max_new_tokens``; tokens are cut at the end
(or pad) token. Layers may have different head counts (a structurally pruned decoder): the
spec lists them and the empty past takes each layer's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ExportError
from .ort_generate import _session, read_spec

KINDS = ("blip-caption", "blip-vqa")


class BlipOrtGenerator:
    """The sessions of one BLIP export folder and the greedy loop over them."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.spec = read_spec(self.folder)
        if self.spec.get("kind") not in KINDS:
            raise ExportError(f"{str(folder)!r} holds a {self.spec.get('kind')!r} export; this "
                              f"generator runs {', '.join(KINDS)}")
        self.sessions = {p: _session(self.folder / f, threads)
                         for p, f in self.spec["files"].items()}

    @property
    def context(self) -> int:
        return int(self.spec["context"])

    @property
    def vqa(self) -> bool:
        return self.spec["kind"] == "blip-vqa"

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.sessions["vision"].run(
            None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def question_states(self, input_ids, attention_mask, image_embeds) -> np.ndarray:
        return self.sessions["question"].run(None, {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "image_embeds": image_embeds.astype(np.float32)})[0]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        hd = int(self.spec["head_dim"])
        return {f"past.{i}.{kv}": np.zeros((batch, int(h), 0, hd), np.float32)
                for i, h in enumerate(self.spec["num_heads"]) for kv in ("key", "value")}

    def decode_step(self, input_ids, positions, mask, encoder_states, past):
        """One decoder call: (logits, presents keyed as the next call's past)."""
        feed = {"input_ids": input_ids.astype(np.int64), "position_ids": positions.astype(np.int64),
                "attention_mask": mask.astype(np.int64),
                "encoder_hidden_states": encoder_states.astype(np.float32), **past}
        sess = self.sessions["decoder"]
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
        return res["logits"], {k.replace("present.", "past.", 1): v for k, v in res.items()
                               if k.startswith("present.")}

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 pixel_values: np.ndarray, max_new_tokens: int, *,
                 question_ids: np.ndarray | None = None,
                 question_mask: np.ndarray | None = None) -> list[list[int]]:
        """Greedy new token ids per row, cut at the end token. ``input_ids`` / ``attention_mask``:
        the decoder's start (``[DEC] prompt``, left-padded); for VQA also the question."""
        sep, pad = int(self.spec["sep_token_id"]), int(self.spec["pad_token_id"])
        enc = self.image_embeds(pixel_values)
        if self.vqa:
            if question_ids is None or question_mask is None:
                raise ExportError("a BLIP VQA export needs the question ids and mask")
            enc = self.question_states(question_ids, question_mask, enc)
        b = input_ids.shape[0]
        mask = attention_mask.astype(np.int64)
        ids = input_ids.astype(np.int64)
        positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0).astype(np.int64)
        past = self.empty_past(b)
        done = np.zeros(b, bool)
        out: list[list[int]] = [[] for _ in range(b)]
        for _ in range(int(max_new_tokens)):
            logits, past = self.decode_step(ids, positions, mask, enc, past)
            nxt = np.where(done, pad, logits[:, -1].argmax(-1)).astype(np.int64)
            for r in np.flatnonzero(~done):
                if nxt[r] != sep:
                    out[r].append(int(nxt[r]))
            done |= nxt == sep
            if done.all():
                break
            ids = nxt[:, None]
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
        return [seq[:seq.index(pad)] if pad in seq else seq for seq in out]


def blip_inputs(tokenizer, image_processor, images, *, bos_id: int, prompt: str = "",
                questions: list[str] | None = None) -> dict[str, np.ndarray]:
    """The numpy inputs of :meth:`BlipOrtGenerator.generate`, built with the model's own
    tokenizer and image processor: captioning, ``[DEC] prompt`` per image (left-padded,
    :func:`~vlcompress.models.blip_caption.decoder_start`); VQA, ``[DEC]`` and the tokenized
    questions (padded as the tokenizer pads)."""
    from ..models.blip_caption import decoder_start

    n = len(images)
    px = image_processor(images=list(images), return_tensors="np")["pixel_values"]
    out = {"pixel_values": np.asarray(px, np.float32)}
    if questions is not None:
        q = tokenizer(list(questions), padding=True, return_tensors="np")
        out.update(input_ids=np.full((n, 1), bos_id, np.int64),
                   attention_mask=np.ones((n, 1), np.int64),
                   question_ids=q["input_ids"].astype(np.int64),
                   question_mask=q["attention_mask"].astype(np.int64))
        return out
    ids, mask = decoder_start(tokenizer, prompt, n, bos_id, return_tensors="np")
    out.update(input_ids=ids.astype(np.int64), attention_mask=mask.astype(np.int64))
    return out
