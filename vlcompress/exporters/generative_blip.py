"""ONNX export of BLIP captioning / VQA, validated against PyTorch.

    result = export_blip(vlm, "run/pruned", images=val_images, questions=None)
    result.paths  # {"vision": .../vision.onnx, "decoder": .../decoder.onnx}

BLIP's decoder is not fed merged ``inputs_embeds`` as LLaVA's is: it reads the image through
cross-attention. So the split (runner: :mod:`vlcompress.runtime.ort_generate_blip`) is

- ``vision.onnx``: ``pixel_values`` -> ``image_embeds`` (the ViT's last hidden state,
  post-LayerNorm: what the decoder's cross-attention reads);
- ``question.onnx`` (VQA): ``input_ids``, ``attention_mask``, ``image_embeds`` ->
  ``question_states`` (the question encoder, its cross-attention reading the image);
- ``decoder.onnx``: ``input_ids``, ``position_ids``, ``attention_mask`` [batch, past +
  sequence], ``encoder_hidden_states`` and the self-attention cache ``past.{i}.key`` /
  ``past.{i}.value`` -> ``logits``, ``present.{i}.*``. The embedding (word + absolute
  position, LayerNorm) is inside: BLIP's embedding adds the position, so a separate
  ``embed.onnx`` would need the positions too and save nothing.

The wrappers call each ``BlipTextLayer``'s self-attention, cross-attention and feed-forward
themselves: the layer's own forward hands one cache object to both attentions, and a cache
that is not transformers' ``EncoderDecoderCache`` would get the cross-attention's keys
appended to the self-attention's. No encoder mask: transformers' ``BlipTextAttention`` does
not hand its mask to a cross-attention (``BlipTextSelfAttention`` then reads its
``encoder_attention_mask`` argument, which is never passed), so PyTorch attends every
encoder token, a VQA question's padding included; the graphs compute what PyTorch computes.
The additive masks (causal over past + sequence, padding) are built here from the 2-D mask
(``finfo.min``), bypassing transformers' mask functions, whose Python branches (an all-ones
mask dropped) do not trace. Attention is traced in the ``eager`` implementation, TorchScript
exporter (opset 17), weights named after the model's parameters; generation.json carries
``"kind"`` (``blip-caption`` / ``blip-vqa``), the token ids, the per-layer head counts (a
structurally pruned decoder has its own per layer) and the caption prompt.

Validation collects every mismatch into ONE :class:`ExportError`: vision (and question)
outputs, decoder prefill logits and presents (batch 3, row 0 left-padded, empty past) and one
decode step on that cache within ``atol + rtol * |torch|``; and greedy generation on the ONNX
graphs token for token equal to :meth:`BlipCaption.generate` (transformers' ``generate``)
on every validation prompt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from ..runtime.ort_generate import GENERATION_JSON
from ..runtime.ort_generate_blip import BlipOrtGenerator, blip_inputs
from .generative import TOLERANCE, GenerativeExport, _diff, _eager_attention, _export

__all__ = ["export_blip", "validate_blip", "BlipDecoderGraph", "BlipVisionGraph"]


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


def _run_layers(layers, h, mask, enc, past=None):
    """Each ``BlipTextLayer``: self-attention (with its cache when ``past`` is given),
    cross-attention to ``enc`` (no cache: recomputed; no mask, see the module doc),
    feed-forward."""
    caches = []
    for i, layer in enumerate(layers):
        cache = _LayerCache(past[2 * i], past[2 * i + 1]) if past is not None else None
        a, _ = layer.attention(h, attention_mask=mask, cache=cache)
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


class BlipDecoderGraph(torch.nn.Module):
    """The text decoder with a flat self-attention KV cache (module doc)."""

    def __init__(self, model):
        super().__init__()
        self.dec = model.text_decoder

    def forward(self, input_ids, position_ids, attention_mask, encoder_hidden_states, *past):
        bert = self.dec.bert
        h = bert.embeddings(input_ids=input_ids, position_ids=position_ids)
        seq, total = input_ids.shape[1], attention_mask.shape[1]
        q = torch.arange(seq, device=h.device) + (total - seq)
        k = torch.arange(total, device=h.device)
        allowed = (k[None, :] <= q[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = _additive(allowed, h.dtype)
        h, caches = _run_layers(bert.encoder.layer, h, mask, encoder_hidden_states, list(past))
        logits = self.dec.cls(h)
        return (logits, *[t for c in caches for t in (c.key, c.value)])


def _heads(model) -> list[int]:
    return [int(ly.attention.self.num_attention_heads)
            for ly in model.text_decoder.bert.encoder.layer]


def _head_dim(model) -> int:
    return int(model.text_decoder.bert.encoder.layer[0].attention.self.attention_head_size)


def _names(n_layers: int):
    past = [f"past.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [p.replace("past.", "present.", 1) for p in past]
    ins = ["input_ids", "position_ids", "attention_mask", "encoder_hidden_states", *past]
    return ins, ["logits", *present]


def _example_pixels(model, batch: int, seed: int) -> torch.Tensor:
    v = model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, getattr(v, "num_channels", 3), v.image_size, v.image_size,
                       generator=g)


def _decoder_args(model, batch: int, seq: int, past: int, seed: int, pad: int = 0,
                  enc_tokens: int = 5):
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
    """Write ``vision.onnx`` (``question.onnx`` for VQA), ``decoder.onnx`` and
    ``generation.json`` into ``out_dir``; ``validate``: check them against PyTorch on
    ``images`` / ``questions`` (one ExportError naming every mismatch)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = vlm.model.eval()
    vqa = vlm.family == "blip-vqa"
    files = {"vision": "vision.onnx", **({"question": "question.onnx"} if vqa else {}),
             "decoder": "decoder.onnx"}
    paths = {p: out / f for p, f in files.items()}
    props = {"vlcompress.model": str(vlm.name), "vlcompress.family": vlm.family}
    heads = _heads(model)
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
        ins, outs = _names(len(heads))
        axes = {"input_ids": {0: "batch", 1: "sequence"},
                "position_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "total_sequence"},
                "encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
                "logits": {0: "batch", 1: "sequence"}}
        axes |= {k: {0: "batch", 2: "past_sequence"} for k in ins[4:]}
        axes |= {k: {0: "batch", 2: "total_sequence"} for k in outs[1:]}
        _export(BlipDecoderGraph(model), _decoder_args(model, 2, 3, 2, 0), paths["decoder"],
                ins, outs, axes, {**props, "vlcompress.part": "decoder"}, model)
    tc = model.config.text_config
    spec = {"kind": vlm.family, "family": vlm.family, "model": str(vlm.name), "files": files,
            "vocab_size": int(tc.vocab_size), "bos_token_id": vlm.bos_id,
            "sep_token_id": vlm.sep_id, "pad_token_id": vlm.pad_id,
            "num_layers": len(heads), "num_heads": heads, "head_dim": _head_dim(model),
            "context": int(tc.max_position_embeddings), "prompt": vlm.prompts["caption"],
            "precision": "fp32"}
    (out / GENERATION_JSON).write_text(json.dumps(spec, indent=2))
    res = GenerativeExport(paths)
    if validate:
        res.validation = validate_blip(vlm, out, images=images, questions=questions,
                                       max_new_tokens=max_new_tokens)
    res.seconds = time.perf_counter() - t0
    return res


@torch.no_grad()
def validate_blip(vlm, folder: str | Path, *, images, questions=None, max_new_tokens: int = 16,
                  atol: float = TOLERANCE["atol"], rtol: float = TOLERANCE["rtol"]) -> dict:
    """Compare the export in ``folder`` with PyTorch (module doc); raise one ExportError
    listing every mismatch, else return the measured figures."""
    model = vlm.model.eval()
    gen = BlipOrtGenerator(folder)
    diffs, problems = {}, []

    def check(name, got, ref):
        d, ok = _diff(got, ref, atol, rtol)
        diffs[name] = d
        if not ok:
            problems.append(f"{name} max abs diff {d:.3g}")

    px = _example_pixels(model, 3, 1)
    emb = BlipVisionGraph(model)(px)
    check("vision", gen.image_embeds(px.numpy()), emb)
    if gen.vqa:
        qi = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0], [2, 9, 10, 3, 0]])
        qi = qi % int(model.config.text_config.vocab_size)
        qm = (torch.arange(5)[None] < torch.tensor([[5], [3], [4]])).long()
        check("question", gen.question_states(qi.numpy(), qm.numpy(), emb.numpy()),
              BlipQuestionGraph(model)(qi, qm, emb))
    dec = BlipDecoderGraph(model)
    n = len(_heads(model))
    with _eager_attention(model):
        args = _decoder_args(model, 3, 6, 0, 2, pad=2)
        ref = dec(*args)
        past = dict(zip(_names(n)[0][4:], [t.numpy() for t in args[4:]], strict=True))
        logits, past = gen.decode_step(*[a.numpy() for a in args[:4]], past)
        check("decoder prefill logits", logits, ref[0])
        check("decoder prefill presents", np.concatenate([v.ravel() for v in past.values()]),
              torch.cat([t.ravel() for t in ref[1:]]))
        step = _decoder_args(model, 3, 1, 0, 3)[0]
        mask = torch.cat([args[2], torch.ones(3, 1, dtype=torch.long)], 1)
        pos = args[1][:, -1:] + 1
        ref2 = dec(step, pos, mask, args[3], *ref[1:])
        logits2, _ = gen.decode_step(step.numpy(), pos.numpy(), mask.numpy(), args[3].numpy(),
                                     past)
        check("decoder decode logits", logits2, ref2[0])
    images = list(images)
    qs = list(questions) if questions is not None else [None] * len(images)
    exact, bad = 0, []
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
        for j, (a, b) in enumerate(zip(torch_tokens, onnx_tokens, strict=True)):
            exact += a == b
            if a != b:
                bad.append(i + j)
    if bad:
        problems.append(f"greedy generation differs from PyTorch on {len(bad)} of "
                        f"{len(images)} prompts (first: #{bad[0]})")
    if problems:
        raise ExportError(f"BLIP ONNX export in {str(folder)!r} does not match PyTorch: "
                          + "; ".join(problems) + f" (tolerance atol={atol:g} rtol={rtol:g})")
    return {"max_abs_diff": diffs, "atol": atol, "rtol": rtol, "prompts": len(images),
            "token_exact": exact / max(1, len(images)), "max_new_tokens": int(max_new_tokens)}
