"""Greedy generation of a generative export on ONNX Runtime GenAI (``onnxruntime-genai``, the
``[genai]`` extra), with the same call as :class:`vlcompress.runtime.ort_generate.OrtGenerator`:

    tokens = GenaiGenerator(run / "pruned").generate(input_ids, attention_mask, pixel_values, 24)

GenAI has no LLaVA model type (its types: LLMs such as ``llama``/``qwen2`` that it feeds token
ids, and the VLMs ``phi3v``, ``gemma3``, ``qwen2_5_vl``, ... each with its own processor), and
our three graphs do not fit its decoder-only path as they are:

- type ``llama`` with our decoder: ``RuntimeError: Model input was not found: input_ids`` (the
  decoder-only path feeds ``input_ids``; our decoder takes ``inputs_embeds``);
- type ``llama`` plus an ``embedding`` section (our ``embed.onnx``): ``Decoder-only CPU
  embedding requires the dynamic-batching Engine`` (text only: no image embeddings);
- a VLM type (``gemma3``, ``phi3v``) with our three graphs: ``Model input was not found:
  image_features``: its embedding graph must take the image features and place them itself,
  whereas our ``embed.onnx`` maps token ids only and OrtGenerator places the image embeddings
  in Python (LLaVA's ``masked_scatter``);
- type ``llava``: ``Unsupported model_type in config.json: llava``.

What runs: the ``gemma3`` multimodal pipeline over our ``vision.onnx`` and ``decoder.onnx``
plus one adapter graph built here, ``embed_merge.onnx`` = ``embed.onnx`` with an
``image_features`` input and LLaVA's merge in-graph (image-token positions take the image
embeddings in order; a zero row is appended so that decode steps, which have no image
features, still gather in bounds). The pipeline's own image processor is not used: the
prompt's ``input_ids`` and ``pixel_values`` come from the run's processor (as for
OrtGenerator) and are handed to GenAI with ``num_image_tokens``. Greedy search only. The
GenAI model folder (``genai_config.json``, the adapter, links to the two graphs; the decoder's
graph rewritten with its optional ``logits_to_keep`` fixed at 1, :func:`last_logits_decoder`,
its weights linked) is built in a temporary folder; nothing is written into the run.

Rows are generated one at a time (one generator per prompt, its left padding removed): GenAI's
multimodal pipeline takes one prompt and image per generator here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ExportError
from ..optional_deps import require_onnxruntime_genai
from .ort_generate import read_spec

__all__ = ["GenaiGenerator", "genai_config", "build_embed_merge"]

#: GenAI's model type whose pipeline runs our graphs (see the module docstring)
PIPELINE_TYPE = "gemma3"
MERGED_EMBED = "embed_merge.onnx"


def build_embed_merge(folder: str | Path, out: str | Path) -> None:
    """``embed_merge.onnx``: ``input_ids`` [batch, seq] and ``image_features`` [images,
    tokens, hidden] -> ``inputs_embeds`` [batch, seq, hidden], the export's ``embed.onnx``
    plus LLaVA's in-order placement of the image features at the image-token positions."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    spec = read_spec(folder)
    m = onnx.load(str(folder / spec["files"]["embed"]))
    g = m.graph
    hidden = g.output[0].type.tensor_type.shape.dim[-1].dim_value
    if len(g.input) != 1 or g.input[0].name != "input_ids" or g.output[0].name != "inputs_embeds" \
            or hidden <= 0:
        raise ExportError(f"{str(folder / spec['files']['embed'])!r} is not input_ids -> "
                          "inputs_embeds with a fixed hidden size; allowed: a vlcompress "
                          "generative export")
    for n in g.node:  # the table lookup now reads the image-token-free ids
        n.input[:] = ["safe_ids" if x == "input_ids" else x for x in n.input]
        n.output[:] = ["text_embeds" if x == "inputs_embeds" else x for x in n.output]
    del g.input[:]
    del g.output[:]
    g.input.extend([
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("image_features", TensorProto.FLOAT,
                                      ["images", "image_tokens", hidden])])
    g.output.extend([helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT,
                                                   ["batch", "sequence", hidden])])
    consts = {"image_id": np.int64(spec["image_token_id"]), "zero_i": np.int64(0),
              "one_i": np.int64(1), "flat_shape": np.array([-1, hidden], np.int64),
              "minus1": np.array([-1], np.int64), "axis0": np.int64(0),
              "zero_row": np.zeros((1, hidden), np.float32), "last": np.array([-1], np.int64)}
    g.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items())
    node = helper.make_node
    pre = [node("Equal", ["input_ids", "image_id"], ["is_image"]),
           node("Where", ["is_image", "zero_i", "input_ids"], ["safe_ids"])]
    post = [node("Reshape", ["image_features", "flat_shape"], ["features0"]),
            node("Concat", ["features0", "zero_row"], ["features"], axis=0),
            node("Shape", ["input_ids"], ["ids_shape"]),
            node("Cast", ["is_image"], ["is_image_i"], to=TensorProto.INT64),
            node("Reshape", ["is_image_i", "minus1"], ["flat_mask"]),
            node("CumSum", ["flat_mask", "axis0"], ["running"]),  # row-major, as masked_scatter
            node("Sub", ["running", "one_i"], ["index0"]),
            node("Max", ["index0", "zero_i"], ["index1"]),
            node("Reshape", ["index1", "ids_shape"], ["index"]),
            node("Gather", ["features", "index"], ["placed"], axis=0),
            node("Unsqueeze", ["is_image", "last"], ["is_image3"]),
            node("Where", ["is_image3", "placed", "text_embeds"], ["inputs_embeds"])]
    nodes = pre + list(g.node) + post
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(out))


def genai_config(folder: str | Path, threads: int | None = None) -> dict:
    """The ``genai_config.json`` of an export folder (GenAI's ``gemma3`` pipeline, our input
    and output names, greedy search)."""
    import onnx

    folder = Path(folder)
    spec = read_spec(folder)
    dec = onnx.load(str(folder / spec["files"]["decoder"]), load_external_data=False)
    hidden = next(i for i in dec.graph.input if i.name == "inputs_embeds") \
        .type.tensor_type.shape.dim[-1].dim_value
    session = {"log_severity_level": 3, **({"intra_op_num_threads": int(threads)} if threads else {})}
    if isinstance(spec["num_key_value_heads"], list):  # whole KV groups sliced, per layer
        raise ExportError(f"onnxruntime-genai takes one num_key_value_heads for every layer; the "
                          f"export {str(folder)!r} has {spec['num_key_value_heads']} (structured "
                          "pruning removed whole key/value groups per layer); allowed: the "
                          "onnxruntime generator, or a prune with --method-option kv_groups=within")
    heads = int(spec.get("num_attention_heads") or spec["num_key_value_heads"])
    return {"model": {
        "type": PIPELINE_TYPE, "vocab_size": int(spec["vocab_size"]),
        "context_length": int(spec["context"]), "eos_token_id": int(spec["eos_token_id"]),
        "pad_token_id": int(spec["pad_token_id"]), "bos_token_id": int(spec.get("bos_token_id", 0)),
        "decoder": {
            "filename": spec["files"]["decoder"], "session_options": session,
            "hidden_size": int(hidden), "head_size": int(spec["head_dim"]),
            "num_attention_heads": heads, "num_key_value_heads": int(spec["num_key_value_heads"]),
            "num_hidden_layers": int(spec["num_layers"]),
            "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                       "position_ids": "position_ids", "past_key_names": "past.%d.key",
                       "past_value_names": "past.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"}},
        "vision": {"filename": spec["files"]["vision"], "session_options": session,
                   "inputs": {"pixel_values": "pixel_values"},
                   "outputs": {"image_features": "image_embeds"}},
        "embedding": {"filename": MERGED_EMBED, "session_options": session,
                      "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}}},
        "search": {"do_sample": False, "num_beams": 1, "max_length": int(spec["context"])}}


def last_logits_decoder(src: Path, dst: Path) -> bool:
    """Write ``dst``: the decoder ``src`` with its optional ``logits_to_keep`` input fixed at
    its default (1) and ``logits`` declared [batch, 1, vocab]. GenAI sizes its logits buffer
    from that declaration: a symbolic middle axis makes it bind [batch, sequence, vocab] at
    the prompt, which a last-position graph cannot fill. Only the graph is rewritten; the
    weights stay in ``src``'s data file (linked beside ``dst`` by the caller). False (nothing
    written) for an export without ``logits_to_keep`` (every position's logits, as GenAI
    expects them)."""
    import onnx

    m = onnx.load(str(src), load_external_data=False)
    g = m.graph
    keep = [i for i in g.input if i.name == "logits_to_keep"]
    if not keep or not any(t.name == "logits_to_keep" for t in g.initializer):
        return False
    g.input.remove(keep[0])  # the initializer (value 1) remains: a constant now
    dim = next(o for o in g.output if o.name == "logits").type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = 1
    onnx.save(m, str(dst))
    return True


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


class GenaiGenerator:
    """An export folder on ONNX Runtime GenAI (see the module docstring)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        og = require_onnxruntime_genai()
        self.folder = Path(folder)
        self.spec = read_spec(self.folder)
        self._tmp = tempfile.TemporaryDirectory(prefix="vlc-genai-")
        work = Path(self._tmp.name)
        for part in ("vision", "decoder"):
            f = self.spec["files"][part]
            if part != "decoder" or not last_logits_decoder(self.folder / f, work / f):
                _link(self.folder / f, work / f)
            if (self.folder / f"{f}.data").is_file():
                _link(self.folder / f"{f}.data", work / f"{f}.data")
        build_embed_merge(self.folder, work / MERGED_EMBED)
        (work / "genai_config.json").write_text(json.dumps(genai_config(self.folder, threads),
                                                           indent=1))
        self._og = og
        try:
            self.model = og.Model(str(work))
        except Exception as exc:  # noqa: BLE001 - one line naming the folder
            raise ExportError(f"onnxruntime-genai cannot load the export {str(self.folder)!r}: "
                              f"{' '.join(str(exc).split())[:200]}") from None

    @property
    def context(self) -> int:
        return int(self.spec["context"])

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 pixel_values: np.ndarray, max_new_tokens: int) -> list[list[int]]:
        """Greedy new token ids per row (left-padded inputs, one image per row), cut at the end
        token, as :meth:`OrtGenerator.generate` returns them."""
        og = self._og
        eos, pad = int(self.spec["eos_token_id"]), int(self.spec["pad_token_id"])
        image_id = int(self.spec["image_token_id"])
        out = []
        for ids, mask, px in zip(input_ids, attention_mask, pixel_values, strict=True):
            ids = ids[mask.astype(bool)][None].astype(np.int32)  # this row, padding removed
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=ids.shape[1] + int(max_new_tokens),
                                      do_sample=False)
            gen = og.Generator(self.model, params)
            named = og.NamedTensors()
            named["input_ids"] = ids
            named["pixel_values"] = np.ascontiguousarray(px[None], dtype=np.float32)
            named["num_image_tokens"] = np.array([int((ids == image_id).sum())], np.int64)
            gen.set_inputs(named)
            row: list[int] = []
            while not gen.is_done() and len(row) < int(max_new_tokens):
                gen.generate_next_token()
                t = int(gen.get_next_tokens()[0])
                if t == eos:
                    break
                row.append(t)
            out.append(row[:row.index(pad)] if pad in row else row)
        return out

    def close(self) -> None:
        self.model = None
        self._tmp.cleanup()
