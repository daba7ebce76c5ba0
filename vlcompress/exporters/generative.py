"""ONNX export of a generative VLM (llava) in three graphs, validated against PyTorch.

    result = export_generative(vlm, "run/pruned", images=val_images, questions=None)
    result.paths  # {"vision": .../vision.onnx, "embed": .../embed.onnx, "decoder": ...}

The split is the one ONNX Runtime GenAI and transformers.js use for VLMs (Optimum has no
LLaVA config):

- ``vision.onnx``: ``pixel_values`` [batch, 3, H, W] -> ``image_embeds`` [batch, tokens,
  hidden]: the vision tower up to ``vision_feature_layer``, the feature selection
  (``default`` drops CLS) and the projector (``LlavaModel.get_image_features``); with
  ``visual_tokens`` K (``--visual-tokens``) the graph keeps K tokens per image
  (:mod:`vlcompress.models.visual_tokens`) and also outputs ``image_positions`` [batch, K],
  each kept token's index among the tower's tokens, from which the generation loop places
  it at its full-prompt position;
- ``embed.onnx``: ``input_ids`` [batch, sequence] -> ``inputs_embeds``;
- ``decoder.onnx``: ``inputs_embeds`` [batch, sequence, hidden], ``attention_mask`` [batch,
  past_sequence + sequence] (1 = token, 0 = left padding), ``position_ids`` [batch, sequence]
  and ``past.{i}.key`` / ``past.{i}.value`` [batch, kv_heads, past_sequence, head_dim] per layer
  -> ``logits`` [batch, kept, vocab] and ``present.{i}.key`` / ``present.{i}.value`` (the
  past with this call's keys/values appended). One merged graph: prefill is a call with an
  empty past (``past_sequence`` 0), decode a call with one token. Grouped-query attention keeps
  ``num_key_value_heads`` heads in the cache.

The LM head runs on the last position only unless asked (transformers' ``logits_to_keep``):
the graph has an optional int64 input ``logits_to_keep``, an ONNX Runtime *overridable
initializer* of default 1 (a caller that does not feed it, ONNX Runtime GenAI included, gets
``logits`` [batch, 1, vocab]); N keeps the last N positions, 0 every position (what the
teacher-forced fidelity of :mod:`vlcompress.eval.generative_ort` reads). Prompts are
left-padded, so the last position is every row's next token, and generation reads nothing
else. A head over every prompt position costs prompt x hidden x vocab multiply-adds and a
prompt x vocab output (Qwen2's 151,936 rows: 0.45 GB of fp32 logits for a 738-token LLaVA
prompt) that the loop throws away. Exports written before this have no ``logits_to_keep``
and return every position's logits; the generator reads either.

The decoder is wrapped (:class:`DecoderGraph`): it runs the language model's own decoder
layers, rotary embedding, final norm and LM head, with the cache given as flat tensors (a
small cache object whose ``update`` concatenates, as transformers' ``DynamicLayer`` does) and
the additive 4-D mask built here from the 2-D mask (causal over past + sequence, padding
masked; ``finfo.min`` rather than -inf, so a padding row's softmax stays finite). Attention is
traced in transformers' ``eager`` implementation (set for the export, restored after): the
SDPA path's GQA argument has no TorchScript-ONNX symbolic. The exporter is TorchScript
(``dynamo=False``), whose tracing records the tensor shapes the wrapper reads as graph ops;
the encoder export (:mod:`vlcompress.exporters.onnx`) tries ``dynamo=True`` first.

Validation (:func:`validate_generative`), on inputs the export never saw, collects every
mismatch into ONE :class:`ExportError`: the vision and embedding outputs and the decoder's
last-position logits (also against the full language model's own forward, so the slice is
checked, not only the trace) and presents (prefill at batch 3 with left padding, then one decode step on that
cache) within ``atol + rtol * |torch|``, and greedy generation on the ONNX graphs
(:class:`vlcompress.runtime.ort_generate.OrtGenerator`) token for token equal to PyTorch's
``generate`` on every validation prompt.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from onnx import helper, numpy_helper

from ..errors import ExportError, ModelError
from ..models.visual_tokens import METHOD as VISUAL_TOKENS_METHOD
from ..models.visual_tokens import image_features, reduced_tokens, split_tokens, tower_tokens
from ..runtime.ort_generate import GENERATION_JSON, OrtGenerator, kv_heads_of, prompt_inputs
from ._decoder import FlatCache as _FlatCache
from ._decoder import additive_mask, keep_positions
from .onnx import _name_initializers, _quiet, _short, load_proto, save_onnx

__all__ = ["GenerativeExport", "export_generative", "validate_generative", "DecoderGraph",
           "TOLERANCE"]

OPSET = 17
TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}
FILES = {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"}
LOGITS_TO_KEEP = "logits_to_keep"  # the decoder's optional input (module doc)


@dataclass
class GenerativeExport:
    paths: dict[str, Path]
    validation: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"paths": {k: str(v) for k, v in self.paths.items()}, "precision": "fp32",
                "exporter": "torchscript", "validation": self.validation,
                "seconds": round(self.seconds, 2)}


class VisionGraph(torch.nn.Module):
    def __init__(self, model, visual_tokens: int | None = None):
        super().__init__()
        self.model = model
        self.visual_tokens = visual_tokens

    def forward(self, pixel_values):
        """``LlavaModel.get_image_features`` without its final per-image split (a list,
        which tracing would fix to the example's batch size), keeping ``visual_tokens`` of
        the tower's tokens when given (:mod:`vlcompress.models.visual_tokens`, the same
        function the PyTorch evaluation runs)."""
        if self.visual_tokens is None:
            return image_features(self.model, pixel_values)
        return image_features(self.model, pixel_values, self.visual_tokens, with_index=True)


class EmbedGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.model.language_model.embed_tokens

    def forward(self, input_ids):
        return self.embed(input_ids)


class DecoderGraph(torch.nn.Module):
    """The language model with a flat KV cache (module doc); ``logits_to_keep``: the last N
    positions' logits, 0 every position's, None the last one's."""

    def __init__(self, model):
        super().__init__()
        self.lm = model.model.language_model
        self.head = model.lm_head

    def forward(self, inputs_embeds, attention_mask, position_ids, *past, logits_to_keep=None):
        mask = additive_mask(inputs_embeds, attention_mask)
        cache = _FlatCache(list(past))
        h = inputs_embeds
        pe = self.lm.rotary_emb(h, position_ids=position_ids)
        for layer in self.lm.layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=position_ids,
                      cache=cache, use_cache=True)
            h = h[0] if isinstance(h, tuple) else h
        # the norm is per position: choosing the positions first gives the same numbers at a
        # fraction of the head's work (module doc)
        logits = self.head(self.lm.norm(keep_positions(h, logits_to_keep)))
        return (logits, *cache.presents())


def graphs(vlm) -> tuple[type, type, type]:
    """The (vision, embed, decoder) wrapper classes of ``vlm``'s family: LLaVA's here, BLIP-2's
    (Q-Former vision graph, OPT decoder) in :mod:`vlcompress.exporters.generative_opt`."""
    if vlm.family == "blip2":
        from .generative_opt import Blip2VisionGraph, OptDecoderGraph, OptEmbedGraph

        return Blip2VisionGraph, OptEmbedGraph, OptDecoderGraph
    return VisionGraph, EmbedGraph, DecoderGraph


def _text_cfg(model):
    return model.config.text_config


def _kv_shape(model) -> tuple[int, int | list[int], int]:
    """``(layers, key/value heads, head_dim)``; the heads are one int, or one per layer when
    structured pruning removed whole key/value groups (read from each layer's k projection)."""
    tc = _text_cfg(model)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    layers = _decoder_layers(model)
    per = [int(ly.self_attn.k_proj.out_features) // int(ly.self_attn.head_dim) for ly in layers]
    return len(layers), per[0] if len(set(per)) == 1 else per, head_dim


def _decoder_layers(model):
    """The decoder layers: LLaVA's ``model.language_model.layers``, BLIP-2's OPT
    ``language_model.model.decoder.layers`` (a head-sliced OPT keeps its own key/value head
    count per layer: OPT has no grouped-query attention)."""
    lm = getattr(getattr(model, "model", None), "language_model", None)
    if lm is not None and hasattr(lm, "layers"):
        return lm.layers
    return model.language_model.model.decoder.layers


def _embed_width(model) -> int:
    """The width of ``inputs_embeds`` (OPT's ``word_embed_proj_dim`` may differ from its
    hidden size: ``project_in`` maps it, inside the decoder graph)."""
    tc = _text_cfg(model)
    return getattr(tc, "word_embed_proj_dim", None) or tc.hidden_size


@contextlib.contextmanager
def _eager_attention(model):
    cfgs = [model.config, model.config.text_config, model.config.vision_config,
            *([model.config.qformer_config] if hasattr(model.config, "qformer_config") else [])]
    old = [getattr(c, "_attn_implementation", None) for c in cfgs]
    try:
        for c in cfgs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, o in zip(cfgs, old, strict=True):
            c._attn_implementation = o


class _ExportDecoder(torch.nn.Module):
    """The traced form of a decoder graph: ``logits_to_keep`` as the last positional input
    (after the past), as the tracer takes inputs."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs_embeds, attention_mask, position_ids, *rest):
        return self.decoder(inputs_embeds, attention_mask, position_ids, *rest[:-1],
                            logits_to_keep=rest[-1])


def _decoder_names(n_layers: int):
    past = [f"past.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [p.replace("past.", "present.", 1) for p in past]
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present]


def _export(module, args, path: Path, inputs, outputs, axes, props: dict, root,
            defaults: dict | None = None) -> None:
    """Trace ``module`` to ``path``; weights renamed after the model's parameters (``root``),
    as the encoder export names them (so ``onnx_sparsity`` reads per-layer sparsity).
    ``defaults``: input name -> value, kept as an initializer of the same name (ONNX
    Runtime's overridable initializer: the input may be left out)."""
    with tempfile.TemporaryDirectory(prefix=".ts-export-", dir=path.parent) as d:
        f = Path(d) / "model.onnx"
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(module, tuple(args), str(f), dynamo=False, input_names=inputs,
                                  output_names=outputs, dynamic_axes=axes, opset_version=OPSET,
                                  do_constant_folding=True)
        except Exception as exc:  # noqa: BLE001 - one line naming the part
            raise ExportError(f"could not export {path.name}: {_short(exc)}") from None
        proto = load_proto(f)
    _name_initializers(proto, module, root)
    for name, value in (defaults or {}).items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    helper.set_model_props(proto, {**props, "vlcompress.exporter": "torchscript",
                                   "vlcompress.precision": "fp32"})
    save_onnx(proto, path)


def _example_pixels(vlm, batch: int, seed: int) -> torch.Tensor:
    v = vlm.model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, getattr(v, "num_channels", 3), v.image_size, v.image_size,
                       generator=g)


def _decoder_args(vlm, batch: int, seq: int, past: int, seed: int, pad: int = 0):
    n, kvh, hd = _kv_shape(vlm.model)
    hidden = _embed_width(vlm.model)
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if pad:
        mask[0, :pad] = 0  # row 0 left-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    pasts = [torch.randn(batch, kv_heads_of(kvh, i // 2), past, hd, generator=g)
             for i in range(2 * n)]
    return [torch.randn(batch, seq, hidden, generator=g), mask, pos, *pasts]


def check_exportable(vlm) -> None:
    """One line, before any work, when the decoder cannot go through this exporter."""
    tc = _text_cfg(vlm.model)
    if getattr(tc, "sliding_window", None) and getattr(tc, "use_sliding_window", False):
        raise ModelError(f"the decoder of {vlm.name!r} uses sliding-window attention, which the "
                         "generative ONNX export does not build; allowed: full attention")
    layer_types = getattr(tc, "layer_types", None) or []
    bad = sorted({t for t in layer_types if t != "full_attention"})
    if bad:
        raise ModelError(f"the decoder of {vlm.name!r} has {bad[0]} layers, which the "
                         "generative ONNX export does not build; allowed: full_attention")


def export_generative(vlm, out_dir: str | Path, *, images, questions=None,
                      max_new_tokens: int = 16, validate: bool = True,
                      visual_tokens: int | None = None,
                      reuse: str | Path | None = None) -> GenerativeExport:
    """Write ``vision.onnx``, ``embed.onnx``, ``decoder.onnx`` and ``generation.json`` into
    ``out_dir`` and (``validate``) check them against PyTorch on ``images`` / ``questions``
    (raises one ExportError naming every mismatch). ``visual_tokens`` K: ``vision.onnx``
    outputs K image embeddings per image (:mod:`vlcompress.models.visual_tokens`) and
    ``generation.json`` records ``image_tokens`` K, so prompts carry K image tokens.
    ``reuse``: the folder of an export of the same weights whose ``embed.onnx`` and
    ``decoder.onnx`` this one shares (only ``vision.onnx`` differs between a token-reduced
    variant and its full-token twin); ``generation.json`` names them by relative path."""
    t0 = time.perf_counter()
    check_exportable(vlm)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = vlm.model.eval()
    n, kvh, hd = _kv_shape(model)
    props = {"vlcompress.model": str(vlm.name), "vlcompress.family": vlm.family}
    files = dict(FILES)
    if reuse is not None:
        if Path(reuse).resolve().parent != out.resolve().parent:
            raise ExportError(f"cannot reuse {str(reuse)!r}: it is not beside {str(out)!r}")
        rel = Path("..") / Path(reuse).name
        files |= {p: str(rel / f) for p, f in FILES.items() if p != "vision"}
    paths = {p: out / f for p, f in files.items()}
    vision_graph, _, _ = graphs(vlm)
    if visual_tokens is not None and vision_graph is not VisionGraph:
        raise ExportError(f"visual_tokens: {vlm.family} exports its own vision graph; allowed: "
                          "a llava model")
    llava = vision_graph is VisionGraph
    available = tower_tokens(model.config) if llava else None
    image_tokens = available if visual_tokens is None else min(int(visual_tokens), available)
    with _eager_attention(model):
        v_out = ["image_embeds"] + (["image_positions"] if visual_tokens is not None else [])
        _export(VisionGraph(model, visual_tokens) if llava else vision_graph(model),
                [_example_pixels(vlm, 2, 0)],
                paths["vision"], ["pixel_values"], v_out,
                {"pixel_values": {0: "batch"}, **{o: {0: "batch"} for o in v_out}},
                {**props, "vlcompress.part": "vision",
                 "vlcompress.image_tokens": str(image_tokens)}, model)
        if reuse is not None:
            paths = {p: Path(os.path.normpath(v)) for p, v in paths.items()}
            missing = [str(v) for v in paths.values() if not v.is_file()]
            if missing:
                raise ExportError(f"cannot reuse {missing[0]!r}: it is not there")
    if reuse is None:
        _export_text_graphs(vlm, paths, props, n)
    tc = _text_cfg(model)
    tok = vlm.tokenizer
    spec = {"family": vlm.family, "model": str(vlm.name), "files": files,
            "image_token_id": int(model.config.image_token_index),
            "vocab_size": int(tc.vocab_size),
            "eos_token_id": int(getattr(vlm, "eos_token_id", None) or tok.eos_token_id),
            "pad_token_id": int(tok.pad_token_id), "num_layers": n, "num_key_value_heads": kvh,
            "head_dim": hd, "context": int(tc.max_position_embeddings), "precision": "fp32"}
    if llava:
        spec |= {"image_tokens": image_tokens, "tower_tokens": available}
    if visual_tokens is not None:
        dom, ctx = split_tokens(image_tokens)
        spec["visual_tokens"] = {"method": VISUAL_TOKENS_METHOD, "kept": image_tokens,
                                 "of": available, "dominant": dom, "contextual": ctx,
                                 "positions": "original"}
    (out / GENERATION_JSON).write_text(json.dumps(spec, indent=2))
    res = GenerativeExport(paths)
    if validate:
        res.validation = validate_generative(vlm, out, images=images, questions=questions,
                                             max_new_tokens=max_new_tokens,
                                             visual_tokens=visual_tokens)
    res.seconds = time.perf_counter() - t0
    return res


def _export_text_graphs(vlm, paths: dict, props: dict, n: int) -> None:
    """``embed.onnx`` and the merged ``decoder.onnx`` (module doc)."""
    model = vlm.model
    _, embed_graph, decoder_graph = graphs(vlm)
    with _eager_attention(model):
        _export(embed_graph(model), [torch.tensor([[1, 2, 3], [3, 2, 1]])], paths["embed"],
                ["input_ids"], ["inputs_embeds"],
                {"input_ids": {0: "batch", 1: "sequence"},
                 "inputs_embeds": {0: "batch", 1: "sequence"}},
                {**props, "vlcompress.part": "embed"}, model)
        ins, outs = _decoder_names(n)
        axes = {"inputs_embeds": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "kept"}}
        axes |= {k: {0: "batch", 2: "past_sequence"} for k in ins[3:]}
        axes |= {k: {0: "batch", 2: "total_sequence"} for k in outs[1:]}
        # traced keeping 2 of 3 positions, so neither 1 nor "all" is baked in
        _export(_ExportDecoder(decoder_graph(model)),
                [*_decoder_args(vlm, 2, 3, 2, 0), torch.tensor(2)], paths["decoder"],
                [*ins, LOGITS_TO_KEEP], outs, axes, {**props, "vlcompress.part": "decoder"},
                model, defaults={LOGITS_TO_KEEP: np.array(1, np.int64)})


def _diff(onnx_out: np.ndarray, ref: torch.Tensor, atol: float, rtol: float) -> tuple[float, bool]:
    r = ref.detach().float().numpy()
    d = np.abs(onnx_out - r)
    return float(d.max()) if d.size else 0.0, bool((d <= atol + rtol * np.abs(r)).all())


def _language_model_logits(model, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:
    """Every position's logits [batch, sequence, vocab] of the model's own language model
    (no cache), the reference of the decoder graph's ``logits_to_keep``: LLaVA's
    ``model.language_model`` + ``lm_head``, BLIP-2's OPT ``language_model``."""
    kw = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
          "position_ids": position_ids, "use_cache": False}
    lm = getattr(getattr(model, "model", None), "language_model", None)
    if lm is not None and hasattr(model, "lm_head"):
        return model.lm_head(lm(**kw).last_hidden_state)
    kw.pop("position_ids")  # OPT derives its positions from the mask (module doc of _opt)
    return model.language_model(**kw).logits


def greedy_pairs(vlm, gen, images, questions=None, max_new_tokens: int = 16,
                 visual_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(PyTorch ``generate``'s tokens, the ONNX generator's tokens) per prompt, in batches of
    8 with left padding; ``visual_tokens``: PyTorch keeps the same K tokens and the prompts
    carry the export's ``image_tokens``."""
    images = list(images)
    qs = list(questions) if questions is not None else [None] * len(images)
    pairs = []
    for i in range(0, len(images), 8):
        im, q = images[i:i + 8], qs[i:i + 8]
        with reduced_tokens(vlm.model, vlm.processor, visual_tokens):
            torch_tokens = vlm.generate(im, q, max_new_tokens=max_new_tokens)
        enc = prompt_inputs(vlm.processor, [vlm.prompt(x) for x in q], im,
                            image_tokens=gen.spec.get("image_tokens"))
        onnx_tokens = gen.generate(enc["input_ids"], enc["attention_mask"], enc["pixel_values"],
                                   max_new_tokens)
        pairs += list(zip(torch_tokens, onnx_tokens, strict=True))
    return pairs


@torch.no_grad()
def validate_generative(vlm, folder: str | Path, *, images, questions=None,
                        max_new_tokens: int = 16, atol: float = TOLERANCE["atol"],
                        rtol: float = TOLERANCE["rtol"], visual_tokens: int | None = None) -> dict:
    """Compare the export in ``folder`` with PyTorch (module doc); raise one ExportError
    listing every mismatch, else return the measured figures. ``visual_tokens``: the
    PyTorch side keeps the same K tokens (``models.visual_tokens.reduced_tokens``)."""
    model = vlm.model.eval()
    gen = OrtGenerator(folder)
    vision_graph, embed_graph, decoder_graph = graphs(vlm)
    diffs, problems = {}, []

    def check(name, got, ref):
        d, ok = _diff(got, ref, atol, rtol)
        diffs[name] = d
        if not ok:
            problems.append(f"{name} max abs diff {d:.3g}")

    px = _example_pixels(vlm, 3, 1)
    v_ref = (VisionGraph(model, visual_tokens) if vision_graph is VisionGraph
             else vision_graph(model))(px)
    v_got, v_index = gen.image_outputs(px.numpy())
    if visual_tokens is not None:
        v_ref, index_ref = v_ref
        if v_index is None or not np.array_equal(v_index, index_ref.numpy()):
            problems.append("vision image_positions differ from PyTorch's kept tokens")
    check("vision", v_got, v_ref)
    ids = torch.tensor([[1, 5, 7, 3, 2], [2, 2, 6, 1, 0], [3, 4, 1, 0, 2]]) % _text_cfg(model).vocab_size
    check("embed", gen.sessions["embed"].run(None, {"input_ids": ids.numpy()})[0],
          embed_graph(model)(ids))
    dec = decoder_graph(model)
    with _eager_attention(model):
        # prefill (batch 3, row 0 left-padded, empty past), then one decode step on its cache
        args = _decoder_args(vlm, 3, 6, 0, 2, pad=2)
        ref = dec(*args)
        logits, past = gen.decode_step(args[0].numpy(), args[1].numpy(), args[2].numpy(),
                                       {k: v.numpy() for k, v in zip(_decoder_names(
                                           _kv_shape(model)[0])[0][3:], args[3:], strict=True)})
        check("decoder prefill logits", logits, ref[0])
        every = _language_model_logits(model, *args[:3])
        check("decoder prefill logits vs language model", logits, every[:, -1:])
        # every position (logits_to_keep 0: the teacher-forced fidelity's call), padding not
        # compared (its rows attend to nothing real)
        all_pos, _ = gen.decode_step(args[0].numpy(), args[1].numpy(), args[2].numpy(),
                                     gen.empty_past(3), logits_to_keep=0)
        real = args[1].numpy()[:, -args[0].shape[1]:] > 0
        check("decoder prefill logits, every position", all_pos[real], every[torch.from_numpy(real)])
        check("decoder prefill presents", np.concatenate([v.ravel() for v in past.values()]),
              torch.cat([t.ravel() for t in ref[1:]]))
        step = _decoder_args(vlm, 3, 1, 0, 3)[0]
        mask = torch.cat([args[1], torch.ones(3, 1, dtype=torch.long)], 1)
        pos = args[2][:, -1:] + 1
        ref2 = dec(step, mask, pos, *ref[1:])
        logits2, _ = gen.decode_step(step.numpy(), mask.numpy(), pos.numpy(), past)
        check("decoder decode logits", logits2, ref2[0])
    # greedy generation, token for token, against PyTorch generate (Llava.generate)
    pairs = greedy_pairs(vlm, gen, images, questions, max_new_tokens,
                         visual_tokens)
    exact = sum(a == b for a, b in pairs)
    per_prompt = [i for i, (a, b) in enumerate(pairs) if a != b]
    n = len(pairs)
    if per_prompt:
        problems.append(f"greedy generation differs from PyTorch on {len(per_prompt)} of {n} "
                        f"prompts (first: #{per_prompt[0]})")
    if problems:
        raise ExportError(f"generative ONNX export in {str(folder)!r} does not match PyTorch: "
                          + "; ".join(problems) + f" (tolerance atol={atol:g} rtol={rtol:g})")
    return {"max_abs_diff": diffs, "atol": atol, "rtol": rtol, "prompts": n,
            "token_exact": exact / max(1, n), "max_new_tokens": int(max_new_tokens)}

