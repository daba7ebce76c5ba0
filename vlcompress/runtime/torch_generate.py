"""Generation with a generative VLM (llava) in PyTorch eager, step by step, with the same entry
points as :class:`vlcompress.runtime.ort_generate.OrtGenerator`, so the latency harness
(:mod:`vlcompress.runtime.gen_latency`) times both on the same inputs:

    gen = TorchGenerator(vlm)                     # vlm.model: LlavaForConditionalGeneration
    st = gen.prefill(input_ids, attention_mask, pixel_values, max_new_tokens=32)
    logits = gen.step(st, st.logits.argmax(-1))   # one decode step on the HF cache

Each call is what transformers' ``generate`` does for that step (greedy): the prefill is the
model's forward over the left-padded prompt with the pixels, a fresh ``DynamicCache`` and
``logits_to_keep=1``; a decode step feeds one token with the mask grown by one, position ids
``cumsum(mask) - 1`` continued, and the cache the model updates. The greedy tokens of
:meth:`TorchGenerator.generate` equal ``Llava.generate``'s (tests/test_gen_latency.py).
Inputs and outputs are numpy, as for ONNX Runtime.
"""

from __future__ import annotations

import numpy as np


def _cache_keyword() -> str:
    """``cache`` (transformers >= 5.2x), else the older ``past_key_values``."""
    import inspect

    from transformers import LlavaForConditionalGeneration

    params = inspect.signature(LlavaForConditionalGeneration.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TorchDecoding:
    """One batched generation: the HF cache, the mask so far, the last positions and logits."""

    def __init__(self, cache, mask, positions, logits, capacity: int):
        self.cache, self.mask, self.positions = cache, mask, positions
        self.logits = logits
        self.capacity = int(capacity)
        self.length = int(mask.shape[1])
        self.batch = int(mask.shape[0])


class TorchGenerator:
    """PyTorch eager prefill / decode steps of a llava ``vlm`` (module doc)."""

    runtime = "torch"

    def __init__(self, vlm):
        self.vlm = vlm
        self.model = vlm.model.eval()
        self.context = int(self.model.config.text_config.max_position_embeddings)
        self._cache_kw = _cache_keyword()
        # the module a step calls: LLaVA's whole model; BLIP-2's language model (its top
        # model's forward needs pixel values on every call)
        self._lm = self.model.language_model if vlm.family == "blip2" else self.model

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            px = torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32))
            # LLaVA: its inner model's; BLIP-2: the top model's (Q-Former + projection)
            owner = self.model.model if hasattr(self.model, "model") else self.model
            out = owner.get_image_features(pixel_values=px)
            out = getattr(out, "pooler_output", out)
            if isinstance(out, (list, tuple)):
                out = torch.stack(list(out))
            return out.numpy()

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                pixel_values: np.ndarray | None, max_new_tokens: int,
                image_embeds: np.ndarray | None = None) -> TorchDecoding:
        """The model's forward over the prompt with a fresh cache; with ``image_embeds``
        (already computed) the vision tower is skipped: the prompt's token embeddings get them
        at the image token positions, as the model itself scatters its image features."""
        import torch
        from transformers import DynamicCache

        from ..errors import ConfigError

        need = int(input_ids.shape[1]) + int(max_new_tokens)
        if need > self.context:
            raise ConfigError(f"{input_ids.shape[1]} prompt tokens + {max_new_tokens} new tokens "
                              f"exceed the context ({self.context} tokens)")
        with torch.inference_mode():
            mask = torch.from_numpy(attention_mask.astype(np.int64))
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            cache = DynamicCache(config=self.model.config.text_config)
            ids = torch.from_numpy(input_ids.astype(np.int64))
            if image_embeds is None and self._lm is not self.model:
                image_embeds = self.image_embeds(pixel_values)
            if image_embeds is None:
                inputs = {"input_ids": ids,
                          "pixel_values": torch.from_numpy(pixel_values.astype(np.float32))}
            else:
                is_image = ids == self.model.config.image_token_index
                emb = self.model.get_input_embeddings()(ids.masked_fill(is_image, 0))
                img = torch.from_numpy(np.ascontiguousarray(image_embeds, np.float32))
                inputs = {"inputs_embeds": emb.masked_scatter(is_image[..., None], img)}
            out = self._lm(**inputs, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache})
            return TorchDecoding(cache, mask, pos[:, -1:],
                                 out.logits[:, -1].float().numpy(), need)

    def step(self, st: TorchDecoding, tokens: np.ndarray) -> np.ndarray:
        import torch

        from ..errors import ConfigError

        if st.length >= st.capacity:
            raise ConfigError(f"the generation holds {st.capacity} tokens (prompt + "
                              "max_new_tokens); no room for another step")
        with torch.inference_mode():
            st.mask = torch.cat([st.mask, st.mask.new_ones(st.batch, 1)], 1)
            st.positions = st.positions + 1
            ids = torch.from_numpy(np.asarray(tokens, np.int64).reshape(-1, 1))
            out = self._step_forward(st, ids)
            st.length += 1  # the model appended this step's keys / values to st.cache
            st.logits = out.logits[:, -1].float().numpy()
            return st.logits

    def _step_forward(self, st: TorchDecoding, ids):
        return self._lm(input_ids=ids, attention_mask=st.mask, position_ids=st.positions,
                        use_cache=True, logits_to_keep=1, **{self._cache_kw: st.cache})

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 pixel_values: np.ndarray, max_new_tokens: int, sampling=None
                 ) -> list[list[int]]:
        """New token ids per row, cut at the end (or pad) token, as ``Llava.generate``:
        greedy, or drawn with ``sampling`` (a :class:`~vlcompress.runtime.ort_generate.
        Sampling`: the same seeded draws as ``OrtGenerator.generate``, so the two give the
        same tokens wherever their logits agree)."""
        from .ort_generate import chooser, token_loop

        tok = self.vlm.tokenizer
        st = self.prefill(input_ids, attention_mask, pixel_values, max_new_tokens)
        return token_loop(self, st, max_new_tokens, int(tok.eos_token_id), int(tok.pad_token_id),
                          chooser(sampling))


class BlipTorchGenerator(TorchGenerator):
    """PyTorch eager prefill / decode steps of a BLIP captioning or VQA ``vlm``, the entry
    points of :class:`~vlcompress.runtime.ort_generate_blip.BlipOrtGenerator`: what
    transformers' ``generate`` runs for each step of ``BlipCaption.generate`` (greedy; or
    seeded sampling with our draws, not PyTorch's generator) --
    the vision model (and the question encoder) once, then the text decoder with an
    ``EncoderDecoderCache`` (its cross-attention keys / values computed at the first call
    and kept, the self-attention's appended per step), position ids ``cumsum(mask) - 1``
    continued, ``logits_to_keep=1``."""

    runtime = "torch"

    def __init__(self, vlm):
        import inspect

        self.vlm = vlm
        self.model = vlm.model.eval()
        self.spec = {"kind": vlm.family, "precision": "fp32"}
        self.context = int(self.model.config.text_config.max_position_embeddings)
        params = inspect.signature(self.model.text_decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            px = torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32))
            return self.model.vision_model(pixel_values=px)[0].numpy()

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                pixel_values: np.ndarray | None, max_new_tokens: int,
                image_embeds: np.ndarray | None = None, *, question_ids=None,
                question_mask=None) -> TorchDecoding:
        import torch
        from transformers import DynamicCache, EncoderDecoderCache

        from ..errors import ConfigError

        need = int(input_ids.shape[1]) + int(max_new_tokens)
        if need > self.context:
            raise ConfigError(f"{input_ids.shape[1]} prompt tokens + {max_new_tokens} new tokens "
                              f"exceed the context ({self.context} tokens)")
        with torch.inference_mode():
            if image_embeds is None:
                image_embeds = self.image_embeds(pixel_values)
            enc = torch.from_numpy(np.ascontiguousarray(image_embeds, np.float32))
            if self.vlm.family == "blip-vqa":
                ones = torch.ones(enc.shape[:-1], dtype=torch.long)
                enc = self.model.text_encoder(
                    input_ids=torch.from_numpy(question_ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(question_mask.astype(np.int64)),
                    encoder_hidden_states=enc, encoder_attention_mask=ones)[0]
            mask = torch.from_numpy(attention_mask.astype(np.int64))
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            out = self.model.text_decoder(
                input_ids=torch.from_numpy(input_ids.astype(np.int64)), attention_mask=mask,
                position_ids=pos, encoder_hidden_states=enc, use_cache=True, logits_to_keep=1,
                **{self._cache_kw: cache})
            st = TorchDecoding(cache, mask, pos[:, -1:], out.logits[:, -1].float().numpy(), need)
            st.encoder = enc
            return st

    def _step_forward(self, st: TorchDecoding, ids):
        return self.model.text_decoder(
            input_ids=ids, attention_mask=st.mask, position_ids=st.positions,
            encoder_hidden_states=st.encoder, use_cache=True, logits_to_keep=1,
            **{self._cache_kw: st.cache})

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 pixel_values: np.ndarray, max_new_tokens: int, *, question_ids=None,
                 question_mask=None, sampling=None) -> list[list[int]]:
        """New token ids per row, cut at the end (or pad) token, as ``BlipCaption.generate``
        (greedy), or drawn with ``sampling`` (:class:`~vlcompress.runtime.ort_generate.
        Sampling`: the draws of ``BlipOrtGenerator.generate`` for the same seed)."""
        from .ort_generate import chooser, token_loop

        st = self.prefill(input_ids, attention_mask, pixel_values, max_new_tokens,
                          question_ids=question_ids, question_mask=question_mask)
        return token_loop(self, st, max_new_tokens, int(self.vlm.sep_id), int(self.vlm.pad_id),
                          chooser(sampling))


def torch_generator(vlm):
    """The PyTorch eager generator of ``vlm``: BLIP captioning / VQA's own
    (:class:`BlipTorchGenerator`), else :class:`TorchGenerator` (llava, blip2)."""
    if getattr(vlm, "onnx_generation", "llava") == "blip":
        return BlipTorchGenerator(vlm)
    return TorchGenerator(vlm)
