"""BLIP-2 / OPT wrappers for the generative ONNX export (:mod:`vlcompress.exporters.generative`):
the same three graphs and the same decoder contract as LLaVA's, so
:class:`vlcompress.runtime.ort_generate.OrtGenerator` runs them unchanged.

- ``vision.onnx`` (:class:`Blip2VisionGraph`): ``pixel_values`` -> ``image_embeds`` [batch,
  num_query_tokens, hidden]: the ViT, the Q-Former's learned queries cross-attending to its
  tokens, and ``language_projection`` (``Blip2ForConditionalGeneration.get_image_features``'s
  ``pooler_output``; the image attention mask is all ones, so none is passed);
- ``embed.onnx`` (:class:`OptEmbedGraph`): OPT's token embedding (``word_embed_proj_dim`` wide);
- ``decoder.onnx`` (:class:`OptDecoderGraph`): ``inputs_embeds``, ``attention_mask``,
  ``position_ids`` and the flat ``past.{i}.key`` / ``past.{i}.value`` (``num_attention_heads``
  heads: OPT has no grouped-query attention) and ``logits_to_keep`` -> ``logits`` (the last
  position's by default) and ``present.*``. OPT has no rotary
  embedding: it adds a learned position embedding indexed at ``position_ids + 2`` (OPT's
  offset, ``OPTLearnedPositionalEmbedding``) to ``project_in(inputs_embeds)`` before the
  layers, and ends with ``final_layer_norm``, ``project_out`` and the LM head. Each layer's
  attention calls the cache's ``update`` (keys/values appended to the past), as LLaMA's does.

The positions the ONNX loop feeds (``cumsum(mask) - 1``, 0 at padding) equal OPT's own
(``cumsum(mask) * mask - 1``) at every real token; at padding they differ (0 against -1),
which no real token sees (padding is masked as a key).
"""

from __future__ import annotations

import torch

from ._decoder import FlatCache, additive_mask, keep_positions


class Blip2VisionGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        m = self.model
        image = m.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        queries = m.query_tokens.expand(image.shape[0], -1, -1)
        out = m.qformer(query_embeds=queries, encoder_hidden_states=image,
                        return_dict=True).last_hidden_state
        return m.language_projection(out.to(image.dtype))


class OptEmbedGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.language_model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class OptDecoderGraph(torch.nn.Module):
    """OPT's decoder with a flat KV cache (module doc)."""

    def __init__(self, model):
        super().__init__()
        self.dec = model.language_model.model.decoder
        self.head = model.language_model.lm_head

    def forward(self, inputs_embeds, attention_mask, position_ids, *past, logits_to_keep=None):
        d = self.dec
        mask = additive_mask(inputs_embeds, attention_mask)
        cache = FlatCache(list(past))
        h = inputs_embeds if d.project_in is None else d.project_in(inputs_embeds)
        h = h + d.embed_positions(attention_mask, position_ids=position_ids)
        for layer in d.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, cache=cache,
                      use_cache=True)
            h = h[0] if isinstance(h, tuple) else h
        h = keep_positions(h, logits_to_keep)  # (exporters.generative's module doc)
        if d.final_layer_norm is not None:
            h = d.final_layer_norm(h)
        if d.project_out is not None:
            h = d.project_out(h)
        return (self.head(h), *cache.presents())
