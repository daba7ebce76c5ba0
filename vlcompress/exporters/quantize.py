"""Quantize exported ONNX towers: int8 (static QDQ or dynamic), fp16, fp8 (TensorRT).

    res = quantize_onnx("pruned/vision.onnx", "pruned_int8/vision.onnx", "int8",
                        calibration=[feed, feed, ...])          # static QDQ, per-channel
    check_nm_quantized(res.path)                                 # [] when 2:4 survived

**int8, static (the default).** ONNX Runtime's ``quantize_static`` in QDQ format: weights int8,
symmetric, one scale per output channel (``DequantizeLinear`` with ``axis`` on the output
dimension); activations calibrated (MinMax) on the user's calibration pairs, uint8 asymmetric
for ONNX Runtime CPU (its fast u8s8 kernels), int8 symmetric for TensorRT (explicit QDQ: TensorRT
needs zero points of 0, and places int8 -- and 2:4 sparse int8 -- kernels around each QDQ pair).

**Where the Q/DQ pairs go: the inputs and weights of weight-bearing layers, nothing else**
(TensorRT's placement advice, "Q/DQ Layer-Placement Recommendations": quantize the inputs of
weighted operations, do not quantize their outputs). ONNX Runtime's QDQ quantizer by default
also puts a pair on every quantized node's output (``OpTypesToExcludeOutputQuantization``
unset) and lets every other reader of a quantized tensor read the dequantized copy, so q/k/v
outputs and the residual stream were rounded per tensor; :func:`_inputs_only` removes both:
output quantization is excluded, and any reader that is not a quantized layer (a residual
``Add``, a LayerNorm) reads the float tensor again.

**What stays in float (per op type, :data:`INT8_OPS`).** Only the weight-bearing ops are
quantized: ``MatMul``/``Gemm`` whose second input is a weight (every Linear: attention q/k/v/o,
MLP fc1/fc2, projections) and ``Conv`` (the patch embedding). Activation-activation MatMuls
(``Q K^T`` and ``softmax V`` in attention), Softmax, LayerNorm, GELU, residual adds stay fp32:
they hold almost none of the FLOPs at these sequence lengths, and the attention probabilities
and the pre-LayerNorm residual stream have outliers that a per-tensor uint8 scale crushes.
Measured before the placement fix above (``benchmarks/quant_quality.py``'s ``quant_ops``, the
earlier versions of ``quant_quality.json`` in git history: tiny-clip, 720 eval pairs, ONNX
Runtime CPU, one thread, interleaved): quantizing the attention MatMuls too was *slower* in
every cell but one -- their per-call QuantizeLinear cost more than the int8 product saved.
Re-measured with the placement fix (``quant_quality.json``): the same accuracy either way on the
recovered structured model (zero-shot 98.3% weights-only against 98.2%, i2t R@1 97.5%
against 97.6%; fp32 98.2% / 97.5%); its timings were taken under a load average of 8-15 on 2
cores and decide nothing. So
weights-only is the default; ``quantize_activation_matmuls`` turns the other on.

**int8, dynamic.** ``quantize_dynamic``: weights int8 per channel, activations quantized on the
fly per call (no calibration); ONNX Runtime CPU only.

**fp16.** :func:`vlcompress.exporters.onnx.convert_fp16` (the export's own converter).

**fp8** (TensorRT on a GPU with fp8, compute capability >= 8.9): the same explicit QDQ graph
with ``float8e4m3fn`` weights and activations, activations calibrated MinMax like int8 (scale =
max |x| / 448, the e4m3 maximum). Built and checked here (graph, scales); only a GPU can build
the engine (tested to that boundary).

**On the fp16 graph** (``float16=True``, TensorRT int8 / fp8 builds): quantization runs on the
fp32 graph (calibration needs fp32), then everything outside the Q/DQ pairs -- scales
included -- is converted to fp16 with the export's converter (LayerNorm, Softmax stay fp32
inside it as in every fp16 export), so the quantized engines run their float layers in fp16 like
the fp16 engines they are compared with. The opset is raised to 19 where lower (fp16 scales
on QuantizeLinear need it; 19 only adds types to the ops these exports use).

Zeros stay zeros: a symmetric weight scale maps 0 to exactly 0, so a 2:4 weight keeps its
pattern in the int8 initialiser (:func:`check_nm_quantized` reads the quantized initialisers).
Every file keeps the export's metadata and records ``vlcompress.quantize`` (int8 | fp16 | fp8)
and ``vlcompress.quantize_method``; ``vlcompress.precision`` stays the precision of the float
parts (fp32, or fp16 after fp16 or ``float16=True``), which is what the runtime registry checks.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ExportError

#: what ``--quantize`` accepts
QUANTIZE = ("none", "int8", "fp16", "fp8")
#: int8 calibration methods
QUANT_METHODS = ("static", "dynamic")
#: ONNX targets: which runtime will consume the quantized graph
TARGETS = ("onnxruntime", "tensorrt")
#: op types quantized in int8/fp8 (everything else stays in float; see the module doc)
INT8_OPS = ("MatMul", "Gemm", "Conv")
#: which quantizations each runtime can run (runtimes not listed: none only). tensorrt: engines
#: built from explicit QDQ ONNX (target "tensorrt") on its tensorrt/cuda/int8 and /fp8 entries;
#: its float engines are already fp16, so fp16 is not a quantization there. onnxruntime-trt:
#: int8 written for TensorRT (symmetric, zero points 0; ONNX Runtime's uint8 activations would
#: be handed to another provider), no fp8 (its TensorRT provider builds no strongly typed fp8
#: network from our files: refused before any work)
RUNTIME_QUANTIZE = {
    "onnxruntime": ("int8", "fp16"),
    "onnxruntime-trt": ("int8", "fp16"),
    "tensorrt": ("int8", "fp8"),
}
#: (runtime, device) -> quantizations refused there, with why (checked before any work)
DEVICE_REFUSED = {
    ("onnxruntime", "cuda"): ("int8", "ONNX Runtime's CUDA provider has no int8 kernels for QDQ "
                                      "MatMuls (it dequantizes and multiplies in float, so the "
                                      "timing would not be int8)"),
}
#: the quantize_onnx target of a runtime's quantized files (runtimes not listed: onnxruntime)
RUNTIME_TARGET = {"tensorrt": "tensorrt", "onnxruntime-trt": "tensorrt"}


def check_quantize(value, method: str = "static") -> str:
    """The canonical ``--quantize`` value; ConfigError naming what is allowed."""
    q = str(value).strip().lower() if value is not None else "none"
    if q not in QUANTIZE:
        raise ConfigError(f"unknown --quantize {value!r}; allowed: {', '.join(QUANTIZE)}")
    if str(method) not in QUANT_METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; allowed: "
                          f"{', '.join(QUANT_METHODS)}")
    if method == "dynamic" and q != "int8":
        raise ConfigError(f"--quantize-method dynamic applies to int8 only, not {q}")
    return q


def check_quantize_runtime(quantize: str, runtime, method: str = "static") -> None:
    """ConfigError when ``runtime`` (a registry entry) cannot run ``quantize`` ONNX."""
    q = check_quantize(quantize, method)
    if q == "none":
        return
    ok = RUNTIME_QUANTIZE.get(runtime.name, ())
    if q not in ok:
        allowed = "; ".join(f"{k}: {', '.join(v)}" for k, v in RUNTIME_QUANTIZE.items())
        raise ConfigError(f"--quantize {q} cannot run on runtime {runtime.label}; allowed: "
                          f"{allowed}")
    refused = DEVICE_REFUSED.get((runtime.name, runtime.device))
    if refused is not None and q == refused[0]:
        raise ConfigError(f"--quantize {q} cannot run on runtime {runtime.label}: {refused[1]}; "
                          "allowed: --engine onnxruntime-trt or trt (int8 QDQ for TensorRT), "
                          f"--device cpu, or --quantize fp16")
    if method == "dynamic" and (runtime.name != "onnxruntime" or runtime.device != "cpu"):
        raise ConfigError(f"dynamic int8 runs on onnxruntime/cpu only, not {runtime.label}; "
                          "use --quantize-method static")


def quantize_target(runtime) -> str:
    """The :func:`quantize_onnx` target for files a runtime (a registry entry) will run:
    ``"tensorrt"`` (symmetric int8 / fp8 explicit QDQ) for TensorRT engines, else
    ``"onnxruntime"``."""
    return RUNTIME_TARGET.get(runtime.name, "onnxruntime")


def check_quantize_target(quantize, method: str = "static", target: str = "onnxruntime") -> str:
    """``check_quantize`` for a file meant for ``target`` (onnxruntime | tensorrt): the
    canonical value, or ConfigError naming what that target takes."""
    q = check_quantize(quantize, method)
    if target not in TARGETS:
        raise ConfigError(f"unknown quantization target {target!r}; allowed: {', '.join(TARGETS)}")
    if q == "fp8" and target != "tensorrt":
        raise ConfigError("--quantize fp8 is for TensorRT only; allowed with target onnxruntime: "
                          "none, int8, fp16 (or --quantize-target tensorrt)")
    if method == "dynamic" and target != "onnxruntime":
        raise ConfigError(f"dynamic int8 runs on onnxruntime only, not {target}; use "
                          "--quantize-method static (explicit QDQ)")
    return q


@dataclass
class QuantizeResult:
    path: Path
    quantize: str
    method: str
    target: str
    quantized_nodes: dict[str, int] = field(default_factory=dict)  # op type -> count
    float_ops: list[str] = field(default_factory=list)  # op types left in float
    seconds: float = 0.0
    quantized_layers: dict[str, int] = field(default_factory=dict)  # op type -> layers whose
    # weight is stored quantized (MatMul / Gemm / Conv)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "quantize": self.quantize, "method": self.method,
                "target": self.target, "quantized_nodes": dict(self.quantized_nodes),
                "quantized_layers": dict(self.quantized_layers),
                "float_ops": list(self.float_ops), "seconds": round(self.seconds, 3)}


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feeds (only the model's inputs)."""

    def __init__(self, feeds: Iterable[dict], names: list[str]):
        self._it = iter([{n: np.ascontiguousarray(f[n]) for n in names} for f in feeds])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - not used by MinMax
        pass


def weight_matmuls(model, ops: Iterable[str] = INT8_OPS) -> tuple[list[str], list[str]]:
    """(names of ``ops`` nodes whose weight input is an initializer, names of the others).

    Nodes without a name get one (``quantize_static`` addresses nodes by name)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def is_weight(name: str) -> bool:
        for _ in range(4):
            if name in inits:
                return True
            n = producer.get(name)
            if n is None or n.op_type not in ("Cast", "Identity", "Transpose", "Constant"):
                return n is not None and n.op_type == "Constant"
            name = n.input[0] if n.input else ""
        return False

    weights, other = [], []
    for i, n in enumerate(g.node):
        if n.op_type not in ops:
            continue
        if not n.name:
            n.name = f"{n.op_type}_{i}"
        (weights if len(n.input) > 1 and is_weight(n.input[1]) else other).append(n.name)
    return weights, other


def _meta(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _count_ops(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulInteger",
                         "DynamicQuantizeLinear", "QLinearMatMul", "ConvInteger"):
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def quantize_onnx(src: str | Path, dst: str | Path, quantize: str = "int8", *,
                  calibration: Iterable[dict] | None = None, method: str = "static",
                  target: str = "onnxruntime", quantize_activation_matmuls: bool = False,
                  float16: bool = False, op_types: Iterable[str] = INT8_OPS) -> QuantizeResult:
    """Write a quantized copy of the ONNX file ``src`` to ``dst`` (see the module doc).

    ``calibration``: feeds (input name -> array) for static int8/fp8, e.g. the user's
    calibration pairs through :func:`vlcompress.runtime.latency.make_feeds`.
    ``quantize_activation_matmuls`` also quantizes the attention MatMuls (off: measured worse).
    ``float16``: int8 / fp8 for TensorRT only: the float parts of the QDQ graph in fp16.
    ``op_types``: the weighted op types quantized (a subset of :data:`INT8_OPS`; the
    generative int8 variant leaves the vision tower's patch Conv in float).
    """
    import onnx

    from .onnx import convert_fp16, save_onnx

    q = check_quantize(quantize, method)
    if q == "none":
        raise ConfigError("quantize_onnx needs int8, fp16 or fp8, not none")
    if target not in TARGETS:
        raise ConfigError(f"unknown quantization target {target!r}; allowed: {', '.join(TARGETS)}")
    if q == "fp8" and target != "tensorrt":
        raise ConfigError("fp8 ONNX is for TensorRT only; allowed: target='tensorrt'")
    if float16 and (q not in ("int8", "fp8") or target != "tensorrt"):
        raise ConfigError("float16 QDQ is for int8 / fp8 for TensorRT only; allowed: "
                          "target='tensorrt' with int8 or fp8")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"ONNX file {str(src)!r} does not exist")
    start = time.perf_counter()
    model = onnx.load(str(src))
    meta = _meta(model)
    if meta.get("vlcompress.quantize"):
        raise ConfigError(f"{src.name} is already quantized ({meta['vlcompress.quantize']})")
    if q == "fp16":
        if meta.get("vlcompress.precision") == "fp16":
            raise ConfigError(f"{src.name} is already fp16")
        out = convert_fp16(model)
        props = {**meta, "vlcompress.precision": "fp16"}
        res = QuantizeResult(dst, q, "cast", target)
    else:
        if meta.get("vlcompress.precision", "fp32") != "fp32":
            raise ConfigError(f"{q} quantization needs an fp32 ONNX; {src.name} is "
                              f"{meta.get('vlcompress.precision')}")
        out, res = _quantize_int(model, src, dst, q, calibration, method, target,
                                 quantize_activation_matmuls, tuple(op_types))
        props = {**meta}
        if float16:
            out = qdq_to_fp16(out)
            props["vlcompress.precision"] = "fp16"
    props.update({"vlcompress.quantize": q, "vlcompress.quantize_method": res.method,
                  "vlcompress.quantize_target": target})
    del out.metadata_props[:]
    onnx.helper.set_model_props(out, props)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(out, dst)
    res.quantized_nodes = _count_ops(out)
    if q != "fp16":
        op_of = {n.name: n.op_type for n in out.graph.node}
        for w in quantized_weights(out).values():
            op = op_of.get(w["node"], "?")
            res.quantized_layers[op] = res.quantized_layers.get(op, 0) + 1
    res.seconds = time.perf_counter() - start
    return res


def _quantize_int(model, src, dst, q, calibration, method, target, act_matmuls,
                  ops=INT8_OPS):
    import onnx
    from onnxruntime import quantization as oq

    bad = [o for o in ops if o not in INT8_OPS]
    if bad:
        raise ConfigError(f"op type {bad[0]!r} is not quantized; allowed: {', '.join(INT8_OPS)}")
    weights, activations = weight_matmuls(model, ops)
    include = weights + (activations if act_matmuls else [])
    float_ops = sorted({n.op_type for n in model.graph.node} - set(ops)
                       - {"QuantizeLinear", "DequantizeLinear"})
    if not act_matmuls and activations:
        float_ops = sorted(set(float_ops) | {"MatMul (activation x activation)"})
    work = Path(tempfile.mkdtemp(prefix=".vlc-quant-", dir=dst.parent if dst.parent.is_dir()
                                 else None))
    try:
        stage_in = work / "in.onnx"
        onnx.save_model(model, str(stage_in), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="in.onnx.data", size_threshold=1024)
        stage_out = work / "out.onnx"
        common = {"per_channel": True, "nodes_to_quantize": include,
                  "op_types_to_quantize": list(ops), "use_external_data_format": True}
        if method == "dynamic":
            oq.quantize_dynamic(stage_in, stage_out, weight_type=oq.QuantType.QInt8,
                                extra_options={"MatMulConstBOnly": not act_matmuls}, **common)
        else:
            if calibration is None:
                raise ConfigError(f"static {q} quantization needs calibration feeds")
            names = [i.name for i in model.graph.input
                     if i.name not in {t.name for t in model.graph.initializer}]
            feeds = list(calibration)
            if not feeds:
                raise ConfigError(f"static {q} quantization needs at least one calibration feed")
            if q == "fp8":
                wt = at = oq.QuantType.QFLOAT8E4M3FN
            elif target == "tensorrt":
                wt, at = oq.QuantType.QInt8, oq.QuantType.QInt8
            else:
                wt, at = oq.QuantType.QInt8, oq.QuantType.QUInt8
            extra = {"WeightSymmetric": True,
                     "ActivationSymmetric": target == "tensorrt",
                     "MatMulConstBOnly": not act_matmuls,
                     "OpTypesToExcludeOutputQuantization": list(INT8_OPS),
                     "DedicatedQDQPair": target == "tensorrt",
                     "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Gemm": 0}}
            try:
                oq.quantize_static(stage_in, stage_out, _Reader(feeds, names),
                                   quant_format=oq.QuantFormat.QDQ, weight_type=wt,
                                   activation_type=at,
                                   calibrate_method=(oq.CalibrationMethod.Distribution
                                                     if q == "fp8" else  # its only float8 one
                                                     oq.CalibrationMethod.MinMax),
                                   extra_options=extra, **common)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types
                msg = " ".join(str(exc).split())[:300]
                raise ExportError(f"{q} quantization of {src.name} failed: {msg}") from exc
        out = onnx.load(str(stage_out))
        if q == "fp8":  # ONNX Runtime calibrates float8 with Distribution only: MinMax here
            _set_fp8_minmax_scales(out, _minmax_amax(stage_in, feeds, names, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if method != "dynamic":
        out = _inputs_only(out, set(include))
    return out, QuantizeResult(dst, q, method, target, float_ops=float_ops)


#: largest finite float8e4m3fn value: an fp8 activation scale is max |x| / FP8_E4M3_MAX
FP8_E4M3_MAX = 448.0


def _minmax_amax(model_path: Path, feeds: list[dict], names: list[str], work: Path
                 ) -> dict[str, float]:
    """max |x| over the calibration feeds of every input of a MatMul/Gemm/Conv (ONNX Runtime's
    MinMax calibrator on the fp32 graph)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    cal = create_calibrator(model_path, list(INT8_OPS), augmented_model_path=str(work / "aug.onnx"),
                            calibrate_method=CalibrationMethod.MinMax,
                            use_external_data_format=True)
    cal.collect_data(_Reader(feeds, names))
    data = cal.compute_data()
    return {k: float(max(np.abs(np.asarray(r, dtype=np.float64)).max(initial=0.0)
                         for r in v.range_value)) for k, v in data.items()}


def _set_fp8_minmax_scales(model, amax: dict[str, float]) -> None:
    """Set each fp8 activation QuantizeLinear's scale (and its DequantizeLinear's) to
    ``max |x| / 448`` of the tensor it quantizes (MinMax, symmetric: zero point 0)."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or n.input[0] not in amax:
            continue
        a = amax[n.input[0]]
        scale = np.float32(a / FP8_E4M3_MAX if a > 0 else 1.0)
        names = {n.input[1]} | {d.input[1] for d in readers.get(n.output[0], ())
                                if d.op_type == "DequantizeLinear"}
        for name in names:
            t = inits[name]
            t.CopyFrom(numpy_helper.from_array(
                np.full(numpy_helper.to_array(t).shape, scale, dtype=np.float32), name))


def activation_qdq(model) -> dict[str, str]:
    """Activation Q/DQ pairs of a QDQ graph: DequantizeLinear output -> the float tensor its
    QuantizeLinear reads (weights, whose DequantizeLinear reads an initialiser, are not in it)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    pairs = {}
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] in inits:
            continue
        qn = producer.get(n.input[0])
        if qn is not None and qn.op_type == "QuantizeLinear":
            pairs[n.output[0]] = qn.input[0]
    return pairs


def _inputs_only(model, quantized: set[str]):
    """Keep activation Q/DQ only where a quantized layer (a node named in ``quantized``) reads
    it: every other reader reads the float tensor again, and the pairs nobody reads are dropped
    (ONNX Runtime's quantizer hands the dequantized copy to every reader of a quantized tensor
    and quantizes quantized nodes' outputs; see the module doc)."""
    g = model.graph
    pairs = activation_qdq(model)
    for n in g.node:
        if n.name in quantized:
            continue
        for i, x in enumerate(n.input):
            if x in pairs:
                n.input[i] = pairs[x]
    outputs = {o.name for o in g.output}
    while True:  # drop Q/DQ nodes whose outputs nobody reads
        read = {x for n in g.node for x in n.input} | outputs
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {x for n in g.node for x in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model


def qdq_to_fp16(model):
    """A QDQ graph with its float parts (activations, float weights, Q/DQ scales) in fp16
    (:func:`vlcompress.exporters.onnx.convert_fp16`); opset raised to 19 where lower."""
    from .onnx import convert_fp16

    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < 19:
            imp.version = 19
    return convert_fp16(model)


# --------------------------------------------------------------------------------------------
# reading a quantized graph back
# --------------------------------------------------------------------------------------------
def quantized_weights(model) -> dict[str, dict]:
    """Quantized weight initialisers of MatMul/Gemm/Conv nodes -> ``{"array", "input_axis",
    "scale", "zero_point", "axis", "node"}``: the int8 (fp8) array as stored, its input
    (reduction) axis, and the DequantizeLinear's scale, zero point and channel axis.
    Also reads dynamic quantization's ``MatMulInteger`` weights (scales there live in a Mul)."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    found: dict[str, dict] = {}

    def arr(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    for n in g.node:
        if n.op_type in ("MatMul", "Gemm"):
            attrs = {a.name: a.i for a in n.attribute}
            axis = 1 if (n.op_type == "Gemm" and attrs.get("transB")) else 0
            w = n.input[1] if len(n.input) > 1 else ""
        elif n.op_type == "MatMulInteger":
            found.setdefault(n.input[1], {"array": arr(n.input[1]), "input_axis": 0,
                                          "scale": None, "zero_point": arr(n.input[3])
                                          if len(n.input) > 3 and n.input[3] else None,
                                          "axis": 1, "node": n.name})
            continue
        elif n.op_type == "Conv":
            w, axis = n.input[1], 1
        else:
            continue
        dq = producer.get(w)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        dq_axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        found[dq.input[0]] = {"array": arr(dq.input[0]), "input_axis": axis,
                              "scale": arr(dq.input[1]),
                              "zero_point": arr(dq.input[2]) if len(dq.input) > 2 else None,
                              "axis": dq_axis, "node": n.name}
    return found


def check_nm_quantized(path: str | Path, n: int = 2, m: int = 4) -> list[str]:
    """Names of the quantized 2-D MatMul/Gemm weight initialisers that are NOT ``n:m`` along
    their input dimension (read from the int8/fp8 initialisers themselves: a weight counts as
    zero where it equals its zero point). Names are the float weights' (onnxruntime's
    ``_quantized`` suffix dropped), comparable with :func:`vlcompress.exporters.onnx.check_nm`
    on the source file."""
    import onnx

    from .onnx import is_nm

    model = onnx.load(str(path))
    bad = []
    for name, w in quantized_weights(model).items():
        a = w["array"]
        if a is None or a.ndim != 2:
            continue
        z = np.asarray(w["zero_point"]) if w["zero_point"] is not None else 0
        if w["zero_point"] is not None and np.asarray(z).ndim == 1 and np.asarray(z).size > 1:
            shape = [1, 1]
            shape[w["axis"] if w["axis"] is not None else 0] = -1
            z = np.asarray(z).reshape(shape)
        zero = (a.astype(np.float32) == np.asarray(z, dtype=np.float32))
        if not is_nm(~zero, w["input_axis"], n, m):
            bad.append(name[: -len("_quantized")] if name.endswith("_quantized") else name)
    return bad


__all__ = ["QUANTIZE", "QUANT_METHODS", "TARGETS", "INT8_OPS", "RUNTIME_QUANTIZE",
           "RUNTIME_TARGET", "QuantizeResult", "check_quantize", "check_quantize_runtime",
           "check_quantize_target", "quantize_target",
           "quantize_onnx",
           "quantized_weights", "check_nm_quantized", "weight_matmuls", "activation_qdq",
           "qdq_to_fp16", "DEVICE_REFUSED", "FP8_E4M3_MAX"]
