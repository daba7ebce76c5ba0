"""ONNX export of BLIP captioning / VQA, validated against PyTorch.

    result = export_blip(vlm, "run/pruned", images=val_images, questions=None)
    result.paths  # {"vision": .../vision.onnx, "cross_kv": ..., "decoder": .../decoder.onnx}

BLIP's decoder is not fed merged ``inputs_embeds`` as LLaVA's is: it reads the image through
cross-attention. So the split (runner: :mod:`vlcompress.runtime.ort_generate_blip`) is

- ``vision.onnx``: ``pixel_values`` -> ``image_embeds`` (the ViT's last hidden state,
  post-LayerNorm: what the decoder's cross-attention reads);
- ``question.onnx`` (VQA): ``input_ids``, ``attention_mask``, ``image_embeds`` ->
  ``question_states`` (the question encoder, its cross-attention reading the image);
- ``cross_kv.onnx``: ``encoder_hidden_states`` (image embeds, or question states) ->
  ``cross.{i}.key`` / ``cross.{i}.value`` [batch, cross heads of layer i, encoder tokens,
  head_dim]: each decoder layer's cross-attention keys and values, projected ONCE per
  request (they depend on the encoder states only, not on the generated tokens);
- ``decoder.onnx``: ``input_ids``, ``position_ids``, ``attention_mask`` [batch, past +
  sequence], the ``cross.{i}.*`` of ``cross_kv.onnx`` and the self-attention cache
  ``past.{i}.key`` / ``past.{i}.value`` -> ``logits``, ``present.{i}.*``. The embedding
  (word + absolute position, LayerNorm) is inside: BLIP's embedding adds the position, so a
  separate ``embed.onnx`` would need the positions too and save nothing.

The cross-attention keys / values were an input the decoder recomputed at every step before
(``encoder_hidden_states``: two [encoder tokens x encoder width] x [width x width] products
per layer and token); transformers' ``generate`` keeps them in its ``EncoderDecoderCache``
after the first step, and so does this split, as Optimum's encoder-decoder exports do with
their ``past_key_values.{i}.encoder.*`` inputs -- here computed by their own small graph, so
the decoder stays ONE merged graph (prefill and decode) and never carries a branch.

The wrappers call each ``BlipTextLayer``'s self-attention, cross-attention and feed-forward
themselves: the layer's own forward hands one cache object to both attentions, and a cache
that is not transformers' ``EncoderDecoderCache`` would get the cross-attention's keys
appended to the self-attention's. The decoder's cross-attention (:func:`_cross_attend`) is
``BlipTextSelfAttention``'s arithmetic on given keys / values (query projection, scaled
dot product, softmax, weighted sum) followed by the module's own output block
(``BlipTextSelfOutput``: dense, residual, LayerNorm); validation compares it with the
module's own forward (:class:`BlipReferenceDecoder`, which recomputes them). No encoder
mask: transformers' ``BlipTextAttention`` does not hand its mask to a cross-attention
(``BlipTextSelfAttention`` then reads its ``encoder_attention_mask`` argument, which is
never passed), so PyTorch attends every encoder token, a VQA question's padding included;
the graphs compute what PyTorch computes. The additive masks (causal over past + sequence,
padding) are built here from the 2-D mask (``finfo.min``), bypassing transformers' mask
functions, whose Python branches (an all-ones mask dropped) do not trace. Attention is
traced in the ``eager`` implementation, TorchScript exporter (opset 17), weights named after
the model's parameters; generation.json carries ``"kind"`` (``blip-caption`` /
``blip-vqa``), the token ids, the per-layer head counts of the self-attention
(``num_heads``, also as ``num_key_value_heads``: BLIP has no grouped-query attention) and of
the cross-attention (``cross_heads``): a structurally pruned decoder has its own per layer;
and the caption prompt.

Validation collects every mismatch into ONE :class:`ExportError`: vision (and question)
outputs, the cross keys / values, decoder prefill logits and presents (batch 3, row 0
left-padded, empty past) and one decode step on that cache, against the reference decoder
that recomputes the cross-attention from the encoder states with transformers' own module,
within ``atol + rtol * |torch|``; and greedy generation on the ONNX graphs token for token
equal to :meth:`BlipCaption.generate` (transformers' ``generate``) on every validation
prompt.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from ..runtime.ort_generate import GENERATION_JSON
from ..runtime.ort_generate_blip import BlipOrtGenerator, blip_inputs
from ._decoder import additive_mask
from .generative import TOLERANCE, GenerativeExport, _diff, _eager_attention, _export

__all__ = ["export_blip", "validate_blip", "BlipDecoderGraph", "BlipVisionGraph",
           "BlipCrossKVGraph", "BlipReferenceDecoder", "blip_greedy_pairs", "blip_logit_checks"]


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class _LayerCache:
    """One layer's self-attention cache: ``update`` concatenates (transformers'
    ``DynamicLayer``), whatever layer index the attention module carries."""

    def __init__(self, key, value):
        self.key, self.value = key, value

    def update(self, key, value, *args, **kwargs):
        self.key = torch.cat([self.key, key], dim=-2)
        self.value = torch.cat([self.value, value], dim=-2)
        return self.key, self.value


def _split_heads(att, x: torch.Tensor) -> torch.Tensor:
    """[batch, tokens, heads x head_dim] -> [batch, heads, tokens, head_dim] (the heads a
    structurally pruned layer kept: the width divided by the head size)."""
    return x.view(*x.shape[:-1], -1, att.attention_head_size).transpose(1, 2)


def _cross_kv(layer, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's cross-attention keys and values of the encoder states ``enc``, as
    ``BlipTextSelfAttention`` projects them."""
    att = layer.crossattention.self
    return _split_heads(att, att.key(enc)), _split_heads(att, att.value(enc))


def _cross_attend(layer, h: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """``layer``'s cross-attention of ``h`` over given keys / values: the arithmetic of
    ``BlipTextSelfAttention.forward`` (query, scaled scores, no mask, softmax, weighted sum,
    heads merged) and the module's own output block (dense, dropout, residual, LayerNorm)."""
    att = layer.crossattention.self
    q = _split_heads(att, att.query(h))
    scores = torch.matmul(q, key.transpose(-1, -2)) / math.sqrt(att.attention_head_size)
    ctx = torch.matmul(torch.softmax(scores, dim=-1), value).permute(0, 2, 1, 3).contiguous()
    return layer.crossattention.output(ctx.view(*ctx.shape[:-2], -1), h)


def _run_layers(layers, h, mask, enc=None, past=None, cross=None):
    """Each ``BlipTextLayer``: self-attention (with its cache when ``past`` is given),
    cross-attention (to ``enc`` through the module itself, keys / values recomputed; or to
    the given ``cross`` keys / values, :func:`_cross_attend`; no mask, see the module doc),
    feed-forward."""
    caches = []
    for i, layer in enumerate(layers):
        cache = _LayerCache(past[2 * i], past[2 * i + 1]) if past is not None else None
        a, _ = layer.attention(h, attention_mask=mask, cache=cache)
        if cross is not None:
            a = _cross_attend(layer, a, cross[2 * i], cross[2 * i + 1])
        else:
            a, _ = layer.crossattention(a, encoder_hidden_states=enc)
        h = layer.feed_forward_chunk(a)
        caches.append(cache)
    return h, caches


class BlipVisionGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values)[0]


class BlipQuestionGraph(torch.nn.Module):
    """The VQA question encoder (bidirectional, padding masked, cross-attending the image)."""

    def __init__(self, model):
        super().__init__()
        self.enc = model.text_encoder

    def forward(self, input_ids, attention_mask, image_embeds):
        h = self.enc.embeddings(input_ids=input_ids)
        mask = _additive((attention_mask > 0)[:, None, None, :], h.dtype)
        h, _ = _run_layers(self.enc.encoder.layer, h, mask, image_embeds)
        return h


class BlipCrossKVGraph(torch.nn.Module):
    """Every decoder layer's cross-attention keys and values of the encoder states: computed
    once per request (module doc)."""

    def __init__(self, model):
        super().__init__()
        self.layers = model.text_decoder.bert.encoder.layer

    def forward(self, encoder_hidden_states):
        return tuple(t for layer in self.layers for t in _cross_kv(layer, encoder_hidden_states))


class _Decoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.dec = model.text_decoder
        self.n = len(self.dec.bert.encoder.layer)

    def _run(self, input_ids, position_ids, attention_mask, past, enc=None, cross=None):
        bert = self.dec.bert
        h = bert.embeddings(input_ids=input_ids, position_ids=position_ids)
        mask = additive_mask(h, attention_mask)
        h, caches = _run_layers(bert.encoder.layer, h, mask, enc, list(past), cross)
        logits = self.dec.cls(h)
        return (logits, *[t for c in caches for t in (c.key, c.value)])


class BlipDecoderGraph(_Decoder):
    """The text decoder with a flat self-attention KV cache, reading the cross-attention keys
    / values of :class:`BlipCrossKVGraph` (module doc): ``(input_ids, position_ids,
    attention_mask, cross.0.key, cross.0.value, ..., past.0.key, past.0.value, ...)``."""

    def forward(self, input_ids, position_ids, attention_mask, *kv):
        n = 2 * self.n
        return self._run(input_ids, position_ids, attention_mask, kv[n:], cross=list(kv[:n]))


class BlipReferenceDecoder(_Decoder):
    """The decoder recomputing its cross-attention from ``encoder_hidden_states`` with
    transformers' own ``BlipTextAttention`` at every call: the reference the cached graph is
    validated against (and the pre-cache decoder, for timing the difference)."""

    def forward(self, input_ids, position_ids, attention_mask, encoder_hidden_states, *past):
        return self._run(input_ids, position_ids, attention_mask, past, enc=encoder_hidden_states)


def _heads(model) -> list[int]:
    return [int(ly.attention.self.num_attention_heads)
            for ly in model.text_decoder.bert.encoder.layer]


def _cross_heads(model) -> list[int]:
    """Each layer's cross-attention heads (its key projection's width / the head size: a
    structured prune slices them apart from the self-attention's)."""
    return [int(ly.crossattention.self.key.out_features)
            // int(ly.crossattention.self.attention_head_size)
            for ly in model.text_decoder.bert.encoder.layer]


def _head_dim(model) -> int:
    return int(model.text_decoder.bert.encoder.layer[0].attention.self.attention_head_size)


def _kv_names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _names(n_layers: int):
    """(inputs, outputs) of the decoder graph."""
    past = _kv_names("past", n_layers)
    ins = ["input_ids", "position_ids", "attention_mask", *_kv_names("cross", n_layers), *past]
    return ins, ["logits", *_kv_names("present", n_layers)]


def _example_pixels(model, batch: int, seed: int) -> torch.Tensor:
    v = model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, getattr(v, "num_channels", 3), v.image_size, v.image_size,
                       generator=g)


def _decoder_args(model, batch: int, seq: int, past: int, seed: int, pad: int = 0,
                  enc_tokens: int = 5):
    """Random reference-decoder inputs: ids, positions, mask, encoder states, past."""
    tc = model.config.text_config
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if pad:
        mask[0, :pad] = 0  # row 0 left-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    ids = torch.randint(0, int(tc.vocab_size), (batch, seq), generator=g)
    enc = torch.randn(batch, enc_tokens, int(tc.encoder_hidden_size), generator=g)
    hd = _head_dim(model)
    pasts = [torch.randn(batch, h, past, hd, generator=g) for h in _heads(model) for _ in (0, 1)]
    return [ids, pos, mask, enc, *pasts]


def export_blip(vlm, out_dir: str | Path, *, images, questions=None, max_new_tokens: int = 16,
                validate: bool = True) -> GenerativeExport:
    """Write ``vision.onnx`` (``question.onnx`` for VQA), ``cross_kv.onnx``, ``decoder.onnx``
    and ``generation.json`` into ``out_dir``; ``validate``: check them against PyTorch on
    ``images`` / ``questions`` (one ExportError naming every mismatch)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = vlm.model.eval()
    vqa = vlm.family == "blip-vqa"
    files = {"vision": "vision.onnx", **({"question": "question.onnx"} if vqa else {}),
             "cross_kv": "cross_kv.onnx", "decoder": "decoder.onnx"}
    paths = {p: out / f for p, f in files.items()}
    props = {"vlcompress.model": str(vlm.name), "vlcompress.family": vlm.family}
    heads = _heads(model)
    n = len(heads)
    with _eager_attention(model):
        _export(BlipVisionGraph(model), [_example_pixels(model, 2, 0)], paths["vision"],
                ["pixel_values"], ["image_embeds"],
                {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
                {**props, "vlcompress.part": "vision"}, model)
        if vqa:
            v = int(model.config.vision_config.hidden_size)
            _export(BlipQuestionGraph(model),
                    [torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]), torch.tensor([[1, 1, 1, 1],
                                                                             [1, 1, 1, 0]]),
                     torch.randn(2, 5, v)], paths["question"],
                    ["input_ids", "attention_mask", "image_embeds"], ["question_states"],
                    {"input_ids": {0: "batch", 1: "sequence"},
                     "attention_mask": {0: "batch", 1: "sequence"},
                     "image_embeds": {0: "batch", 1: "image_tokens"},
                     "question_states": {0: "batch", 1: "sequence"}},
                    {**props, "vlcompress.part": "question"}, model)
        ref_args = _decoder_args(model, 2, 3, 2, 0)
        cross_names = _kv_names("cross", n)
        _export(BlipCrossKVGraph(model), [ref_args[3]], paths["cross_kv"],
                ["encoder_hidden_states"], cross_names,
                {"encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
                 **{k: {0: "batch", 2: "encoder_sequence"} for k in cross_names}},
                {**props, "vlcompress.part": "cross_kv"}, model)
        with torch.no_grad():
            cross = list(BlipCrossKVGraph(model)(ref_args[3]))
        ins, outs = _names(n)
        axes = {"input_ids": {0: "batch", 1: "sequence"},
                "position_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "total_sequence"},
                "logits": {0: "batch", 1: "sequence"}}
        axes |= {k: {0: "batch", 2: "encoder_sequence"} for k in cross_names}
        axes |= {k: {0: "batch", 2: "past_sequence"} for k in ins[3 + 2 * n:]}
        axes |= {k: {0: "batch", 2: "total_sequence"} for k in outs[1:]}
        _export(BlipDecoderGraph(model), [*ref_args[:3], *cross, *ref_args[4:]],
                paths["decoder"], ins, outs, axes, {**props, "vlcompress.part": "decoder"}, model)
    tc = model.config.text_config
    spec = {"kind": vlm.family, "family": vlm.family, "model": str(vlm.name), "files": files,
            "vocab_size": int(tc.vocab_size), "vocab_size_out": int(tc.vocab_size),
            "bos_token_id": vlm.bos_id, "sep_token_id": vlm.sep_id, "eos_token_id": vlm.sep_id,
            "pad_token_id": vlm.pad_id, "num_layers": n, "num_heads": heads,
            "num_key_value_heads": heads, "cross_heads": _cross_heads(model),
            "head_dim": _head_dim(model), "context": int(tc.max_position_embeddings),
            "prompt": vlm.prompts["caption"], "precision": "fp32", "cross_kv": "once"}
    (out / GENERATION_JSON).write_text(json.dumps(spec, indent=2))
    res = GenerativeExport(paths)
    if validate:
        res.validation = validate_blip(vlm, out, images=images, questions=questions,
                                       max_new_tokens=max_new_tokens)
    res.seconds = time.perf_counter() - t0
    return res


def blip_greedy_pairs(vlm, gen, images, questions=None, max_new_tokens: int = 16
                      ) -> list[tuple[list[int], list[int]]]:
    """(PyTorch ``generate``'s tokens, the ONNX generator's tokens) per prompt, in batches of
    8 (captions left-padded; VQA questions padded as the tokenizer pads)."""
    images = list(images)
    qs = list(questions) if questions is not None else [None] * len(images)
    pairs = []
    for i in range(0, len(images), 8):
        im, q = images[i:i + 8], qs[i:i + 8]
        torch_tokens = vlm.generate(im, q if gen.vqa else None, max_new_tokens=max_new_tokens)
        feed = blip_inputs(vlm.tokenizer, vlm.image_processor, im, bos_id=vlm.bos_id,
                           prompt=vlm.prompts["caption"],
                           questions=[vlm.prompt(x) for x in q] if gen.vqa else None)
        onnx_tokens = gen.generate(feed["input_ids"], feed["attention_mask"],
                                   feed["pixel_values"], max_new_tokens,
                                   question_ids=feed.get("question_ids"),
                                   question_mask=feed.get("question_mask"))
        pairs += list(zip(torch_tokens, onnx_tokens, strict=True))
    return pairs


@torch.no_grad()
def blip_logit_checks(vlm, gen) -> list[tuple[str, np.ndarray, torch.Tensor, np.ndarray | None]]:
    """(name, ONNX output, PyTorch reference, valid rows or None) of every graph of the export
    behind ``gen`` on inputs the export never saw: the vision (and question) output, the cross
    keys / values, the decoder's prefill logits and presents (batch 3, row 0 left-padded by 2,
    empty past) and one decode step on that cache, the reference recomputing the
    cross-attention with transformers' module (:class:`BlipReferenceDecoder`)."""
    model = vlm.model.eval()
    out = []
    px = _example_pixels(model, 3, 1)
    emb = BlipVisionGraph(model)(px)
    out.append(("vision", gen.image_embeds(px.numpy()), emb, None))
    if gen.vqa:
        qi = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0], [2, 9, 10, 3, 0]])
        qi = qi % int(model.config.text_config.vocab_size)
        qm = (torch.arange(5)[None] < torch.tensor([[5], [3], [4]])).long()
        out.append(("question", gen.question_states(qi.numpy(), qm.numpy(), emb.numpy()),
                    BlipQuestionGraph(model)(qi, qm, emb), None))
    dec = BlipReferenceDecoder(model)
    with _eager_attention(model):
        args = _decoder_args(model, 3, 6, 0, 2, pad=2)
        enc = args[3]
        cross = gen.cross_kv(enc.numpy())
        out.append(("cross kv", np.concatenate([c.ravel().astype(np.float32) for c in cross]),
                    torch.cat([t.ravel() for t in BlipCrossKVGraph(model)(enc)]), None))
        ref = dec(*args)
        past = gen.empty_past(3)
        logits, past = gen.decode_step(*[a.numpy() for a in args[:3]], cross, past)
        out.append(("decoder prefill logits", logits, ref[0], args[2].numpy()[:, -6:] > 0))
        out.append(("decoder prefill presents",
                    np.concatenate([v.ravel().astype(np.float32) for v in past.values()]),
                    torch.cat([t.ravel() for t in ref[1:]]), None))
        step = _decoder_args(model, 3, 1, 0, 3)[0]
        mask = torch.cat([args[2], torch.ones(3, 1, dtype=torch.long)], 1)
        pos = args[1][:, -1:] + 1
        ref2 = dec(step, pos, mask, enc, *ref[1:])
        logits2, _ = gen.decode_step(step.numpy(), pos.numpy(), mask.numpy(), cross, past)
        out.append(("decoder decode logits", logits2, ref2[0], None))
    return out


@torch.no_grad()
def validate_blip(vlm, folder: str | Path, *, images, questions=None, max_new_tokens: int = 16,
                  atol: float = TOLERANCE["atol"], rtol: float = TOLERANCE["rtol"]) -> dict:
    """Compare the export in ``folder`` with PyTorch (module doc); raise one ExportError
    listing every mismatch, else return the measured figures."""
    gen = BlipOrtGenerator(folder)
    diffs, problems = {}, []
    for name, got, ref, _valid in blip_logit_checks(vlm, gen):
        d, ok = _diff(got, ref, atol, rtol)
        diffs[name] = d
        if not ok:
            problems.append(f"{name} max abs diff {d:.3g}")
    pairs = blip_greedy_pairs(vlm, gen, images, questions, max_new_tokens)
    bad = [i for i, (a, b) in enumerate(pairs) if a != b]
    if bad:
        problems.append(f"greedy generation differs from PyTorch on {len(bad)} of "
                        f"{len(pairs)} prompts (first: #{bad[0]})")
    if problems:
        raise ExportError(f"BLIP ONNX export in {str(folder)!r} does not match PyTorch: "
                          + "; ".join(problems) + f" (tolerance atol={atol:g} rtol={rtol:g})")
    return {"max_abs_diff": diffs, "atol": atol, "rtol": rtol, "prompts": len(pairs),
            "token_exact": (len(pairs) - len(bad)) / max(1, len(pairs)),
            "max_new_tokens": int(max_new_tokens), "cross_kv": "once per request"}
