"""A runner for a serialized TensorRT engine (TensorRT 10+ name-based I/O API).

    with TrtRunner("out/engines/pruned/vision.engine") as r:
        out = r.infer({"pixel_values": x})

Device memory comes from torch CUDA tensors (no pycuda, no cuda-python): inputs are copied to
the GPU once per feed array and cached, outputs are allocated per input shape and cached, so a
timed call is ``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on a torch
CUDA stream and nothing else. ``copy_outputs=False`` returns the output tensors on the GPU,
with the caller's current stream made to wait for the engine's (so work queued on it after
the call sees finished outputs, with no host synchronisation).

An engine holds one optimisation profile per batch size (opt = that batch,
:func:`vlcompress.exporters.tensorrt.plan_build`); each call runs on the profile tuned for its
batch (:func:`select_profile`), switched with
``set_optimization_profile_async`` only when the batch changes.

API used (TensorRT Python reference, ICudaEngine / IExecutionContext pages):
``Runtime(logger).deserialize_cuda_engine(bytes)``; ``engine.num_io_tensors``,
``get_tensor_name(i)``, ``get_tensor_mode(name)`` (``TensorIOMode.INPUT``/``OUTPUT``),
``get_tensor_dtype(name)``; ``engine.create_execution_context()``;
``context.set_input_shape(name, shape)``, then ``context.get_tensor_shape(name)`` gives the
output shapes for those inputs; ``context.set_tensor_address(name, int pointer)``;
``context.execute_async_v3(stream_handle)`` returns False on failure;
``engine.num_optimization_profiles``, ``engine.get_tensor_profile_shape(name, i)`` (min, opt,
max), ``context.set_optimization_profile_async(i, stream_handle)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import ExportError, ModelError
from ..exporters.tensorrt import (
    DEFAULT_WORKSPACE_GB,
    QUANTIZED_PRECISIONS,
    EngineBuildResult,
    build_engine,
    embedding_agreement,
    onnx_inputs,
)
from ..optional_deps import require_cuda, require_tensorrt
from .base import Runner
from .registry import ENGINE, Built, register
from .registry import Runtime as _Runtime

__all__ = ["TrtRunner", "torch_dtype", "profile_opt_batches", "select_profile",
           "validate_engine", "build_tower_engines", "check_qdq_onnx", "check_tensorrt_fp8",
           "VALIDATION_TOLERANCES"]


def torch_dtype(trt, dtype):
    """The torch dtype of a TensorRT ``DataType``."""
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
             "INT32": torch.int32, "INT64": torch.int64, "INT8": torch.int8, "BOOL": torch.bool,
             "UINT8": torch.uint8}
    name = getattr(dtype, "name", str(dtype).split(".")[-1])
    if name not in table:
        raise ModelError(f"TensorRT tensor type {name} is not supported by the runner")
    return table[name]


class TrtRunner(Runner):
    """Runs a TensorRT engine file on ``cuda:<device index>``.

    ``infer`` takes numpy arrays (or CUDA tensors), casts them to the engine's input types
    (so fp32 feeds work with fp16 inputs) and returns ``{output name: array}`` (fp16 outputs
    as float32), or the GPU tensors with ``copy_outputs=False``. ``precision`` is what
    :meth:`describe` reports: ``fp16``, or ``int8`` / ``fp8`` for an engine built from QDQ ONNX.
    """

    runtime = "tensorrt"

    def describe(self) -> dict:
        import tensorrt as trt  # activated: it imported

        return {"provider": f"TensorRT {trt.__version__}", "precision": self.precision}

    def __init__(self, engine_path: str | Path, name: str | None = None, device: str = "cuda",
                 copy_outputs: bool = True, precision: str = "fp16"):
        super().__init__(name or f"tensorrt-{Path(engine_path).stem}", device)
        self.engine_path = Path(engine_path)
        self.precision = precision
        self.copy_outputs = copy_outputs
        self.engine = None
        self.context = None
        self.stream = None
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    # --- lifecycle -------------------------------------------------------------------------
    def _activate(self) -> None:
        torch = require_cuda()
        trt = require_tensorrt()
        if not self.engine_path.is_file():
            raise ModelError(f"TensorRT engine {str(self.engine_path)!r} does not exist")
        self._trt = trt
        self._dev = torch.device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the engine
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise ModelError(f"TensorRT cannot load {str(self.engine_path)!r} (built by another "
                             "TensorRT version or for another GPU?)")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names
                            if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names
                             if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream(device=self._dev)
        self.profile_batches = profile_opt_batches(engine, self.input_names)
        self.profile_index = 0  # a fresh context starts on profile 0
        self._inputs: dict[int, tuple[object, object]] = {}
        self._outputs: dict[tuple, dict[str, object]] = {}

    def _deactivate(self) -> None:
        self.context = None
        self.engine = None
        self._runtime = None
        self._inputs = {}
        self._outputs = {}
        self.stream = None

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    # --- inference ---------------------------------------------------------------------------
    def _device_input(self, name: str, arr):
        import torch

        key = id(arr)
        hit = self._inputs.get(key)
        if hit is not None and hit[0] is arr:
            return hit[1]
        t = arr if isinstance(arr, torch.Tensor) else torch.as_tensor(np.asarray(arr))
        t = t.to(self._dev, self._dtypes[name]).contiguous()
        self._inputs[key] = (arr, t)  # keeps arr alive, so its id is not reused
        return t

    def _infer(self, feed):
        import torch

        try:
            tensors = {n: self._device_input(n, feed[n]) for n in self.input_names}
        except KeyError as exc:
            raise KeyError(f"feed lacks input {exc.args[0]!r} for {self.engine_path.name} "
                           f"(inputs: {', '.join(self.input_names)})") from None
        ctx = self.context
        shape_key = tuple(tuple(t.shape) for t in tensors.values())
        # inputs were written on torch's current stream: order the engine after them
        caller = torch.cuda.current_stream(self._dev)
        self.stream.wait_stream(caller)
        if len(self.profile_batches) > 1 and tensors:
            want = select_profile(self.profile_batches, int(next(iter(tensors.values())).shape[0]))
            if want != self.profile_index:
                if not ctx.set_optimization_profile_async(want, self.stream.cuda_stream):
                    raise ModelError(f"{self.engine_path.name}: cannot select optimisation "
                                     f"profile {want}")
                self.profile_index = want
        for n, t in tensors.items():
            if not ctx.set_input_shape(n, tuple(t.shape)):
                raise ModelError(f"{self.engine_path.name}: input {n} shape {tuple(t.shape)} is "
                                 "outside the engine's optimisation profile")
            ctx.set_tensor_address(n, t.data_ptr())
        outs = self._outputs.get(shape_key)
        if outs is None:
            outs = {n: torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=self._dtypes[n],
                                   device=self._dev) for n in self.output_names}
            self._outputs[shape_key] = outs
        for n, t in outs.items():
            ctx.set_tensor_address(n, t.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise ModelError(f"TensorRT failed to run {self.engine_path.name}")
        if not self.copy_outputs:
            caller.wait_stream(self.stream)  # the caller's later work sees finished outputs
            return dict(outs)
        self.stream.synchronize()
        res = {}
        for n, t in outs.items():
            a = t.detach().cpu().numpy()
            res[n] = a.astype(np.float32) if a.dtype == np.float16 else a
        return res


def select_profile(opt_batches: Sequence[int], batch: int) -> int:
    """Index of the profile to run ``batch`` on: the one tuned for it (opt == batch), else
    the one with the smallest opt above it, else the one with the largest opt."""
    if not opt_batches:
        raise ValueError("an engine has at least one optimisation profile")
    exact = [i for i, o in enumerate(opt_batches) if o == batch]
    if exact:
        return exact[0]
    above = [(o, i) for i, o in enumerate(opt_batches) if o > batch]
    return min(above)[1] if above else max((o, i) for i, o in enumerate(opt_batches))[1]


def profile_opt_batches(engine, input_names) -> list[int]:
    """The opt batch of each optimisation profile of ``engine`` (dimension 0 of its first
    input's opt shape); ``[]`` for an engine without inputs."""
    if not input_names:
        return []
    n = int(getattr(engine, "num_optimization_profiles", 1) or 1)
    out = []
    for i in range(n):
        _lo, opt, _hi = engine.get_tensor_profile_shape(input_names[0], i)
        out.append(int(tuple(opt)[0]))
    return out


# --------------------------------------------------------------------------------------------
# engines checked against their ONNX (here, not in exporters/: running an engine is the
# runtime's job, and exporters must not import the runtime that imports them)
# --------------------------------------------------------------------------------------------
#: (atol, rtol, min cosine) of an engine against its ONNX run by ONNX Runtime CPU, per
#: precision. fp16: the export's own fp16 tolerance. int8 / fp8: both sides run the same
#: Q/DQ graph, but a value that lands on another quantization step in one of them (other
#: accumulation order, fused epilogues) moves everything after it by that step, a distance
#: that scales with the embedding: the cosine floor is the check, the tolerance only a bound.
VALIDATION_TOLERANCES = {"fp16": (2e-2, 2e-2, 0.99), "int8": (1e-1, 1e-1, 0.99),
                         "fp8": (1e-1, 1e-1, 0.99)}


def validate_engine(engine_path: str | Path, onnx_path: str | Path, feed: dict, *,
                    atol: float | None = None, rtol: float | None = None,
                    min_cosine: float | None = 0.99, precision: str = "fp16") -> dict:
    """Run the engine (GPU) and its ONNX (onnxruntime, CPU) on ``feed``; compare their first
    outputs with :func:`embedding_agreement` (the fp16 ONNX itself was validated against fp32
    PyTorch at export, with the same fp16 tolerance and cosine floor). ``precision`` (fp16,
    int8, fp8) picks the default tolerances (:data:`VALIDATION_TOLERANCES`); an fp8 QDQ
    reference runs with graph optimisation BASIC (:func:`.ort_runner.ort_optimization`)."""
    from .ort_runner import OrtRunner, ort_optimization

    d_atol, d_rtol, _ = VALIDATION_TOLERANCES.get(precision, VALIDATION_TOLERANCES["fp16"])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    with OrtRunner(onnx_path, threads=2, optimization=ort_optimization(onnx_path)) as ref_runner:
        ref = next(iter(ref_runner.infer(feed).values()))
    with TrtRunner(engine_path, precision=precision) as runner:
        out = next(iter(runner.infer(feed).values()))
    return embedding_agreement(out, ref, atol=atol, rtol=rtol, min_cosine=min_cosine)


def build_tower_engines(onnx_paths: dict[str, Path], out_dir: str | Path, *, sparse: bool,
                        batch_sizes: Sequence[int], seq_len: int | None,
                        timing_cache: str | Path | None, pruned: Iterable[str] | None = None,
                        workspace_gb: float = DEFAULT_WORKSPACE_GB,
                        check_feeds: dict[str, dict] | None = None, precision: str = "fp16"
                        ) -> dict[str, EngineBuildResult]:
    """:func:`build_engine` for every tower's ONNX (fp16, or QDQ int8 / fp8: ``precision``)
    into ``out_dir/<tower>.engine``; with ``check_feeds`` (tower -> feed) each engine is
    validated (:func:`validate_engine`) and a drifting engine raises one :class:`ExportError`
    naming it."""
    out_dir = Path(out_dir)
    results, bad = {}, []
    for tower, path in onnx_paths.items():
        res = build_engine(path, out_dir / f"{tower}.engine", sparse=sparse,
                           batch_sizes=batch_sizes, seq_len=seq_len, timing_cache=timing_cache,
                           pruned=pruned, workspace_gb=workspace_gb)
        if check_feeds and tower in check_feeds:
            v = validate_engine(res.engine_path, path, check_feeds[tower], precision=precision)
            res.validation = v
            if not v["ok"]:
                bad.append(f"{tower}: max abs diff {v['max_abs_diff']:.3g}, min cosine "
                           f"{v['min_cosine']:.4f} (need >= {v['min_cosine_required']})")
        results[tower] = res
    if bad:
        raise ExportError(f"TensorRT {precision} engine disagrees with its ONNX for "
                          f"{len(bad)} tower(s): " + "; ".join(bad))
    return results


# --------------------------------------------------------------------------------------------
# registry entries: TensorRT engines, strongly typed, 2:4 sparse weights for 2:4 pruned models:
# fp16 (from fp16 ONNX), int8 and fp8 (from explicit QDQ ONNX written for TensorRT)
# --------------------------------------------------------------------------------------------
ENGINE_INFO_SUFFIX = ".engine.json"
#: compute capability fp8 GEMMs need (Ada, Hopper and newer)
FP8_MIN_CAPABILITY = (8, 9)


def check_tensorrt():
    """A GPU, then TensorRT: each missing one is one sentence (MissingDependencyError)."""
    from .. import optional_deps

    optional_deps.require_cuda()
    return optional_deps.require_tensorrt()


def check_tensorrt_fp8():
    """:func:`check_tensorrt`, then a GPU with fp8 tensor cores (compute capability >= 8.9):
    one sentence (MissingDependencyError) when it has none."""
    from ..errors import MissingDependencyError

    trt = check_tensorrt()
    import torch

    cc = tuple(torch.cuda.get_device_capability())
    if cc < FP8_MIN_CAPABILITY:
        raise MissingDependencyError(
            f"fp8 TensorRT engines need a GPU with compute capability >= 8.9 (Ada, Hopper or "
            f"newer); {torch.cuda.get_device_name()} is {cc[0]}.{cc[1]}: use --quantize int8.")
    return trt


def check_qdq_onnx(label: str, quantize: str, artefacts, towers) -> None:
    """ConfigError (one line) unless every tower's ONNX is explicit QDQ ``quantize`` written
    for TensorRT: its weights are ``quantize`` initialisers behind DequantizeLinear
    (:func:`vlcompress.exporters.tensorrt.onnx_inputs`) and, when the file says which runtime
    it was quantized for, that is tensorrt (ONNX Runtime's int8 has uint8 activations with
    zero points, which TensorRT does not take)."""
    from ..errors import ConfigError
    from .ort_runner import onnx_metadata

    for t in towers:
        path = Path(artefacts.onnx[t])
        _, got = onnx_inputs(path)
        target = onnx_metadata(path).get("vlcompress.quantize_target", "tensorrt")
        if got != quantize or target != "tensorrt":
            what = got if target == "tensorrt" or got not in QUANTIZED_PRECISIONS else (
                f"{got} QDQ for {target}")
            raise ConfigError(
                f"runtime {label} needs explicit QDQ {quantize} ONNX for TensorRT "
                f"(quantize_onnx(..., '{quantize}', target='tensorrt')); {artefacts.variant} "
                f"{path.name} is {what}")


def _engine_info(res, sparse: bool) -> dict:
    return {"trt_version": res.trt_version, "quantize": res.quantize, "sparse_weights": sparse,
            "eligible_layers": res.sparsity.n_eligible, "sparse_layers": res.sparsity.n_sparse,
            "warnings": list(res.warnings)}


def _read_info(path: Path) -> dict | None:
    import json

    p = path.with_name(path.name[: -len(".engine")] + ENGINE_INFO_SUFFIX)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_sparse(art, opts) -> bool:
    """2:4 sparse weights for the pruned variants of a 2:4 run (``pruned``, ``pruned_int8``,
    ...), never for the dense ones (``dense``, ``dense_int8``, ...)."""
    return art.variant.split("_")[0] != "dense" and str(opts.pattern) == "2:4"


def _trt_factory_for(precision: str):
    """The factory of ``tensorrt/cuda/<precision>``: engines ``<folder>/<tower>.engine`` when
    present; else built from the variant's ONNX (fp16 ONNX for fp16, explicit QDQ ONNX for
    int8 / fp8; checked first, one line) by :func:`build_tower_engines` next to it, with what
    TensorRT said about sparse layers saved beside each as ``<tower>.engine.json``."""
    label = f"tensorrt/cuda/{precision}"
    source = "fp16 ONNX" if precision == "fp16" else f"QDQ {precision} ONNX"

    def factory(art, towers, opts):
        import json
        import logging

        from ..atomic import atomic_write_text
        from ..errors import ConfigError
        from .ort_runner import check_onnx_precision

        sparse = _is_sparse(art, opts)
        engines = {t: Path(art.engines[t]) for t in towers if t in art.engines}
        engines.update({t: art.folder / f"{t}.engine" for t in towers if t not in engines
                        and art.folder is not None and (art.folder / f"{t}.engine").is_file()})
        missing = [t for t in towers if t not in engines]
        info = {t: _read_info(p) for t, p in engines.items()}
        if missing:
            lacking = [t for t in missing if t not in art.onnx]
            if lacking or art.folder is None:
                raise ConfigError(f"runtime {label} needs {art.variant} engines or {source} "
                                  f"to build them from; none for tower(s) {', '.join(missing)}")
            if precision == "fp16":
                check_onnx_precision(label, "fp16", art, missing)
            else:
                check_qdq_onnx(label, precision, art, missing)
            built = build_tower_engines({t: Path(art.onnx[t]) for t in missing}, art.folder,
                                        sparse=sparse, batch_sizes=opts.batch_sizes,
                                        seq_len=opts.seq_len, timing_cache=opts.timing_cache,
                                        pruned=art.pruned_layers if sparse else None,
                                        check_feeds=opts.check_feeds, precision=precision)
            for t, res in built.items():
                engines[t] = res.engine_path
                info[t] = _engine_info(res, sparse)
                atomic_write_text(res.engine_path.with_name(f"{t}{ENGINE_INFO_SUFFIX}"),
                                  json.dumps(info[t], indent=2) + "\n")
                for w in res.warnings:
                    logging.getLogger(__name__).warning("%s %s tower: %s", art.variant, t, w)
        runners = {t: TrtRunner(engines[t], name=f"tensorrt-{art.variant}-{t}",
                                copy_outputs=False, precision=precision) for t in towers}
        return Built(runners, {t: {"engine": v} for t, v in info.items() if v})

    factory.__name__ = f"_trt_factory_{precision}"
    return factory


_trt_factory = _trt_factory_for("fp16")
register(_Runtime("tensorrt", "cuda", "fp16", ENGINE, _trt_factory, check_tensorrt,
                  accelerates=("structured", "2:4"),
                  description="TensorRT engines from fp16 ONNX, strongly typed (2:4 sparse "
                              "weights for 2:4)"))
register(_Runtime("tensorrt", "cuda", "int8", ENGINE, _trt_factory_for("int8"), check_tensorrt,
                  accelerates=("structured", "2:4"),
                  description="TensorRT engines from explicit QDQ int8 ONNX (symmetric, "
                              "per-channel weights), strongly typed: int8 MatMul/Gemm/Conv, "
                              "the rest in the ONNX's float type (2:4 sparse int8 for 2:4)"))
register(_Runtime("tensorrt", "cuda", "fp8", ENGINE, _trt_factory_for("fp8"), check_tensorrt_fp8,
                  accelerates=("structured", "2:4"),
                  description="TensorRT engines from explicit QDQ fp8 (e4m3) ONNX, strongly "
                              "typed: fp8 MatMul/Gemm/Conv, the rest in the ONNX's float type "
                              "(2:4 sparse weights for 2:4); GPUs of compute capability >= 8.9"))
