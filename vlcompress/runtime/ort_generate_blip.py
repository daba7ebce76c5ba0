"""Generation (greedy, or seeded sampling) of BLIP captioning / VQA on ONNX Runtime, over its exported graphs
(:mod:`vlcompress.exporters.generative_blip`; ``generation.json`` ``"kind"``: ``blip-caption``
or ``blip-vqa``):

- ``vision.onnx``: ``pixel_values`` -> ``image_embeds`` [batch, tokens, vision width];
- ``question.onnx`` (VQA only): ``input_ids``, ``attention_mask`` (the question) and
  ``image_embeds`` -> ``question_states`` [batch, question tokens, text width];
- ``cross_kv.onnx``: ``encoder_hidden_states`` (image embeds, or question states) ->
  ``cross.{i}.key`` / ``cross.{i}.value`` [batch, cross heads of layer i, encoder tokens,
  head_dim]: run ONCE per request, in the prefill;
- ``decoder.onnx``: ``input_ids``, ``position_ids`` [batch, sequence], ``attention_mask``
  [batch, past + sequence], the ``cross.{i}.*`` (every encoder token attended, as
  transformers' BLIP text layers do) and ``past.{i}.key`` / ``past.{i}.value`` [batch, heads
  of layer i, past, head_dim] -> ``logits`` and ``present.{i}.*``. The token embedding (word
  + position, LayerNorm) lives in the decoder graph: BLIP has no inputs_embeds merge to do,
  so no ``embed.onnx``. One merged graph: prefill with an empty past, decode with one token.

The loop is LLaVA's (:class:`~vlcompress.runtime.ort_generate.OrtGenerator`, whose machinery
this generator inherits): the self-attention KV cache lives in pre-allocated ping-pong
buffers bound with IOBinding (:class:`~vlcompress.runtime.ort_generate.Decoding`, no
allocation per token), the cross keys / values are computed by the prefill and bound to the
decoder once for the whole generation, each step binds the token ids, the positions and the
grown mask, and :func:`~vlcompress.runtime.ort_generate.token_loop` picks the tokens. It
follows transformers' ``generate`` as :meth:`vlcompress.models.blip_caption.
BlipCaption.generate` calls it: the decoder starts from ``[DEC] prompt`` (captioning, left
padding) or ``[DEC]`` (VQA), position ids ``cumsum(mask) - 1`` (0 at padding), each step
appends the arg-max token (or, given a :class:`~vlcompress.runtime.ort_generate.Sampling`, a
seeded draw) and a 1 to the mask, a finished row is fed the pad token; it stops
when every row has produced ``[SEP]`` or after ``max_new_tokens``; tokens are cut at the end
(or pad) token. Layers may have different head counts (a structurally pruned decoder): the
spec lists them and the buffers take each layer's.

Entry points a timer calls one by one (:mod:`vlcompress.runtime.gen_latency`):
:meth:`BlipOrtGenerator.image_embeds` (the vision graph), :meth:`BlipOrtGenerator.prefill`
(vision, question encoder, cross keys / values and the decoder over the prompt: the logits
of the first new token) and :meth:`BlipOrtGenerator.step` (one decode step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ExportError
from .ort_generate import Decoding, OrtGenerator, Sampling, _Sessions, chooser, read_spec, token_loop

KINDS = ("blip-caption", "blip-vqa")


class BlipOrtGenerator(OrtGenerator):
    """The sessions of one BLIP export folder and the generation loop over them (module
    doc)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.spec = read_spec(self.folder)
        if self.spec.get("kind") not in KINDS:
            raise ExportError(f"{str(folder)!r} holds a {self.spec.get('kind')!r} export; this "
                              f"generator runs {', '.join(KINDS)}")
        if "cross_kv" not in self.spec["files"]:
            raise ExportError(f"{str(folder)!r} is a BLIP export without cross_kv.onnx (its "
                              "decoder recomputes the cross-attention at every step, written "
                              "before vlcompress kept them per request); allowed: re-run "
                              "prune-export")
        self.sessions = _Sessions(self.folder, self.spec["files"], threads)
        names = [i.name for i in self.sessions["decoder"].get_inputs()]
        self._cache_names = [n for n in names if n.startswith("past.")]
        self._cross_names = [n for n in names if n.startswith("cross.")]
        self.hidden = 0  # no embedding graph: the decoder embeds its token ids
        self.spec.setdefault("vocab_size_out", int(self.spec["vocab_size"]))
        self.spec.setdefault("num_key_value_heads", self.spec["num_heads"])
        self.spec.setdefault("eos_token_id", self.spec["sep_token_id"])

    @property
    def vqa(self) -> bool:
        return self.spec["kind"] == "blip-vqa"

    # -- the graphs ------------------------------------------------------------------------------
    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.sessions["vision"].run(
            None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def question_states(self, input_ids, attention_mask, image_embeds) -> np.ndarray:
        return self.sessions["question"].run(None, {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "image_embeds": image_embeds.astype(np.float32)})[0]

    def encoder_states(self, pixel_values, question_ids=None, question_mask=None,
                       image_embeds=None) -> np.ndarray:
        """What the decoder's cross-attention reads: the image embeddings (of
        ``pixel_values``, or ``image_embeds`` already computed), or for VQA the question
        encoder's states over them."""
        enc = self.image_embeds(pixel_values) if image_embeds is None else image_embeds
        if self.vqa:
            if question_ids is None or question_mask is None:
                raise ExportError("a BLIP VQA export needs the question ids and mask")
            enc = self.question_states(question_ids, question_mask, enc)
        return enc

    def cross_kv(self, encoder_states: np.ndarray) -> list[np.ndarray]:
        """Every layer's cross-attention keys and values, in the decoder's input order (in
        the decoder's cache dtype: an fp16 export takes them in fp16)."""
        outs = self.sessions["cross_kv"].run(
            self._cross_names, {"encoder_hidden_states": encoder_states.astype(np.float32)})
        return [np.ascontiguousarray(o) for o in outs]

    def decode_step(self, input_ids, positions, mask, cross, past):
        """One decoder call on plain numpy feeds (no buffers): (logits, presents keyed as the
        next call's past). ``cross``: :meth:`cross_kv`'s list. What validation compares."""
        feed = {"input_ids": input_ids.astype(np.int64), "position_ids": positions.astype(np.int64),
                "attention_mask": mask.astype(np.int64),
                **dict(zip(self._cross_names, cross, strict=True)), **past}
        sess = self.sessions["decoder"]
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
        return res["logits"], {k.replace("present.", "past.", 1): v for k, v in res.items()
                               if k.startswith("present.")}

    # -- the buffered loop ---------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                pixel_values: np.ndarray | None, max_new_tokens: int,
                image_embeds: np.ndarray | None = None, *, question_ids=None,
                question_mask=None) -> Decoding:
        """Vision (skipped given ``image_embeds``), the question encoder (VQA), the cross
        keys / values (bound to the decoder for the whole generation) and the decoder over
        the (left-padded) decoder start; the state holds the logits of the first new token
        and room for ``max_new_tokens``."""
        mask = attention_mask.astype(np.int64)
        b, p = mask.shape
        st = Decoding(self, mask, self.check_capacity(p, max_new_tokens))
        enc = self.encoder_states(pixel_values, question_ids, question_mask, image_embeds)
        st.cross = self.cross_kv(enc)  # kept alive by the state: the binding points into it
        for name, arr in zip(self._cross_names, st.cross, strict=True):
            st.binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0).astype(np.int64)
        logits = np.empty((b, p, int(self.spec["vocab_size_out"])), np.float32)
        self._run_decoder(st, {"input_ids": input_ids.astype(np.int64),
                               "attention_mask": st.mask_view(p), "position_ids": positions},
                          p, logits)
        st.positions[:] = positions[:, -1:]
        st.logits = logits[:, -1]
        return st

    def _step_tokens(self, st: Decoding) -> dict[str, np.ndarray]:
        """A step feeds the decoder the token ids themselves (it embeds them)."""
        return {"input_ids": st.ids}

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 pixel_values: np.ndarray, max_new_tokens: int, *,
                 question_ids: np.ndarray | None = None,
                 question_mask: np.ndarray | None = None,
                 sampling: Sampling | None = None) -> list[list[int]]:
        """New token ids per row, cut at the end token: greedy, or drawn with ``sampling``
        (seeded temperature / top-k / top-p, :class:`~vlcompress.runtime.ort_generate.
        Sampling`: the same draws as :class:`~vlcompress.runtime.torch_generate.
        BlipTorchGenerator` for one seed). ``input_ids`` / ``attention_mask``: the decoder's
        start (``[DEC] prompt``, left-padded); for VQA also the question."""
        st = self.prefill(input_ids, attention_mask, pixel_values, max_new_tokens,
                          question_ids=question_ids, question_mask=question_mask)
        return token_loop(self, st, max_new_tokens, int(self.spec["sep_token_id"]),
                          int(self.spec["pad_token_id"]), chooser(sampling))


def open_generator(folder: str | Path, threads: int | None = None):
    """The generator of an export folder, by its ``generation.json`` ``kind``: BLIP
    captioning / VQA (:class:`BlipOrtGenerator`), else LLaVA-style
    (:class:`~vlcompress.runtime.ort_generate.OrtGenerator`). Both have the same entry points
    (``image_embeds``, ``prefill``, ``step``, ``generate``)."""
    if read_spec(folder).get("kind", "llava") in KINDS:
        return BlipOrtGenerator(folder, threads)
    return OrtGenerator(folder, threads)


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
