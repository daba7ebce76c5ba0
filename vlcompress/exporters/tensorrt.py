"""TensorRT engines from the fp16 ONNX of a tower, or from its explicit QDQ int8 / fp8 ONNX
(:func:`vlcompress.exporters.quantize.quantize_onnx` with ``target="tensorrt"``), with 2:4
sparse weights where pruned so.

    result = build_engine("out/pruned/vision.onnx", "out/engines/pruned/vision.engine",
                          sparse=True, batch_sizes=(1, 8, 64), timing_cache="out/engines/timing.cache")
    result.sparsity.sparse      # layers TensorRT gave a sparse implementation
    result.warnings             # e.g. "2:4 build in which no layer got a sparse implementation"

TensorRT (10.x / 11.x Python API) is imported lazily (:func:`vlcompress.optional_deps.require_tensorrt`);
everything that does not need it is pure and tested on CPU:

- :func:`plan_build` reads the ONNX inputs and computes a :class:`BuildPlan`: network flags
  (strongly typed), builder flags (``SPARSE_WEIGHTS`` for 2:4), the workspace limit and one
  optimisation profile per batch size, ``(min = 1, opt = that batch, max = the largest)`` for
  every dynamic input (:func:`profile_batch_range`), so each batch runs tactics chosen for it
  (the runner picks the profile: :func:`vlcompress.runtime.trt_runner.select_profile`) and
  every batch a Triton dynamic batcher may form (1..``max_batch_size``) runs;
- :func:`apply_plan` applies a plan to a builder config (tested on a recording fake);
- :func:`parse_sparsity_log` reads the two ``(Sparsity)`` lines TensorRT logs at INFO level;
- :func:`onnx_quantization` tells an explicit QDQ file (``"int8"`` / ``"fp8"``: every weight
  of a MatMul/Gemm/Conv fed by a ``DequantizeLinear`` of an INT8 / FLOAT8E4M3FN initialiser);
  :func:`onnx_inputs` reports that as the file's precision;
- :func:`nm_violations` is the 2:4 check of the initialisers TensorRT will see: the fp16 ones,
  or, for a QDQ file, the quantized ones (:func:`..quantize.check_nm_quantized`);
- :func:`embedding_agreement` is the fp16 check: tolerance AND per-row cosine similarity.

TensorRT API facts this module relies on (checked against NVIDIA's Python API reference,
docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/):

- ``Builder(logger).create_network(flags)``; ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``
  is deprecated and ignored since TensorRT 10 ("networks are always explicit batch");
  ``STRONGLY_TYPED`` exists since 9/10 and, in TensorRT 11, is deprecated because strongly
  typed mode is always on (Builder.html of 10.x and 11.0). A strongly typed network takes its
  precisions from the ONNX, so the ONNX must already be fp16 (:func:`..onnx.convert_fp16`);
  ``BuilderFlag.FP16`` is not allowed with it and is gone in TensorRT 11.
- ``OnnxParser(network, logger).parse_from_file(path)`` (keeps the folder for external
  weights); errors via ``parser.num_errors`` / ``parser.get_error(i)``.
- ``config.set_flag(BuilderFlag.SPARSE_WEIGHTS)`` == ``trtexec --sparsity=enable``
  (NVIDIA/TensorRT#4030); ``config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``.
- ``profile = builder.create_optimization_profile(); profile.set_shape(name, min, opt, max);
  config.add_optimization_profile(profile)`` - needed for every input with a -1 dimension;
  several profiles are allowed, TensorRT tunes tactics (the sparse-or-dense choice included)
  for each profile's ``opt`` shapes; at run time ``context.set_optimization_profile_async(i,
  stream)`` selects one and ``engine.get_tensor_profile_shape(name, i)`` reads it back.
- ``config.create_timing_cache(bytes)`` + ``config.set_timing_cache(cache, ignore_mismatch)``;
  after the build ``config.get_timing_cache().serialize()`` (TimingCache.html).
- ``builder.build_serialized_network(network, config)`` returns ``IHostMemory`` or None.
- A logger is a ``trt.ILogger`` subclass that calls ``trt.ILogger.__init__(self)`` and
  implements ``log(severity, msg)`` (Logger.html).
- With sparse weights enabled TensorRT logs, at INFO, ``(Sparsity) Layers eligible for sparse
  math: A, B + C, ...`` and ``(Sparsity) TRT inference plan picked sparse implementation for
  layers: ...`` (trtexec prints them as ``[I] [TRT] (Sparsity) ...``; NVIDIA/TensorRT#1403,
  #2169, #2271, #4054, #4056, pytorch/TensorRT#1340). The second list may be empty: TensorRT
  times sparse and dense kernels and keeps the faster (NVIDIA/TensorRT#2169, a maintainer).
- Explicit quantization ("Explicit Quantization" and "Working with Quantized Types" in the
  TensorRT 10.x / 11.x developer guide): when the network holds Q/DQ layers TensorRT builds it
  with explicit quantization, and "use explicit quantization with strong typing: precision
  control build flags are not required and should not be specified". A strongly typed network
  takes every tensor's type from the graph, so the int8 / fp8 layers are exactly those between
  the Q/DQ nodes and everything else runs in the float type of the ONNX (fp32 for the QDQ files
  :func:`..quantize.quantize_onnx` writes: LayerNorm, Softmax, the attention MatMuls). Weights
  may be stored quantized (INT8 / FP8) with a ``DequantizeLinear`` between them and the layer;
  quantization is symmetric (zero points 0), so a 2:4 weight stays 2:4 in its int8 / fp8
  initialiser. ``SPARSE_WEIGHTS`` is not a precision flag and is set as for fp16.
  FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper and newer).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..errors import ConfigError, ExportError, OutputError

__all__ = [
    "SparsityReport", "parse_sparsity_log", "InputSpec", "BuildPlan", "plan_build", "profile_batch_range",
    "onnx_inputs", "apply_plan", "network_flags", "EngineBuildResult", "build_engine",
    "nm_violations", "embedding_agreement", "trt_major", "make_logger",
    "sparsity_warnings", "onnx_quantization", "QUANTIZED_PRECISIONS",
]

log = logging.getLogger(__name__)

#: Default builder workspace (GiB).
DEFAULT_WORKSPACE_GB = 4.0
NO_SPARSE_WARNING = ("2:4 build in which no layer got a sparse implementation: SPARSE_WEIGHTS "
                     "bought nothing (TensorRT found dense kernels faster, or no weight was 2:4)")
#: ONNX weight precisions of an explicit QDQ file (TensorRT builds them strongly typed)
QUANTIZED_PRECISIONS = ("int8", "fp8")
NOT_ELIGIBLE_WARNING = ("2:4 build in which TensorRT found no layer eligible for sparse math: "
                        "the weights it sees are not 2:4 along their input dimension")


# --------------------------------------------------------------------------------------------
# the builder log
# --------------------------------------------------------------------------------------------
@dataclass
class SparsityReport:
    """What TensorRT said about sparse math in one build.

    ``found`` is False when the log has neither ``(Sparsity)`` line (sparse weights not
    enabled, or a log captured below INFO).
    """

    eligible: list[str] = field(default_factory=list)
    sparse: list[str] = field(default_factory=list)
    found: bool = False

    @property
    def n_eligible(self) -> int:
        return len(self.eligible)

    @property
    def n_sparse(self) -> int:
        return len(self.sparse)

    def to_dict(self) -> dict:
        return {"eligible": list(self.eligible), "sparse": list(self.sparse),
                "n_eligible": self.n_eligible, "n_sparse": self.n_sparse, "found": self.found}


_ELIGIBLE_RE = re.compile(r"\(Sparsity\)\s*Layers eligible for sparse math:(.*)$")
_PICKED_RE = re.compile(r"\(Sparsity\)\s*TRT inference plan picked sparse implementation "
                        r"for layers:(.*)$")


def _split_layers(text: str) -> list[str]:
    """``"A, B + C, {ForeignNode[x...y]}"`` -> names; commas inside brackets do not split."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def parse_sparsity_log(text: str | Iterable[str]) -> SparsityReport:
    """Parse the ``(Sparsity)`` lines of a TensorRT builder log (any prefix: ``[I] [TRT]``,
    ``[TensorRT] INFO:``, a timestamp, or none). Repeated lines (one build per profile or a
    re-run) are merged, keeping first-seen order without duplicates."""
    lines = text.splitlines() if isinstance(text, str) else [str(x) for x in text]
    rep = SparsityReport()
    for line in lines:
        line = line.rstrip()
        for rx, dest in ((_ELIGIBLE_RE, rep.eligible), (_PICKED_RE, rep.sparse)):
            m = rx.search(line)
            if m:
                rep.found = True
                for name in _split_layers(m.group(1)):
                    if name not in dest:
                        dest.append(name)
    return rep


def sparsity_warnings(report: SparsityReport, sparse: bool) -> list[str]:
    """The loud messages for a 2:4 build that bought nothing (empty for dense builds)."""
    if not sparse:
        return []
    if not report.found:
        return ["2:4 build, but TensorRT logged no (Sparsity) lines: cannot tell whether any "
                "layer got a sparse implementation (was the log captured at INFO?)"]
    if report.n_eligible == 0:
        return [NOT_ELIGIBLE_WARNING]
    if report.n_sparse == 0:
        return [NO_SPARSE_WARNING + f" ({report.n_eligible} layers were eligible)"]
    return []


def make_logger(trt, sink: Callable[[str, str], None], min_severity=None):
    """A ``trt.ILogger`` subclass instance passing ``(severity name, message)`` to ``sink``.

    Messages below ``min_severity`` (default INFO: the sparsity lines are INFO) are dropped.
    """
    sev = trt.ILogger.Severity
    order = [sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING, sev.INFO, sev.VERBOSE]
    limit = order.index(min_severity if min_severity is not None else sev.INFO)

    class _CaptureLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)  # required by the pybind11 base (Logger.html)

        def log(self, severity, msg):
            try:
                rank = order.index(severity)
            except ValueError:
                rank = 0
            if rank <= limit:
                sink(getattr(severity, "name", str(severity)), str(msg))

    return _CaptureLogger()


# --------------------------------------------------------------------------------------------
# the build plan (pure)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """One ONNX graph input: ``shape`` entries are ints, or None for a dynamic dimension;
    ``dims`` names the dynamic ones (ONNX ``dim_param``, e.g. ``"batch"``)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    dims: tuple[str | None, ...] = ()

    @property
    def dynamic(self) -> bool:
        return any(d is None for d in self.shape)


@dataclass(frozen=True)
class BuildPlan:
    """Everything a TensorRT build is configured with, computed before TensorRT is touched."""

    onnx_path: str
    inputs: tuple[InputSpec, ...]
    #: one optimisation profile per batch size (input name -> (min, opt, max) shapes)
    profiles: tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], ...]
    sparse: bool
    strongly_typed: bool
    fp16_flag: bool
    workspace_bytes: int
    precision: str  # of the ONNX weights: "fp16", "fp32", "mixed", or QDQ "int8" / "fp8"
    batch_sizes: tuple[int, ...]
    #: "int8" / "fp8" for explicit QDQ ONNX (types from its Q/DQ nodes), else "none"
    quantize: str = "none"

    @property
    def builder_flags(self) -> tuple[str, ...]:
        flags = []
        if self.sparse:
            flags.append("SPARSE_WEIGHTS")
        if self.fp16_flag:
            flags.append("FP16")
        return tuple(flags)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inputs"] = [asdict(i) for i in self.inputs]
        d["profiles"] = [{k: [list(s) for s in v] for k, v in p.items()} for p in self.profiles]
        d["builder_flags"] = list(self.builder_flags)
        return d


_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64",
                6: "int32", 9: "bool"}
#: quantized initialiser types of a QDQ weight (TensorProto.INT8, FLOAT8E4M3FN)
_QDQ_WEIGHT_TYPES = {3: "int8", 17: "fp8"}


def _qdq_weight_types(graph) -> set[str]:
    """``"int8"`` / ``"fp8"`` for each MatMul/Gemm/Conv whose weight (second input) is the
    output of a ``DequantizeLinear`` reading an INT8 / FLOAT8E4M3FN initialiser."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    found = set()
    for n in graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv") or len(n.input) < 2:
            continue
        dq = producer.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not dq.input:
            continue
        t = inits.get(dq.input[0])
        if t is not None and t.data_type in _QDQ_WEIGHT_TYPES:
            found.add(_QDQ_WEIGHT_TYPES[t.data_type])
    return found


def onnx_quantization(path: str | Path) -> str:
    """``"int8"`` / ``"fp8"`` when the ONNX file at ``path`` is explicit QDQ (its weights are
    INT8 / FLOAT8E4M3FN initialisers behind ``DequantizeLinear``), ``"mixed"`` when it holds
    both, else ``"none"``. Read from the graph, not from the metadata."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OutputError(f"ONNX file {str(path)!r} does not exist")
    return _quantization(onnx.load(str(path), load_external_data=False).graph)


def _quantization(graph) -> str:
    kinds = _qdq_weight_types(graph)
    return "none" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


def onnx_inputs(path: str | Path) -> tuple[list[InputSpec], str]:
    """The graph inputs of the ONNX file at ``path`` (initialisers excluded) and the precision
    of its MatMul/Gemm/Conv weights: ``"int8"`` / ``"fp8"`` for explicit QDQ weights
    (:func:`onnx_quantization`; ``"mixed"`` for both), else of its float weights (``"fp16"``,
    ``"fp32"``, ``"mixed"`` or ``"none"``). External weight data is not read."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OutputError(f"ONNX file {str(path)!r} does not exist")
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    specs = []
    for i in g.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape, dims = [], []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
                dims.append(None)
            else:
                shape.append(None)
                dims.append(d.dim_param or None)
        specs.append(InputSpec(i.name, tuple(shape), _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)),
                               tuple(dims)))
    quant = _quantization(g)
    if quant != "none":
        return specs, quant
    types = set()
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm", "Conv"):
            for x in n.input[1:2]:
                t = inits.get(x)
                if t is not None and t.data_type in (1, 10, 16):
                    types.add(t.data_type)
    # weights behind a Cast (fp16 conversion keeps fp32 only for ops it protects) count too
    precision = ("none" if not types else "fp16" if types == {10} else "fp32" if types == {1}
                 else "mixed")
    if precision == "none":
        floats = {t.data_type for t in g.initializer if t.data_type in (1, 10) and len(t.dims) == 2}
        precision = "fp16" if floats == {10} else "fp32" if floats == {1} else (
            "mixed" if floats else "none")
    return specs, precision


def profile_batch_range(batch_sizes: Sequence[int]) -> tuple[int, int]:
    """``(min, max)`` batch every optimisation profile of an engine built for ``batch_sizes``
    accepts: ``(1, max(batch_sizes))``. The minimum is 1 whatever was measured: a run timed at
    batch 8 alone still serves single requests, and Triton's dynamic batcher forms any batch
    from 1 to ``max_batch_size`` (:mod:`.triton` writes ``max_batch_size`` = this maximum, so
    the config and the engine agree)."""
    try:
        bs = sorted(set(int(b) for b in batch_sizes))
    except (TypeError, ValueError):
        bs = []
    if not bs or bs[0] < 1:
        raise ConfigError(f"batch sizes {tuple(batch_sizes)!r} are not valid; need positive integers")
    return 1, bs[-1]


def _batch_ranges(batch_sizes: Sequence[int], per_batch: bool) -> list[tuple[int, int, int]]:
    """``(min, opt, max)`` batch of each profile: one per batch size with opt = that batch, or
    one with opt = the largest batch; every profile spans :func:`profile_batch_range`, so any
    of them runs any batch from 1 to the largest."""
    lo, hi = profile_batch_range(batch_sizes)
    bs = sorted(set(int(b) for b in batch_sizes))
    opts = bs if per_batch else [hi]
    return [(lo, o, hi) for o in opts]


def plan_build(onnx_path: str | Path, *, sparse: bool, batch_sizes: Sequence[int],
               seq_len: int | None = None, workspace_gb: float = DEFAULT_WORKSPACE_GB,
               strongly_typed: bool = True, per_batch_profiles: bool = True,
               inputs: Sequence[InputSpec] | None = None, precision: str | None = None
               ) -> BuildPlan:
    """The :class:`BuildPlan` for ``onnx_path``.

    One optimisation profile per batch size ``b``: dynamic dimension 0 (or any named
    ``batch``) gets ``(min, opt, max)`` = ``(1, b, max(batch_sizes))`` (min 1 whatever was
    measured: :func:`profile_batch_range`).
    TensorRT chooses its tactics (and, for 2:4, sparse or dense kernels) for ``opt``, so a
    single profile tuned for the largest batch would run every other batch on tactics chosen
    for that one; the price is build time, which grows with the number of profiles
    (``per_batch_profiles=False``: one profile, opt = the largest batch). Any other
    dynamic dimension is a text sequence: ``(1, seq_len, seq_len)`` with ``seq_len`` the
    tokenizer's maximum length; without ``seq_len`` it is a :class:`ConfigError`.
    ``strongly_typed`` needs fp16 weights in the ONNX (else :class:`ConfigError`: convert it
    with :func:`vlcompress.exporters.onnx.convert_fp16`); without it the ``FP16`` flag is set.

    Explicit QDQ ONNX (precision ``"int8"`` / ``"fp8"``, :func:`onnx_quantization`) is built
    strongly typed: the types come from its Q/DQ nodes, no precision flag is set (TensorRT
    does not allow them with strong typing), ``SPARSE_WEIGHTS`` is, for 2:4; the plan records
    ``quantize``. ``strongly_typed=False`` with QDQ ONNX is a :class:`ConfigError`.
    """
    if workspace_gb <= 0:
        raise ConfigError(f"workspace {workspace_gb!r} GiB is not valid; need a positive number")
    if inputs is None or precision is None:
        found, prec = onnx_inputs(onnx_path)
        inputs = found if inputs is None else inputs
        precision = prec if precision is None else precision
    quantize = precision if precision in QUANTIZED_PRECISIONS else "none"
    if quantize != "none" and not strongly_typed:
        raise ConfigError(
            f"{Path(onnx_path).name} is explicit QDQ {quantize}; TensorRT builds it strongly "
            "typed (precisions from its Q/DQ nodes), not with precision flags: "
            "strongly_typed=True")
    if strongly_typed and precision in ("fp32", "mixed"):
        raise ConfigError(
            f"{Path(onnx_path).name} has {precision} weights; a strongly typed TensorRT network "
            "runs them in that precision: export with fp16=True (or convert_fp16) first")
    ranges = _batch_ranges(batch_sizes, per_batch_profiles)
    profiles = tuple(_profile(inputs, b, seq_len) for b in ranges)
    return BuildPlan(
        onnx_path=str(onnx_path), inputs=tuple(inputs), profiles=profiles, sparse=bool(sparse),
        strongly_typed=bool(strongly_typed), fp16_flag=not strongly_typed,
        workspace_bytes=int(workspace_gb * (1 << 30)), precision=precision,
        batch_sizes=tuple(sorted(set(int(x) for x in batch_sizes))), quantize=quantize,
    )


def _profile(inputs: Sequence[InputSpec], b: tuple[int, int, int], seq_len: int | None) -> dict:
    """One profile: ``(min, opt, max)`` shapes of every dynamic input for batch range ``b``."""
    profile: dict = {}
    for spec in inputs:
        if not spec.dynamic:
            continue
        lo, op, hi = [], [], []
        for ax, (d, name) in enumerate(zip(spec.shape, spec.dims or (None,) * len(spec.shape),
                                           strict=True)):
            if d is not None:
                lo.append(d)
                op.append(d)
                hi.append(d)
            elif ax == 0 or (name or "").lower() == "batch":
                lo.append(b[0])
                op.append(b[1])
                hi.append(b[2])
            else:
                if not seq_len or seq_len < 1:
                    raise ConfigError(
                        f"input {spec.name!r} has a dynamic dimension {ax} ({name or 'unnamed'}) "
                        "other than the batch: give seq_len (the tokenizer's maximum length)")
                lo.append(1)
                op.append(int(seq_len))
                hi.append(int(seq_len))
        profile[spec.name] = (tuple(lo), tuple(op), tuple(hi))
    return profile


def trt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        return 0


def network_flags(trt, strongly_typed: bool) -> int:
    """``create_network`` flags: STRONGLY_TYPED on TensorRT 10 (on 11 it is always on and the
    flag is deprecated, so 0); EXPLICIT_BATCH never (ignored since 10)."""
    if not strongly_typed or trt_major(trt) >= 11:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise ExportError(f"TensorRT {trt.__version__} has no strongly typed networks; "
                          "vlcompress needs TensorRT >= 10")
    return 1 << int(flag)


def apply_plan(plan: BuildPlan, trt, builder, config) -> None:
    """Configure ``config`` (an ``IBuilderConfig`` of ``builder``) from ``plan``: workspace
    limit, builder flags, the optimisation profiles (one per batch size) in plan order."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.builder_flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise ExportError(f"TensorRT {getattr(trt, '__version__', '?')} has no builder flag "
                              f"{name}")
        config.set_flag(flag)
    for shapes in plan.profiles:
        if not shapes:
            continue
        profile = builder.create_optimization_profile()
        for name, (lo, op, hi) in shapes.items():
            profile.set_shape(name, lo, op, hi)
        config.add_optimization_profile(profile)


# --------------------------------------------------------------------------------------------
# checks on the ONNX TensorRT will see (pure)
# --------------------------------------------------------------------------------------------
def nm_violations(onnx_path: str | Path, pruned: Iterable[str] | None = None, n: int = 2,
                  m: int = 4, quantize: str | None = None) -> list[str]:
    """Pruned weights of the (fp16, or QDQ int8 / fp8) ONNX at ``onnx_path`` that are NOT
    ``n:m`` along their input dimension, as TensorRT will see them.

    ``quantize``: ``"int8"`` / ``"fp8"`` reads the quantized initialisers
    (:func:`vlcompress.exporters.quantize.check_nm_quantized`: a weight is zero where it equals
    its zero point); None: :func:`onnx_quantization` of the file decides.

    ``pruned``: the PyTorch parameter names of the pruned layers (``<layer>.weight``, or the
    layer names); None checks every MatMul/Gemm weight. fp16 rounding can turn tiny nonzeros
    into zeros (underflow below 2**-24) but never a zero into a nonzero, so a 2:4 fp32 weight
    stays 2:4; a violation here means the export changed the weights (or they were not 2:4).
    """
    from .onnx import check_nm
    from .quantize import check_nm_quantized

    if quantize is None:
        quantize = onnx_quantization(onnx_path)
    bad = check_nm_quantized(onnx_path, n, m) if quantize != "none" else check_nm(onnx_path, n, m)
    if pruned is None:
        return bad
    want = set()
    for p in pruned:
        want.add(p)
        want.add(p if p.endswith(".weight") else p + ".weight")
    return [b for b in bad if b in want]


def embedding_agreement(out, ref, *, atol: float, rtol: float, min_cosine: float | None
                        ) -> dict:
    """Compare an embedding batch to its reference: ``ok`` needs ``|out - ref| <= atol + rtol
    |ref|`` everywhere AND every row's cosine similarity >= ``min_cosine`` (if given). The
    cosine check catches drift that an absolute tolerance lets through on small embeddings."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return {"ok": False, "max_abs_diff": float("inf"), "min_cosine": float("nan"),
                "within_tolerance": False, "cosine_ok": False,
                "error": f"shape {list(out.shape)} != reference {list(ref.shape)}"}
    a, b = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    cos = (a * b).sum(1) / denom
    min_cos = float(cos.min()) if cos.size else 1.0
    finite = bool(np.isfinite(out).all())
    within = bool(finite and np.allclose(out, ref, atol=atol, rtol=rtol))
    cos_ok = bool(finite and (min_cosine is None or min_cos >= min_cosine))
    return {"ok": within and cos_ok, "max_abs_diff": float(np.abs(out - ref).max()) if out.size
            else 0.0, "min_cosine": min_cos, "within_tolerance": within, "cosine_ok": cos_ok,
            "atol": atol, "rtol": rtol, "min_cosine_required": min_cosine}


# --------------------------------------------------------------------------------------------
# the build (needs TensorRT and a GPU)
# --------------------------------------------------------------------------------------------
@dataclass
class EngineBuildResult:
    """What :func:`build_engine` wrote and what TensorRT said about sparsity."""

    engine_path: Path
    plan: BuildPlan
    sparsity: SparsityReport
    warnings: list[str]
    seconds: float
    trt_version: str
    timing_cache: Path | None = None
    timing_cache_reused: bool = False
    nm_violations: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    validation: dict | None = None

    @property
    def quantize(self) -> str:
        """``"int8"`` / ``"fp8"`` for an engine built from explicit QDQ ONNX, else ``"none"``."""
        return self.plan.quantize

    def to_dict(self) -> dict:
        return {"engine_path": str(self.engine_path), "quantize": self.quantize,
                "plan": self.plan.to_dict(),
                "sparsity": self.sparsity.to_dict(), "warnings": list(self.warnings),
                "seconds": self.seconds, "trt_version": self.trt_version,
                "timing_cache": str(self.timing_cache) if self.timing_cache else None,
                "timing_cache_reused": self.timing_cache_reused,
                "nm_violations": list(self.nm_violations), "validation": self.validation}


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, sparse: bool,
                 batch_sizes: Sequence[int], timing_cache: str | Path | None = None,
                 workspace_gb: float = DEFAULT_WORKSPACE_GB, seq_len: int | None = None,
                 pruned: Iterable[str] | None = None, per_batch_profiles: bool = True,
                 log: Callable[[str, str], None] | None = None) -> EngineBuildResult:
    """Build a TensorRT engine from the fp16 ONNX at ``onnx_path``, or from its explicit QDQ
    int8 / fp8 ONNX (strongly typed either way, :func:`plan_build`); write it atomically.

    ``sparse`` enables ``SPARSE_WEIGHTS`` (2:4) and first checks, before TensorRT or the GPU is
    touched, that the pruned weights the ONNX holds are 2:4 (:func:`nm_violations`: the
    quantized initialisers of a QDQ file): a pruned weight that is not is an
    :class:`ExportError` naming it (TensorRT would silently give it dense kernels).
    ``result.quantize`` says whether the engine is int8 / fp8. The builder log
    (INFO and above) goes to ``log(severity, message)`` if given and is parsed for the
    sparsity lines; a 2:4 build in which no layer got a sparse implementation is logged as a
    warning and listed in ``result.warnings``. ``timing_cache`` is read if it exists and
    written back (atomically) after the build.
    """
    from ..optional_deps import require_cuda, require_tensorrt

    plan = plan_build(onnx_path, sparse=sparse, batch_sizes=batch_sizes, seq_len=seq_len,
                      workspace_gb=workspace_gb, strongly_typed=True,
                      per_batch_profiles=per_batch_profiles)
    violations = nm_violations(onnx_path, pruned, quantize=plan.quantize) if sparse else []
    if violations:  # checked before the build: a 2:4 build of non-2:4 weights is refused
        kind = "fp16" if plan.quantize == "none" else f"{plan.quantize} QDQ"
        raise ExportError(f"{len(violations)} pruned weight(s) are not 2:4 in the {kind} ONNX "
                          f"{Path(onnx_path).name} (e.g. {violations[0]}); a 2:4 engine needs "
                          "them 2:4: re-export the pruned model, or build without 2:4")
    require_cuda()
    trt = require_tensorrt()
    engine_path = Path(engine_path)
    if engine_path.is_dir():
        raise OutputError(f"cannot write engine {str(engine_path)!r}: a folder of that name exists")
    lines: list[str] = []

    def sink(sev: str, msg: str) -> None:
        lines.append(f"[{sev}] {msg}")
        if log is not None:
            log(sev, msg)

    start = time.perf_counter()
    logger = make_logger(trt, sink)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan.strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT cannot parse {Path(onnx_path).name}: "
                          + "; ".join(" ".join(e.split()) for e in errs[:3]))
    config = builder.create_builder_config()
    apply_plan(plan, trt, builder, config)
    cache_path = Path(timing_cache) if timing_cache else None
    reused = False
    if cache_path is not None:
        data = cache_path.read_bytes() if cache_path.is_file() else b""
        try:  # a cache of another TensorRT version or GPU is refused: start a fresh one
            reused = bool(data) and bool(config.set_timing_cache(
                config.create_timing_cache(data), ignore_mismatch=False))
        except Exception:  # noqa: BLE001 - pybind raises RuntimeError/TypeError on bad data
            reused = False
        if not reused:
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        tail = " | ".join(x for x in lines[-5:] if x.startswith(("[ERROR]", "[INTERNAL_ERROR]")))
        raise ExportError(f"TensorRT failed to build an engine from {Path(onnx_path).name}"
                          + (f": {tail}" if tail else ""))
    atomic_write_bytes(engine_path, bytes(memoryview(serialized)), fsync=False)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())),
                           fsync=False)
    seconds = time.perf_counter() - start
    report = parse_sparsity_log(lines)
    warns = sparsity_warnings(report, sparse)
    for w in warns:
        log_warning(f"{engine_path.name}: {w}")
    return EngineBuildResult(engine_path=engine_path, plan=plan, sparsity=report, warnings=warns,
                             seconds=seconds, trt_version=str(trt.__version__),
                             timing_cache=cache_path, timing_cache_reused=reused,
                             nm_violations=violations, log_tail=lines[-20:])


def log_warning(msg: str) -> None:
    log.warning(msg)
