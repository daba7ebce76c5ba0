"""Generation of a generative export on ONNX Runtime GenAI (``onnxruntime-genai``, the
``[genai]`` extra), with the same call as :class:`vlcompress.runtime.ort_generate.OrtGenerator`:

    tokens = GenaiGenerator(run / "pruned").generate(input_ids, attention_mask, pixel_values, 24,
                                                     sampling=None)   # or a Sampling

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
OrtGenerator) and are handed to GenAI with ``num_image_tokens`` (one count: GenAI sizes the
image features ``[images, sum(num_image_tokens), hidden]``, and our vision graph gives
``[images, tokens, hidden]``). The GenAI model folder (``genai_config.json``, the adapter,
links to the export's files) is built in a temporary folder; nothing is written into the run.

Batches: GenAI (0.18) reads a batch as RIGHT-padded: a row's trailing ``pad_token_id`` tokens
get mask 0 and every token before them mask 1 and position = its index; each row's first new
token comes from the logits at its last real token, and a batch of one row is taken as
unpadded. Our prompts are left-padded (the processor's, OrtGenerator's and transformers'
layout), so :meth:`GenaiGenerator.right_padded` moves each row's tokens to the front and drops
columns that are padding in every row. The real tokens get the positions and the attention
they get with left padding (positions ``cumsum(mask) - 1``, pads masked), so greedy tokens
equal OrtGenerator's; only the cache layout differs (the pad slots sit between the prompt and
the new tokens). What GenAI would read wrongly is refused in one line: a row ending with the
pad token (GenAI takes it as padding) and more than 32 rows (its largest batch). A decoder
that returns the last position's logits only (``logits`` [batch, 1, vocab]) is what GenAI
calls "pruned" logits: it takes them as every row's next-token logits, which for a shorter
right-padded row would be a pad's; such a decoder runs behind :func:`build_decoder_left`,
a few nodes that sort each row's columns back into the left-padded layout (pads first) before
the export's own graph, so its last position is every row's last real token and its cache is
laid out as OrtGenerator's.

Sampling: GenAI's own seeded sampler (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
``random_seed``; top-k first, then the nucleus within it, as our
:class:`~vlcompress.runtime.ort_generate.Sampling`): the same distribution, other draws for
one seed (std::mt19937, not numpy), so :func:`draw_check` and :func:`support_violations`
compare distributions, not tokens. GenAI's ``random_seed`` is a 32-bit int (negative: a
random seed): other seeds are refused. Stops on the end token (per row; finished rows get
the pad token, as ours) or after ``max_new_tokens``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ExportError
from ..optional_deps import require_onnxruntime_genai
from .ort_generate import read_spec

__all__ = ["GenaiGenerator", "genai_config", "build_embed_merge", "build_decoder_left",
           "check_sampling", "draw_check", "support_violations"]

#: GenAI's model type whose pipeline runs our graphs (see the module docstring)
PIPELINE_TYPE = "gemma3"
MERGED_EMBED = "embed_merge.onnx"
LEFT_DECODER = "decoder_left.onnx"


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


def last_logits_only(folder: str | Path) -> bool:
    """Whether the export's decoder returns the last position's logits only (``logits``
    [batch, 1, vocab]; older exports return every position's)."""
    import onnx

    folder = Path(folder)
    dec = onnx.load(str(folder / read_spec(folder)["files"]["decoder"]), load_external_data=False)
    shape = next(o for o in dec.graph.output if o.name == "logits").type.tensor_type.shape
    return shape.dim[1].dim_value == 1


def build_decoder_left(folder: str | Path, out: str | Path) -> None:
    """``decoder_left.onnx``: the export's decoder behind a few nodes that turn GenAI's
    right-padded layout into the left-padded one the decoder was exported for (module doc):
    per row, a stable sort of the attention mask's columns (pads first, every other column in
    order) reorders the mask, and the same sort over the call's own columns reorders
    ``inputs_embeds`` and ``position_ids`` (the prompt in the prefill; a decode step's single
    column stays). The cache is then written left-padded, so the decoder's last position is
    every row's last real token. The weights are not copied: the graph keeps its external
    data references (the work folder links the export's files)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    spec = read_spec(folder)
    m = onnx.load(str(folder / spec["files"]["decoder"]), load_external_data=False)
    g = m.graph
    names = {"inputs_embeds", "attention_mask", "position_ids"}
    for i in g.input:
        if i.name in names:
            i.name += "_genai"
    for k, v in {"zero_l": np.int64(0), "one_l": np.int64(1), "one_1d": np.array([1], np.int64),
                 "minus1_1d": np.array([-1], np.int64)}.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(v), k))
    node = helper.make_node
    pre = []

    def stable_perm(mask: str, tag: str) -> str:
        """Column order per row of ``mask`` [batch, n]: zeros first, then ones, each in order."""
        pre.extend([
            node("Shape", [mask], [f"{tag}_shape"]),
            node("Gather", [f"{tag}_shape", "one_l"], [f"{tag}_n"], axis=0),
            node("Range", ["zero_l", f"{tag}_n", "one_l"], [f"{tag}_idx"]),
            node("Mul", [mask, f"{tag}_n"], [f"{tag}_hi"]),
            node("Add", [f"{tag}_hi", f"{tag}_idx"], [f"{tag}_key"]),
            node("Unsqueeze", [f"{tag}_n", "zero_l"], [f"{tag}_k"]),
            node("TopK", [f"{tag}_key", f"{tag}_k"], [f"{tag}_sorted", f"{tag}_perm"], axis=-1,
                 largest=0, sorted=1)])
        return f"{tag}_perm"

    pre.append(node("Cast", ["attention_mask_genai"], ["mask64"], to=TensorProto.INT64))
    perm = stable_perm("mask64", "all")
    pre.append(node("GatherElements", ["attention_mask_genai", perm], ["attention_mask"], axis=1))
    # the call's own columns: the mask's last `sequence` columns
    pre.extend([node("Shape", ["inputs_embeds_genai"], ["emb_shape"]),
                node("Gather", ["emb_shape", "one_l"], ["seq"], axis=0),
                node("Unsqueeze", ["seq", "zero_l"], ["seq_1d"]),
                node("Neg", ["seq_1d"], ["neg_seq"]),
                node("Shape", ["mask64"], ["mask_shape"]),
                node("Gather", ["mask_shape", "one_1d"], ["total_1d"], axis=0),
                node("Slice", ["mask64", "neg_seq", "total_1d", "one_1d"], ["mask_new"])])
    new = stable_perm("mask_new", "new")
    pre.extend([node("GatherElements", ["position_ids_genai", new], ["position_ids"], axis=1),
                node("Unsqueeze", [new, "minus1_1d"], ["new_perm3"]),
                node("Expand", ["new_perm3", "emb_shape"], ["new_perm_h"]),
                node("GatherElements", ["inputs_embeds_genai", "new_perm_h"], ["inputs_embeds"],
                     axis=1)])
    nodes = pre + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, str(out))


def genai_config(folder: str | Path, threads: int | None = None,
                 decoder_file: str | None = None) -> dict:
    """The ``genai_config.json`` of an export folder (GenAI's ``gemma3`` pipeline, our input
    and output names, greedy search); ``decoder_file``: ``decoder_left.onnx``
    (:func:`build_decoder_left`) instead of the export's decoder."""
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
    suffix = "_genai" if decoder_file == LEFT_DECODER else ""  # build_decoder_left's inputs
    return {"model": {
        "type": PIPELINE_TYPE, "vocab_size": int(spec["vocab_size"]),
        "context_length": int(spec["context"]), "eos_token_id": int(spec["eos_token_id"]),
        "pad_token_id": int(spec["pad_token_id"]), "bos_token_id": int(spec.get("bos_token_id", 0)),
        "decoder": {
            "filename": decoder_file or spec["files"]["decoder"], "session_options": session,
            "hidden_size": int(hidden), "head_size": int(spec["head_dim"]),
            "num_attention_heads": heads, "num_key_value_heads": int(spec["num_key_value_heads"]),
            "num_hidden_layers": int(spec["num_layers"]),
            "inputs": {"inputs_embeds": "inputs_embeds" + suffix,
                       "attention_mask": "attention_mask" + suffix,
                       "position_ids": "position_ids" + suffix, "past_key_names": "past.%d.key",
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


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


#: GenAI's ``random_seed`` is a 32-bit int (-1: a random seed), drawn with std::mt19937
MAX_SEED = 2**31 - 1
#: the largest batch one GenAI generator takes (its kMaxBatchSize)
MAX_BATCH = 32


def check_sampling(sampling) -> None:
    """One line when ``sampling`` (a :class:`~vlcompress.runtime.ort_generate.Sampling`)
    cannot be given to GenAI as it is (checked before any work)."""
    if sampling is not None and not 0 <= int(sampling.seed) <= MAX_SEED:
        raise ConfigError(f"--seed {sampling.seed} does not fit onnxruntime-genai's random_seed "
                          f"(a 32-bit int; negative: a random seed); allowed: 0..{MAX_SEED} "
                          "with --runtime genai")


class GenaiGenerator:
    """An export folder on ONNX Runtime GenAI (see the module docstring)."""

    runtime = "genai"

    def __init__(self, folder: str | Path, threads: int | None = None):
        og = require_onnxruntime_genai()
        self.folder = Path(folder)
        self.spec = read_spec(self.folder)
        #: the decoder returns the last position's logits only ([batch, 1, vocab]): GenAI
        #: takes them as every row's next-token logits (its "pruned" logits), so it runs the
        #: decoder behind build_decoder_left (the last position is then each row's last token)
        self.last_logits_only = last_logits_only(self.folder)
        self._tmp = tempfile.TemporaryDirectory(prefix="vlc-genai-")
        work = Path(self._tmp.name)
        for f in self.folder.iterdir():  # the graphs and their external data, as named
            if f.is_file() and f.name != "genai_config.json":
                _link(f, work / f.name)
        build_embed_merge(self.folder, work / MERGED_EMBED)
        decoder = None
        if self.last_logits_only:
            build_decoder_left(self.folder, work / LEFT_DECODER)
            decoder = LEFT_DECODER
        (work / "genai_config.json").write_text(json.dumps(
            genai_config(self.folder, threads, decoder), indent=1))
        self._og = og
        try:
            self.model = og.Model(str(work))
        except Exception as exc:  # noqa: BLE001 - one line naming the folder
            raise ExportError(f"onnxruntime-genai cannot load the export {str(self.folder)!r}: "
                              f"{' '.join(str(exc).split())[:200]}") from None

    @property
    def context(self) -> int:
        return int(self.spec["context"])

    def right_padded(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The left-padded batch (OrtGenerator's layout) as GenAI reads a batch: each row's
        tokens first, ``pad_token_id`` after them (GenAI masks the trailing pad tokens of a
        row, numbers the rest 0.. and takes each row's logits at its last real token). One
        line for what GenAI would read wrongly. Columns that are padding in every row are
        dropped (GenAI takes a batch of one row as unpadded)."""
        mask = np.asarray(attention_mask).astype(bool)
        ids = np.asarray(input_ids)
        if not 1 <= len(ids) <= MAX_BATCH:
            raise ConfigError(f"a batch of {len(ids)} prompts: one onnxruntime-genai generator "
                              f"takes 1..{MAX_BATCH} rows; allowed: batches of 1..{MAX_BATCH} "
                              "with --runtime genai")
        pad, image_id = int(self.spec["pad_token_id"]), int(self.spec["image_token_id"])
        n_img = int(self.spec.get("image_tokens") or 0)
        lengths = mask.sum(-1)
        out = np.full(ids.shape, pad, np.int32)
        for r, (row, m, n) in enumerate(zip(ids, mask, lengths, strict=True)):
            if n == 0 or m[: len(m) - n].any() or not m[len(m) - n:].all():
                raise ConfigError(f"row {r} of the attention mask is not left-padded "
                                  "(zeros, then ones); allowed: prompts as the run's processor "
                                  "left-pads them")
            if int(row[-1]) == pad:
                raise ConfigError(f"row {r} ends with the pad token {pad}: onnxruntime-genai "
                                  "reads trailing pad tokens as padding; allowed: prompts that "
                                  "do not end with the pad token")
            if n_img and int((row[m] == image_id).sum()) != n_img:
                raise ConfigError(f"row {r} holds {int((row[m] == image_id).sum())} image tokens; "
                                  f"allowed: one image of {n_img} tokens per row with --runtime "
                                  "genai (GenAI sizes the image features by one count for all "
                                  "images)")
            out[r, :n] = row[m]
        # no column of padding only: GenAI reads a batch of 1 as unpadded (every token attended)
        out = out[:, : int(lengths.max())]
        return out

    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray,
              max_new_tokens: int, sampling=None, min_new_tokens: int = 0):
        """A GenAI generator with the batch's inputs set (nothing run yet: its first
        ``generate_next_token`` runs the vision graph, the embedding and the prompt's decoder
        call and picks the first token). ``min_new_tokens``: GenAI suppresses the end token
        until that many (for timings over a fixed number of steps)."""
        og = self._og
        check_sampling(sampling)
        ids = self.right_padded(input_ids, attention_mask)
        b, p = ids.shape
        if p + int(max_new_tokens) > self.context:
            raise ConfigError(f"{p} prompt tokens + {max_new_tokens} new tokens exceed the "
                              f"context of {self.spec.get('model')} ({self.context} tokens); "
                              f"allowed: prompt + new tokens <= {self.context}")
        params = og.GeneratorParams(self.model)
        opts = {"batch_size": b, "max_length": p + int(max_new_tokens), "num_beams": 1,
                "min_length": p + int(min_new_tokens), "do_sample": sampling is not None}
        if sampling is not None:  # GenAI's defaults (top_k 50, ...) never apply
            opts.update(temperature=float(sampling.temperature), top_k=int(sampling.top_k),
                        top_p=float(sampling.top_p), random_seed=int(sampling.seed))
        params.set_search_options(**opts)
        gen = og.Generator(self.model, params)
        named = og.NamedTensors()
        named["input_ids"] = ids
        named["pixel_values"] = np.ascontiguousarray(pixel_values, dtype=np.float32)
        # GenAI sizes the image features [images, sum(num_image_tokens), hidden]: one count
        # (each image's) so that the vision graph's [images, tokens, hidden] fits
        named["num_image_tokens"] = np.array(
            [int((ids[0] == int(self.spec["image_token_id"])).sum())], np.int64)
        gen.set_inputs(named)
        return gen

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 pixel_values: np.ndarray, max_new_tokens: int, sampling=None
                 ) -> list[list[int]]:
        """New token ids per row (left-padded inputs, one image per row), greedy or drawn with
        ``sampling`` (GenAI's own seeded sampler), cut at the end token, as
        :meth:`OrtGenerator.generate` returns them."""
        eos, pad = int(self.spec["eos_token_id"]), int(self.spec["pad_token_id"])
        gen = self.start(input_ids, attention_mask, pixel_values, max_new_tokens, sampling)
        b = int(input_ids.shape[0])
        out: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        for _ in range(int(max_new_tokens)):
            if gen.is_done():
                break
            gen.generate_next_token()
            nxt = np.asarray(gen.get_next_tokens()).reshape(-1)
            for r in np.flatnonzero(~done):
                if int(nxt[r]) != eos:
                    out[r].append(int(nxt[r]))
            done |= nxt == eos
            if done.all():
                break
        return [row[:row.index(pad)] if pad in row else row for row in out]

    def close(self) -> None:
        self.model = None
        self._tmp.cleanup()


# -- comparing sampled draws (GenAI's sampler draws other tokens than numpy's for one seed) ----
def draw_check(probs: np.ndarray, draws, quantile: float = 0.999, trials: int = 2000,
               seed: int = 0) -> dict:
    """Whether ``draws`` (token ids) look drawn from ``probs`` [vocab]: the total variation
    distance of their histogram to ``probs``, against the ``quantile`` of that distance over
    ``trials`` simulated draws of the same size from ``probs`` itself (so the bound is what
    chance alone gives at this sample size), and the draws outside the support (probability
    0: a token top-k / top-p removed)."""
    p = np.asarray(probs, np.float64)
    d = np.asarray(draws, np.int64).reshape(-1)
    n = len(d)
    hist = np.bincount(d, minlength=len(p))[: len(p)] / n
    tv = 0.5 * float(np.abs(hist - p).sum())
    sims = np.random.default_rng(seed).multinomial(n, p / p.sum(), size=trials) / n
    bound = float(np.quantile(0.5 * np.abs(sims - p).sum(-1), quantile))
    outside = int((p[d] == 0).sum() + (d >= len(p)).sum())
    return {"draws": n, "tv": tv, "tv_bound": bound, "quantile": quantile,
            "outside_support": outside, "ok": bool(tv <= bound and outside == 0)}


def support_violations(ort, feeds: tuple, sequences: list[list[int]], sampling) -> dict:
    """Teacher-forced on ``ort`` (an :class:`OrtGenerator` of the same export, batch 1), the
    tokens of ``sequences`` (each drawn for ``feeds``) that ``sampling``'s kept set (top-k /
    top-p at its temperature) excludes at their position; and their mean log-probability."""
    bad, logp, n = 0, 0.0, 0
    for seq in sequences:
        if not seq:
            continue
        st = ort.prefill(*feeds, len(seq))
        for i, t in enumerate(seq):
            p = sampling.probs(st.logits)[0]  # st.logits: the last position's, [1, vocab]
            bad += int(p[t] == 0)
            logp += float(np.log(max(p[t], 1e-300)))
            n += 1
            if i < len(seq) - 1:
                ort.step(st, np.array([t], np.int64))
    return {"tokens": n, "outside_support": bad, "mean_logprob": logp / max(n, 1)}
