"""Quantization on top of sparsity, inside a run: the quantized variants, their accuracy and
their latency.

    q = quantize_variants(vlm, {"dense": dense_export.paths, "pruned": pruned_export.paths},
                          calib, "int8", "static", root)        # dense_int8/, pruned_int8/
    emb = onnx_embed_eval(vlm, q["pruned"], eval_data)           # accuracy of what ships

The quantized files are what a user deploys, so their accuracy is measured on them (ONNX
Runtime CPU over the eval pairs, :mod:`vlcompress.onnx_eval`), not on a PyTorch stand-in. On a
TensorRT run the files are explicit QDQ for TensorRT (``target="tensorrt"``: symmetric int8,
or fp8 e4m3) on the inputs and weights of weighted layers, quantized from an fp32 export (the
run's own ONNX is fp16 there) and then made fp16 outside the Q/DQ pairs, like the fp16 engines
they are compared with (:func:`quantize_float16`), and timed as
TensorRT engines on the ``tensorrt/cuda/<int8|fp8>`` entries; their accuracy is still measured
on ONNX Runtime CPU from the same QDQ files (fp8 with graph optimisation BASIC:
:func:`vlcompress.runtime.ort_runner.ort_optimization`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .onnx_eval import onnx_embed_eval
from .run_latency import pruned_layer_names, run_build_options, run_feeds

#: calibration pairs for static quantization (activation ranges), at most
QUANT_CALIBRATION_PAIRS = 64


def calibration_feeds(vlm, tower: str, calib, max_pairs: int = QUANT_CALIBRATION_PAIRS,
                      batch: int = 8) -> list[dict]:
    """The first ``max_pairs`` calibration pairs as ``tower`` feeds of ``batch`` pairs."""
    from .data.pairs import PairBatch
    from .runtime.latency import make_feeds

    feeds, n = [], 0
    for b in calib.batches():
        for i in range(0, len(b), batch):
            if n >= max_pairs:
                return feeds
            labels = None if b.labels is None else b.labels[i:i + batch]
            sub = PairBatch(b.images[i:i + batch] if b.images is not None else None,
                            b.captions[i:i + batch], labels)
            feeds.append(make_feeds(vlm, [tower], [len(sub)], sub)[(tower, len(sub))])
            n += len(sub)
    return feeds


def quantize_variants(vlm, exports: dict[str, dict[str, Path]], calib, quantize: str,
                      method: str, root: Path, progress=None, target: str = "onnxruntime",
                      float16: bool = False) -> tuple[dict, dict]:
    """Quantize each variant's ONNX towers into ``root/<variant>_<quantize>/<tower>.onnx``.

    Static int8 is calibrated on the run's calibration pairs (each tower on its own inputs).
    ``target``: the runtime the files are for (:func:`..exporters.quantize.quantize_target`);
    ``float16``: int8 / fp8 QDQ on the fp16 graph (:func:`quantize_float16`).
    Returns (variant -> tower -> path, variant -> tower -> QuantizeResult dict)."""
    from .exporters.quantize import quantize_onnx

    paths, info = {}, {}
    feeds_cache: dict[str, list] = {}
    for variant, towers in exports.items():
        paths[variant], info[variant] = {}, {}
        for tower, src in towers.items():
            feeds = None
            if quantize in ("int8", "fp8") and method == "static":
                if tower not in feeds_cache:
                    feeds_cache[tower] = calibration_feeds(vlm, tower, calib)
                feeds = feeds_cache[tower]
            dst = Path(root) / f"{variant}_{quantize}" / f"{tower}.onnx"
            res = quantize_onnx(src, dst, quantize, calibration=feeds, method=method,
                                target=target, float16=float16 and quantize in ("int8", "fp8"))
            paths[variant][tower] = dst
            info[variant][tower] = {**res.to_dict(), "path": f"{variant}_{quantize}/{tower}.onnx"}
    return paths, info


#: kernels ONNX Runtime runs a QDQ MatMul / Gemm / Conv as in integer arithmetic (its QDQ
#: fusions); a weighted layer that still runs as MatMul / Gemm / Conv runs in float
INT8_KERNELS = ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QGemm",
                "QLinearConv", "ConvInteger", "DynamicQuantizeMatMul")
#: ops of a quantized graph that must run on the first provider for the timing to be its
QUANT_GRAPH_OPS = ("MatMul", "Gemm", "Conv", "QuantizeLinear", "DequantizeLinear") + INT8_KERNELS
#: ONNX Runtime providers of each ONNX runtime entry, in order (the runners use the same)
ORT_PROVIDERS = {
    ("onnxruntime", "cpu"): ("CPUExecutionProvider",),
    ("onnxruntime", "cuda"): ("CUDAExecutionProvider", "CPUExecutionProvider"),
    ("onnxruntime-trt", "cuda"): ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                  "CPUExecutionProvider"),
}


def node_placement(path: Path, providers, feed: dict) -> dict:
    """Where ONNX Runtime ran each node of one call of the file at ``path`` (session
    profiling, the node events' ``provider``): provider -> op type -> count, the weighted
    layers it ran with integer kernels (:data:`INT8_KERNELS`), and the quantized graph's nodes
    it handed to a provider other than the first (``handed_elsewhere``: provider -> op types).
    The first provider alone says nothing of this: the TensorRT provider hands nodes it cannot
    take (e.g. uint8 activations with zero points) to CUDA or CPU without a word."""
    import json
    import tempfile

    import onnxruntime as ort

    from .runtime.ort_runner import ort_optimization

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    if ort_optimization(path) == "basic":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix=".vlc-placement-") as d:
        so.profile_file_prefix = str(Path(d) / "profile")
        sess = ort.InferenceSession(str(path), so, providers=list(providers))
        names = [i.name for i in sess.get_inputs()]
        sess.run(None, {n: np.ascontiguousarray(
            feed[n].detach().cpu().numpy() if hasattr(feed[n], "detach") else feed[n])
            for n in names})
        events = json.loads(Path(sess.end_profiling()).read_text())
    ran: dict[str, dict[str, int]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        a = e.get("args", {})
        ops = ran.setdefault(str(a.get("provider")), {})
        ops[str(a.get("op_name"))] = ops.get(str(a.get("op_name")), 0) + 1
    elsewhere = {p: sorted(o for o in ops if o in QUANT_GRAPH_OPS) for p, ops in ran.items()
                 if p != providers[0]}
    return {"first_provider": providers[0], "ran": ran,
            "int8_kernels": sum(n for ops in ran.values() for o, n in ops.items()
                                if o in INT8_KERNELS),
            "handed_elsewhere": {p: o for p, o in elsewhere.items() if o}}


def placement_section(rt, paths: dict[str, dict[str, Path]], feeds: dict, info: dict
                      ) -> tuple[dict, list[str]] | None:
    """:func:`node_placement` of every quantized tower file (variant -> tower -> path) on the
    providers of ONNX runtime ``rt`` with its smallest-batch feed; and the lines that say what
    did not run as the timing claims (a node handed to another provider, or fewer integer
    kernels than quantized MatMul / Gemm layers on the CPU provider; its Conv -- the patch
    embedding -- has no integer kernel without an output Q/DQ, which the placement rules out,
    so it runs dequantized weights in float, as the report's placement shows). None for
    runtimes that are not ONNX Runtime."""
    providers = ORT_PROVIDERS.get((rt.name, rt.device))
    if providers is None:
        return None
    out, problems = {}, []
    for variant, towers in paths.items():
        for tower, path in towers.items():
            batch = min(b for (t, b) in feeds if t == tower)
            pl = node_placement(path, providers, feeds[(tower, batch)])
            out.setdefault(variant, {})[tower] = pl
            for prov, ops in pl["handed_elsewhere"].items():
                problems.append(f"{variant} {tower}: {', '.join(ops)} ran on {prov}, not "
                                f"{providers[0]}")
            layers = info.get(variant, {}).get(tower, {}).get("quantized_layers") or {}
            n_q = layers.get("MatMul", 0) + layers.get("Gemm", 0)
            got = sum(pl["ran"].get(providers[0], {}).get(k, 0) for k in INT8_KERNELS
                      if k not in ("QLinearConv", "ConvInteger"))
            if providers[0] == "CPUExecutionProvider" and n_q and got < n_q:
                problems.append(f"{variant} {tower}: {got} of {n_q} quantized MatMul/Gemm "
                                "layers ran with integer kernels on the CPU provider")
    return out, problems


def fidelity_to_dense(dense_emb, emb) -> dict:
    """:func:`vlcompress.eval.fidelity` of ``emb`` to the dense embeddings; {} when either is
    missing."""
    from .eval import fidelity

    return fidelity(dense_emb, emb) if (dense_emb is not None and emb is not None) else {}


def quantize_float16(cfg) -> bool:
    """Whether the run's int8 / fp8 QDQ files are fp16 outside the Q/DQ pairs: for TensorRT
    (engines, or ONNX Runtime's TensorRT provider) when the run's float ONNX is fp16, so the
    quantized variants run their float layers in the precision of the float variants they are
    compared with (``--engine trt``: fp16 engines)."""
    from .exporters.quantize import quantize_target

    return (cfg.quantize in ("int8", "fp8") and cfg.onnx_fp16
            and quantize_target(cfg.latency_config.runtime_entry) == "tensorrt")


def quantized_runtime(rt, quantize: str):
    """The registry entry the ``<variant>_<quantize>`` files run on: ``tensorrt/cuda/<q>`` for a
    TensorRT run (engines from the QDQ files), the runtime's fp16 entry for fp16, else the
    run's own entry (ONNX Runtime runs QDQ int8 on its fp32 entry)."""
    from .runtime.registry import get_runtime

    if rt.name == "tensorrt":
        return get_runtime(rt.name, rt.device, quantize)
    return get_runtime(rt.name, rt.device, "fp16") if quantize == "fp16" else rt


def quantized_section(cfg, vlm, calib, dense_export, pruned_export, dense_emb, eval_data,
                      example, root: Path, progress, sources: dict | None = None):
    """Quantize dense and pruned, evaluate the four variants from their ONNX files, time them
    interleaved on the run's runtime. Returns (report["quantize"], latency rows).

    What each variant is built from:

    - ``dense`` / ``pruned``: the run's exports (``dense/``, ``pruned/``; fp16 ONNX on a
      TensorRT run, timed as fp16 engines built there);
    - ``dense_<q>`` / ``pruned_<q>``: ``quantize_onnx`` of ``sources`` (variant -> tower ->
      fp32 ONNX; default: the run's exports, which must then be fp32), written to
      ``<variant>_<q>/`` for the run's runtime (:func:`..exporters.quantize.quantize_target`:
      explicit QDQ for TensorRT) and timed on :func:`quantized_runtime` (TensorRT: engines
      built from the QDQ files in ``<variant>_<q>/``, 2:4 sparse weights for ``pruned_<q>``
      of a 2:4 run).

    Accuracy of all four is measured from their ONNX files on ONNX Runtime CPU."""
    from dataclasses import replace

    from .eval import metrics_from_embeddings
    from .exporters.quantize import quantize_target
    from .progress import NULL
    from .runtime.registry import Artefacts
    from .runtime.timing import time_variants

    progress = progress or NULL
    q = cfg.quantize
    lc = cfg.latency_config
    rt = lc.runtime_entry
    target = quantize_target(rt)
    exports = {"dense": dict(dense_export.paths), "pruned": dict(pruned_export.paths)}
    srcs = {k: dict(v) for k, v in (sources or exports).items()}
    float16 = quantize_float16(cfg)
    paths, info = quantize_variants(vlm, srcs, calib, q, cfg.quantize_method, root, progress,
                                    target=target, float16=float16)
    acc = None
    if eval_data is not None:
        embs, unmeasured = {}, {}
        for variant, ps in [("dense", exports["dense"]), ("pruned", exports["pruned"]),
                            (f"dense_{q}", paths["dense"]), (f"pruned_{q}", paths["pruned"])]:
            try:
                embs[variant] = onnx_embed_eval(vlm, ps, eval_data)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
                if q != "fp8" or variant in ("dense", "pruned"):
                    raise
                import onnxruntime

                msg = " ".join(str(exc).split())[:200]
                unmeasured[variant] = (f"fp8 accuracy not measured: onnxruntime "
                                       f"{onnxruntime.__version__} CPU cannot run the fp8 QDQ "
                                       f"files ({msg})")
        if all(e is not None for e in embs.values()):
            preset = vlm.source.startswith("preset:")
            # fidelity: to the dense PyTorch model's embeddings
            acc = {"dataset": getattr(eval_data, "source", ""), "measured_on": "ONNX Runtime CPU",
                   "variants": {k: {"metrics": {} if preset else metrics_from_embeddings(e),
                                    "fidelity": fidelity_to_dense(dense_emb, e)}
                                for k, e in embs.items()}}
            for k, why in unmeasured.items():  # said, not skipped
                acc["variants"][k] = {"not_measured": why}
            if q == "fp8" and not unmeasured:
                acc["note"] = ("fp8 variants measured from their fp8 QDQ files on ONNX Runtime "
                               "CPU at graph optimisation BASIC (each Q/DQ pair's e4m3 rounding "
                               "computed as written), not on the TensorRT engine")
        else:
            acc = {"note": f"{vlm.family}: accuracy of quantized files needs the ITM fusion "
                           "tower; not measured"}
    qrt = quantized_runtime(rt, q)
    towers = [t for t in vlm.towers if t in pruned_export.paths]
    feeds = run_feeds(cfg, vlm, towers, example)
    # where the quantized nodes really run (ONNX Runtime: not only its first provider)
    placed = placement_section(qrt, paths, feeds, info)
    if placed is not None and placed[1]:
        import logging

        for line in placed[1]:
            logging.getLogger(__name__).warning("--quantize %s: %s", q, line)
    pruned_names = pruned_layer_names(vlm)
    variants = {
        "dense": (rt, Artefacts("dense", onnx=exports["dense"], folder=root / "dense")),
        f"dense_{q}": (qrt, Artefacts(f"dense_{q}", onnx=paths["dense"],
                                      folder=root / f"dense_{q}")),
        "pruned": (rt, Artefacts("pruned", onnx=exports["pruned"], folder=root / "pruned",
                                 pruned_layers=pruned_names)),
        f"pruned_{q}": (qrt, Artefacts(f"pruned_{q}", onnx=paths["pruned"],
                                       folder=root / f"pruned_{q}", pruned_layers=pruned_names)),
    }
    opts = run_build_options(cfg, vlm, feeds, towers, root)
    rows = time_variants(variants, feeds, replace(lc, towers=tuple(towers)), towers=towers,
                         options=opts, progress=progress)
    for row in rows:
        v = row["variants"]
        row["quantize"] = q
        row["gain_over_quantized"] = v[f"dense_{q}"]["ms"]["p50"] / v[f"pruned_{q}"]["ms"]["p50"]
    built_from = ("the run's ONNX (dense/, pruned/)" if sources is None else
                  "an fp32 export of each variant made for quantizing (not kept: the run's own "
                  "ONNX is fp16)")
    return {"quantize": q, "method": cfg.quantize_method, "target": target,
            "float_parts": "fp16" if float16 else ("fp16" if q == "fp16" else "fp32"),
            "runtime": qrt.label, "quantized_from": built_from, "files": info,
            "nm_survives": _nm_check(cfg, srcs["pruned"], paths["pruned"]),
            "placement": None if placed is None else placed[0],
            "placement_problems": None if placed is None else placed[1],
            "accuracy": acc}, rows


def _nm_check(cfg, float_paths, quant_paths):
    """For an N:M run: the weights that are N:M in the float file but not in the quantized
    one (empty = the pattern survived), per tower."""
    pat = cfg.prune_config.pattern
    if not getattr(pat, "is_nm", False) or cfg.quantize not in ("int8", "fp8"):
        return None
    from .exporters.onnx import check_nm
    from .exporters.quantize import check_nm_quantized

    n, m = pat.n, pat.m
    return {t: sorted(set(check_nm_quantized(quant_paths[t], n, m)) - set(check_nm(p, n, m)))
            for t, p in float_paths.items()}


__all__ = ["QUANT_CALIBRATION_PAIRS", "calibration_feeds", "quantize_variants",
           "quantized_runtime", "quantized_section", "fidelity_to_dense", "quantize_float16",
           "node_placement", "placement_section"]
