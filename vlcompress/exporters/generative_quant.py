"""fp16 and int8 variants of a generative (llava, BLIP captioning / VQA) ONNX export,
validated per precision.

    folder = export_generative(vlm, "run/pruned", images=..., ...)        # fp32, token-exact
    fp16 = make_fp16_variant("run/pruned", "run/pruned_fp16")               # three fp16 graphs
    int8 = make_int8_variant("run/pruned", "run/pruned_int8")               # dynamic int8
    figures = validate_variant(vlm, "run/pruned_int8", images=..., precision="int8")

**fp16** (``--fp16`` on a generative run): each graph is converted by the export's own
converter (:func:`vlcompress.exporters.onnx.convert_fp16`: weights and activations fp16,
normalisations, softmax, reductions and transcendental ops in fp32 behind casts, constants
saturated, so the decoder's ``finfo(float32).min`` mask becomes -65504). The graph inputs and
outputs stay fp32 (``pixel_values``, ``image_embeds``, ``inputs_embeds``, ``logits``) -- except
the KV cache: the decoder's ``past.*`` inputs and ``present.*`` outputs are fp16
(:func:`kv_cache_fp16`), so the cache a generator carries from step to step is half the bytes
and no cast runs on it per token. ``generation.json`` says so (``"kv_dtype": "float16"``); the
generator (:class:`vlcompress.runtime.ort_generate.OrtGenerator`) allocates its past in that
dtype.

**BLIP** exports (``generation.json`` ``kind`` ``blip-caption`` / ``blip-vqa``) get the same
two variants over their own graphs: fp16 converts every graph, with the self-attention cache
AND the cross-attention keys / values in fp16 (``cross_kv.onnx`` writes them, the decoder reads
them: computed once per request, they are carried like a cache); int8 quantizes the weight
MatMuls of every graph (vision, question, cross_kv, decoder: BLIP has no embedding graph, its
decoder embeds its own ids). Validation compares each graph's output (vision, question,
cross keys / values, decoder prefill logits and presents, a decode step) with the fp32
PyTorch model by the same floors (:func:`vlcompress.exporters.generative_blip.blip_logit_checks`)
and reports greedy generation against ``BlipCaption.generate``.

**int8** (``--quantize int8 --quantize-method dynamic`` on a generative run, ONNX Runtime CPU):
ONNX Runtime's dynamic quantization (``quantize_dynamic`` through
:func:`vlcompress.exporters.quantize.quantize_onnx`): the weight of every ``MatMul`` whose
second input is a weight (every Linear of the decoder and the LM head, the vision tower's and
projector's Linears) is stored int8, symmetric, one scale per output channel; the activation is
quantized per call (uint8, per tensor, computed from the tensor itself: no calibration, so a
long prompt and a one-token decode step both get their own range). At batch 1 a decode step
reads every weight once per token, so its time is bound by the weight bytes: int8 reads a
quarter of fp32's. What stays float: the embedding table (``embed.onnx``: a ``Gather``, one row
read per token, no arithmetic to save), the vision tower's patch ``Conv`` (ONNX Runtime's
``ConvInteger`` is slower than its float convolution on CPU), attention's activation x
activation MatMuls, norms, softmax, rotary embedding and the KV cache (fp32). Static QDQ
(calibrated activation ranges) is not built for the decoder: its inputs include the KV cache,
whose ranges grow with the sequence; a static int8 request for a generative run is refused.

**Validation per precision** (:func:`validate_variant`, on inputs the export never saw): the
vision embeddings and the decoder's logits (prefill at batch 3 with left padding, then one
decode step on that cache) against the fp32 PyTorch model, by cosine similarity (per row) and
top-1 agreement over the logit positions, with one floor per precision (:data:`TOLERANCE`);
every shortfall goes into one :class:`ExportError`. Greedy generation on ONNX Runtime is
compared with PyTorch's ``generate`` on every validation prompt and *reported* (share of
prompts token-exact, share of tokens equal), not required: rounding a weight or an activation
moves a near-tie arg-max, and from there the continuation differs.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ConfigError, ExportError
from ..runtime.ort_generate import GENERATION_JSON, read_spec
from ..runtime.ort_generate_blip import KINDS as BLIP_KINDS

__all__ = ["TOLERANCE", "GENERATIVE_QUANTIZE", "check_generative_precision", "make_fp16_variant",
           "make_int8_variant", "kv_cache_fp16", "validate_variant", "variant_name"]

#: what a generative run accepts: --quantize int8 (dynamic, ONNX Runtime CPU) and --fp16
GENERATIVE_QUANTIZE = ("none", "int8")
#: which parts the int8 variant quantizes (embed.onnx is a Gather: copied as it is)
INT8_PARTS = ("vision", "decoder")
#: floors per precision: cosine similarity of every logit row (and every image embedding row)
#: with the fp32 PyTorch model's, and the share of logit rows whose arg-max agrees. fp16
#: rounds activations to 11 significant bits; dynamic int8 rounds each weight to 1/254 of its
#: row's range and each activation to 1/255 of its tensor's range, so its floors are lower.
TOLERANCE = {"fp16": {"min_cosine": 0.999, "min_top1": 0.95},
             "int8": {"min_cosine": 0.98, "min_top1": 0.85}}


def variant_name(variant: str, precision: str) -> str:
    """The folder of ``variant`` (dense, pruned) in ``precision``: ``pruned_fp16``,
    ``dense_int8`` (the encoder runs name their quantized variants the same way)."""
    return f"{variant}_{precision}"


def check_generative_precision(quantize: str, method: str, fp16: bool, runtime) -> str | None:
    """The precision variant a generative run adds (``"fp16"``, ``"int8"`` or None), or one
    ConfigError line for a combination that makes no sense, before any work. ``runtime``: the
    run's registry entry (``RunConfig.latency_config.runtime_entry``)."""
    q = str(quantize or "none").strip().lower()
    if q == "fp8":
        raise ConfigError("--quantize fp8 is not available for a generative model: fp8 runs on "
                          "TensorRT engines, and a generative run is exported for ONNX Runtime; "
                          "allowed: --quantize int8 --quantize-method dynamic, or --fp16")
    if q == "fp16":
        raise ConfigError("--quantize fp16 is not how a generative run gets fp16: allowed: --fp16 "
                          "(adds dense_fp16/ and pruned_fp16/ beside the validated fp32 export)")
    if q not in GENERATIVE_QUANTIZE:
        raise ConfigError(f"unknown --quantize {quantize!r}; allowed for a generative model: "
                          f"{', '.join(GENERATIVE_QUANTIZE)}")
    if q == "int8":
        if fp16:
            raise ConfigError("--quantize int8 quantizes the fp32 export; drop --fp16 (one "
                              "precision variant per generative run)")
        if (runtime.name, runtime.device) != ("onnxruntime", "cpu"):
            raise ConfigError(f"--quantize int8 of a generative model runs on onnxruntime/cpu "
                              f"(dynamic int8 MatMuls), not {runtime.label}; allowed: --engine "
                              "onnxruntime --device cpu")
        if method != "dynamic":
            raise ConfigError(f"--quantize-method {method} is not built for a generative "
                              "decoder (its KV cache inputs have no fixed range to calibrate); "
                              "allowed: --quantize int8 --quantize-method dynamic")
        return "int8"
    if fp16:
        return "fp16"
    return None


# --------------------------------------------------------------------------------------------
# fp16
# --------------------------------------------------------------------------------------------
def kv_cache_fp16(model: onnx.ModelProto, inputs: tuple[str, ...] = ("past.",),
                  outputs: tuple[str, ...] = ("present.",)) -> onnx.ModelProto:
    """In a decoder converted by ``convert_fp16`` (graph inputs and outputs fp32), make the
    ``past.*`` inputs and ``present.*`` outputs fp16 (``inputs`` / ``outputs``: the name
    prefixes; BLIP's decoder adds its ``cross.*`` inputs, its ``cross_kv.onnx`` has the
    ``cross.*`` outputs): the converter's casts at the boundary are dropped (readers of a
    past read it directly; a present is the fp16 value the graph computed). The result is
    type-checked: a past read by a node that runs in fp32 would leave it ill-typed
    (ExportError naming the problem; none in our decoders, whose caches are read by Concat,
    Transpose and MatMul only)."""
    g = model.graph
    F16 = TensorProto.FLOAT16
    past = {i.name for i in g.input if i.name.startswith(tuple(inputs))}
    present = {o.name for o in g.output if o.name.startswith(tuple(outputs))}
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        if n.op_type == "Cast" and n.input[0] in past and to == F16:
            rename[n.output[0]] = n.input[0]  # readers of the fp16 copy read the input itself
            continue
        keep.append(n)
    # present.x = Cast(to fp32)(fp16 value): drop the cast, name the fp16 value present.x
    producer_cast = {n.output[0]: n for n in keep if n.op_type == "Cast" and n.output[0] in present}
    out_rename = {}
    for name, n in producer_cast.items():
        src = rename.get(n.input[0], n.input[0])
        out_rename[src] = name
        keep.remove(n)
    for n in keep:
        for k, x in enumerate(n.input):
            x = rename.get(x, x)
            n.input[k] = out_rename.get(x, x)
        for k, x in enumerate(n.output):
            n.output[k] = out_rename.get(x, x)
    missing = [o for o in present if o not in {y for n in keep for y in n.output}]
    if missing:
        raise ExportError(f"fp16 KV cache: the decoder computes no fp16 {missing[0]}")
    del g.node[:]
    g.node.extend(keep)
    for vi in list(g.input) + list(g.output):
        if vi.name in past or vi.name in present:
            vi.type.tensor_type.elem_type = F16
    try:  # on a weightless copy (a decoder past 2 GB cannot be serialised for the checker)
        weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in g.initializer]
        light = helper.make_model(helper.make_graph(list(g.node), g.name or "g",
                                                    list(g.input) + weights, list(g.output)),
                                  opset_imports=list(model.opset_import),
                                  ir_version=model.ir_version)
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - one line naming the problem
        raise ExportError(f"fp16 KV cache: the decoder does not type-check "
                          f"({' '.join(str(exc).split())[:200]})") from None
    return model


def _shared(src: Path, spec: dict, dst: Path, shared: Path | None) -> dict[str, str]:
    """part -> the file ``dst``'s generation.json names for each part ``src`` borrows from its
    full-token twin (a ``--visual-tokens`` variant holds only its vision graph): the same part
    of ``shared``, the twin's variant in this precision, relative to ``dst``. Empty when ``src``
    owns every part."""
    borrowed = [p for p, f in spec["files"].items() if Path(f).parent != Path(".")]
    if not borrowed:
        return {}
    if shared is None:
        raise ConfigError(f"{str(src)!r} borrows its {borrowed[0]} graph from its full-token "
                          "twin; allowed: shared= the twin's variant in this precision")
    if shared.resolve().parent != dst.resolve().parent:
        raise ConfigError(f"shared {str(shared)!r} is not beside {str(dst)!r}; allowed: the "
                          "twin's variant folder in the same run folder")
    twin = read_spec(shared)
    return {p: (Path("..") / shared.name / twin["files"][p]).as_posix() for p in borrowed}


def _write_spec(src: Path, dst: Path, **changes) -> dict:
    spec = {**read_spec(src), **changes}
    (dst / GENERATION_JSON).write_text(json.dumps(spec, indent=2))
    return spec


def _props(model: onnx.ModelProto, **changes) -> None:
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update(changes)
    del model.metadata_props[:]
    helper.set_model_props(model, meta)


def _fp32_source(src: Path, dst: Path, shared) -> tuple[dict, dict]:
    """The fp32 export a precision variant is made from: its generation.json and the graphs
    ``dst`` borrows from ``shared`` (the twin's variant folder); an export that is already
    fp16 / int8 is refused in one line."""
    spec = read_spec(src)
    borrowed = _shared(src, spec, dst, None if shared is None else Path(shared))
    if spec.get("precision", "fp32") != "fp32" or spec.get("quantize"):
        raise ConfigError(f"{str(src)!r} is already {spec.get('quantize') or spec['precision']}; "
                          "allowed: an fp32 generative export")
    return spec, borrowed


def make_fp16_variant(src: str | Path, dst: str | Path, shared: str | Path | None = None) -> dict:
    """Write the fp16 copy of the export in ``src`` (vision, embed, decoder and
    generation.json) to ``dst``; returns what was written (the report's ``files``).
    ``shared``: for a token variant whose embed and decoder are its twin's, the twin's fp16
    folder, whose graphs ``dst`` names instead of converting them again."""
    from .onnx import convert_fp16, save_onnx

    src, dst = Path(src), Path(dst)
    spec, borrowed = _fp32_source(src, dst, shared)
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = {}
    blip = spec.get("kind") in BLIP_KINDS
    for part, name in spec["files"].items():
        if part in borrowed:
            files[part] = {"path": posixpath.normpath(f"{dst.name}/{borrowed[part]}"),
                           "shared": True}
            continue
        model = convert_fp16(onnx.load(str(src / name)))
        if part == "decoder":  # BLIP's also takes its cross keys / values in fp16
            model = kv_cache_fp16(model, ("past.", "cross.") if blip else ("past.",))
        elif part == "cross_kv":
            model = kv_cache_fp16(model, (), ("cross.",))
        _props(model, **{"vlcompress.precision": "fp16", "vlcompress.quantize": "fp16",
                         "vlcompress.quantize_method": "cast"})
        save_onnx(model, dst / name)
        files[part] = {"path": f"{dst.name}/{name}", "bytes": _bytes(dst / name)}
    _write_spec(src, dst, precision="fp16", kv_dtype="float16", quantize="fp16",
                quantized_from=src.name, files={**spec["files"], **borrowed})
    return {"precision": "fp16", "method": "cast", "kv_dtype": "float16", "files": files,
            "seconds": round(time.perf_counter() - t0, 2)}


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


# --------------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------------
def make_int8_variant(src: str | Path, dst: str | Path, parts=None,
                      shared: str | Path | None = None) -> dict:
    """Write the dynamic int8 copy of the export in ``src`` to ``dst`` (``parts`` quantized,
    the others copied; default: :data:`INT8_PARTS`, or every graph of a BLIP export, whose
    graphs are all MatMul work: vision, question, cross_kv, decoder); returns what was
    written. ``shared``: as for :func:`make_fp16_variant` (the twin's int8 folder)."""
    from .quantize import quantize_onnx

    src, dst = Path(src), Path(dst)
    spec, borrowed = _fp32_source(src, dst, shared)
    if parts is None:
        parts = tuple(spec["files"]) if spec.get("kind") in BLIP_KINDS else INT8_PARTS
    bad = [p for p in parts if p not in spec["files"]]
    if bad:
        raise ConfigError(f"int8 part {bad[0]!r} is not a part of a generative export; allowed: "
                          f"{', '.join(spec['files'])}")
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = {}
    for part, name in spec["files"].items():
        if part in borrowed:
            files[part] = {"path": posixpath.normpath(f"{dst.name}/{borrowed[part]}"),
                           "shared": True}
            continue
        if part in parts:
            res = quantize_onnx(src / name, dst / name, "int8", method="dynamic",
                                op_types=("MatMul",))
            files[part] = {"path": f"{dst.name}/{name}", "quantized_layers": res.quantized_layers,
                           "quantized_nodes": res.quantized_nodes}
        else:
            for f in src.glob(name + "*"):  # the graph and any external data beside it
                shutil.copy2(f, dst / f.name)
            files[part] = {"path": f"{dst.name}/{name}", "quantized_layers": {},
                           "note": "copied in fp32 (a Gather: no arithmetic to save)"
                           if part == "embed" else "copied in fp32"}
        files[part]["bytes"] = _bytes(dst / name)
    _write_spec(src, dst, precision="fp32", kv_dtype="float32", quantize="int8",
                quantize_method="dynamic", quantized_parts=list(parts), quantized_from=src.name,
                files={**spec["files"], **borrowed})
    return {"precision": "int8", "method": "dynamic", "kv_dtype": "float32",
            "quantized_parts": list(parts), "files": files,
            "seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _rows(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float64).reshape(-1, a.shape[-1])


def logit_agreement(got: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """Cosine similarity per row (min and mean) and top-1 agreement of two [..., vocab] arrays
    (``valid``: a boolean mask over the leading positions, e.g. not padding)."""
    g, r = _rows(got), _rows(ref)
    if valid is not None:
        keep = np.asarray(valid).reshape(-1)
        g, r = g[keep], r[keep]
    cos = (g * r).sum(-1) / np.maximum(np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1),
                                       1e-30)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "top1": float((g.argmax(-1) == r.argmax(-1)).mean()), "rows": int(len(g))}


def validate_variant(vlm, folder: str | Path, *, images, questions=None, max_new_tokens: int = 16,
                     precision: str | None = None, visual_tokens: int | None = None) -> dict:
    """Compare the fp16 or int8 export in ``folder`` with the fp32 PyTorch model (module doc):
    raise one ExportError naming every figure under its floor, else return the figures.
    ``visual_tokens`` K (a token variant): the reference keeps the same K tokens; the share of
    kept tokens the ONNX vision graph chose as PyTorch did is reported (``kept_agreement``:
    rounding moves near-ties of the attention ranking) and the embeddings are compared on the
    tokens both kept."""
    import torch

    from ..runtime.ort_generate_blip import open_generator
    from .generative import (
        DecoderGraph,
        VisionGraph,
        _decoder_args,
        _eager_attention,
        _example_pixels,
        greedy_pairs,
    )

    gen = open_generator(folder)
    precision = precision or gen.spec.get("quantize") or gen.spec.get("precision", "fp32")
    if precision not in TOLERANCE:
        raise ConfigError(f"no tolerance for precision {precision!r}; allowed: "
                          f"{', '.join(TOLERANCE)}")
    tol = TOLERANCE[precision]
    model = vlm.model.eval()
    figures: dict[str, dict] = {}
    if gen.spec.get("kind") in BLIP_KINDS:  # vision (question), cross kv, decoder, generation
        from .generative_blip import blip_greedy_pairs, blip_logit_checks

        for name, got, ref, valid in blip_logit_checks(vlm, gen):
            figures[name] = logit_agreement(got, ref, valid)
            if "logits" not in name:  # an embedding / key row has no arg-max to agree on
                figures[name].pop("top1")
        return _judge(figures, blip_greedy_pairs(vlm, gen, images, questions, max_new_tokens),
                      precision, tol, folder, max_new_tokens)
    with torch.no_grad(), _eager_attention(model):
        px = _example_pixels(vlm, 3, 1)
        got, index = gen.image_outputs(px.numpy())
        ref = VisionGraph(model, visual_tokens)(px)
        same = None
        if visual_tokens is not None:
            ref, ref_index = ref
            same = index == ref_index.numpy()
        figures["vision"] = logit_agreement(got, ref, same)
        figures["vision"].pop("top1")  # an embedding row has no arg-max to agree on
        if same is not None:
            figures["vision"]["kept_agreement"] = float(same.mean())
        dec = DecoderGraph(model)
        args = _decoder_args(vlm, 3, 6, 0, 2, pad=2)
        ref = dec(*args)
        past = gen.empty_past(3)
        logits, past = gen.decode_step(args[0].numpy(), args[1].numpy(), args[2].numpy(), past)
        # the positions the graph returns logits for (the last only; an older export: all),
        # left padding's not compared
        valid = args[1].numpy()[:, -logits.shape[1]:] > 0
        figures["decoder prefill logits"] = logit_agreement(logits, ref[0], valid)
        step = _decoder_args(vlm, 3, 1, 0, 3)[0]
        mask = torch.cat([args[1], torch.ones(3, 1, dtype=torch.long)], 1)
        pos = args[2][:, -1:] + 1
        ref2 = dec(step, mask, pos, *ref[1:])
        logits2, _ = gen.decode_step(step.numpy(), mask.numpy(), pos.numpy(), past)
        figures["decoder decode logits"] = logit_agreement(logits2, ref2[0])
    return _judge(figures, greedy_pairs(vlm, gen, images, questions, max_new_tokens,
                                        visual_tokens), precision, tol, folder, max_new_tokens)


def _judge(figures: dict, pairs: list, precision: str, tol: dict, folder, max_new_tokens: int
           ) -> dict:
    """One ExportError naming every figure under its floor, else the report's figures with
    the greedy generation agreement (``pairs``: PyTorch's and the export's tokens)."""
    problems = []
    for part, f in figures.items():
        if f["min_cosine"] < tol["min_cosine"]:
            problems.append(f"{part} cosine {f['min_cosine']:.4f} < {tol['min_cosine']}")
        if "top1" in f and f["top1"] < tol["min_top1"]:
            problems.append(f"{part} top-1 agreement {f['top1']:.3f} < {tol['min_top1']}")
    # greedy generation against PyTorch generate: measured and reported, not required
    exact = sum(a == b for a, b in pairs)
    same = total = 0
    for a, b in pairs:  # as generative_fidelity's greedy_agreement counts
        same += sum(int(x == y) for x, y in zip(a, b, strict=False)) if (a or b) else 1
        total += max(len(a), len(b), 1)
    if problems:
        raise ExportError(f"{precision} generative ONNX export in {str(folder)!r} is not within "
                          f"its tolerance of PyTorch: " + "; ".join(problems)
                          + f" (floors: cosine {tol['min_cosine']}, top-1 {tol['min_top1']})")
    n = len(pairs)
    return {"precision": precision, "against": "fp32 PyTorch", "tolerance": dict(tol),
            "logits": figures, "prompts": n, "token_exact": exact / max(1, n),
            "greedy_agreement": same / max(1, total), "max_new_tokens": int(max_new_tokens),
            "token_exact_required": False}


# --------------------------------------------------------------------------------------------
# inside a prune-export run
# --------------------------------------------------------------------------------------------
def build_variant(vlm, src: str | Path, precision: str, *, images, questions=None,
                  max_new_tokens: int = 16, visual_tokens: int | None = None,
                  shared: str | Path | None = None) -> dict:
    """Write ``<src>_<precision>/`` beside the fp32 export ``src`` (while ``vlm`` holds the
    weights ``src`` was exported from) and validate it against ``vlm``; the report's export
    entry, its paths relative to the run folder. A token variant (``visual_tokens`` K):
    its vision graph in ``precision``, the embed and decoder of ``shared`` (its twin's
    variant in this precision), validated with the K tokens."""
    src = Path(src)
    dst = src.parent / variant_name(src.name, precision)
    make = make_fp16_variant if precision == "fp16" else make_int8_variant
    info = make(src, dst, shared=shared)
    info["validation"] = validate_variant(vlm, dst, images=images, questions=questions,
                                          max_new_tokens=max_new_tokens, precision=precision,
                                          visual_tokens=visual_tokens)
    spec = read_spec(dst)
    info["paths"] = {p: posixpath.normpath(f"{dst.name}/{f}") for p, f in spec["files"].items()}
    return info


def variants_accuracy(vlm, root: str | Path, names: list[str], evals, dense_runs, pruned_runs, *,
                      max_new_tokens: int, random_weights: bool = False, progress=None,
                      float_twins: dict | None = None) -> dict:
    """The accuracy of each variant folder ``root/<name>`` measured from its files on ONNX
    Runtime CPU (:func:`vlcompress.eval.generative_ort.ort_run_generative`): the tasks' metrics
    (none for random weights) and the fidelity to the dense PyTorch model (``dense_runs``), as
    the report's ``quantize.accuracy``; ``float_twins`` (variant -> its PyTorch runs, e.g.
    ``dense_tokens``) gives the runs ``<variant>_<precision>`` is compared with (default: dense
    or pruned by the name). ``dense`` and ``pruned`` are the PyTorch runs (their
    fp32 ONNX is validated token-exact against them)."""
    from ..eval.generative import dataset_name, generative_fidelity, generative_metrics, merged_runs
    from ..eval.generative_ort import ort_run_generative
    from ..runtime.ort_generate_blip import open_generator

    def metrics(runs):
        out = {}
        if not random_weights:
            for r in runs:
                out.update(generative_metrics(r))
        return out

    ref = merged_runs(dense_runs)
    acc = {"dataset": dataset_name(evals, random_weights=random_weights),
           "measured_on": "ONNX Runtime CPU (dense, pruned: PyTorch, whose fp32 ONNX is "
                          "validated token-exact)",
           "variants": {"dense": {"metrics": metrics(dense_runs),
                                  "fidelity": generative_fidelity(ref, ref)},
                        "pruned": {"metrics": metrics(pruned_runs),
                                   "fidelity": generative_fidelity(ref, merged_runs(pruned_runs))}}}
    for name in names:
        gen = open_generator(Path(root) / name)
        runs = [ort_run_generative(gen, vlm, d, max_new_tokens=max_new_tokens, progress=progress)
                for d in evals]
        twin = (float_twins or {}).get(name.rsplit("_", 1)[0]) or (
            pruned_runs if name.startswith("pruned") else dense_runs)
        acc["variants"][name] = {
            "metrics": metrics(runs), "fidelity": generative_fidelity(ref, merged_runs(runs)),
            "fidelity_to_float_twin": generative_fidelity(merged_runs(twin), merged_runs(runs)),
            "examples": [{"text": t} for t in runs[0].texts[:3]]}
    return acc
