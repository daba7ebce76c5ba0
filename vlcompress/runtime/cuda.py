"""CUDA pieces of the runtimes: event timing, device facts, fp16 torch runner with 2:4 weights.

    timer = CudaEventTimer()            # used by measure(..., cuda_events=True)
    with timer.time():                  # records start/end events on the current stream
        runner.infer(feed)
    timer.last_ms

    runner = TorchCudaRunner(vlm.tower_module("vision"), ["pixel_values"], semi_structured=True)
    with runner:                         # copies the module to the GPU in fp16, swaps the
        runner.infer(feed)               # weights of 2:4 Linear layers for semi-structured ones
    runner.semi_structured_report        # {"swapped": [...], "skipped": {name: reason}}

The pure parts (:func:`semi_structured_reason`, :func:`backend_constraints`) run on CPU; the rest
needs a CUDA build of torch and a GPU (``vlcompress.optional_deps.require_cuda``).

``torch.sparse.to_sparse_semi_structured`` (PyTorch >= 2.1) compresses a 2-D fp16/bf16 CUDA
tensor that is 2:4 along its last (input) dimension; ``F.linear`` then runs on sparse tensor
cores (cuSPARSELt by default; CUTLASS when ``SparseSemiStructuredTensor._FORCE_CUTLASS`` or
without cuSPARSELt, and then only on sm8x: those kernels raise on sm90). It
needs compute capability >= 8.0 and shapes that are multiples of the backend's minimum (read
from ``_DTYPE_SHAPE_CONSTRAINTS`` at run time: cuSPARSELt fp16 16x16, CUTLASS fp16 32x64).
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np

from ..optional_deps import require_cuda
from .registry import MODEL, Built, register
from .registry import Runtime as _Runtime
from .torch_runner import TorchRunner, tower_input_names

__all__ = ["CudaEventTimer", "gpu_info", "semi_structured_reason", "backend_constraints",
           "sparsify_linears", "choose_backend", "SemiStructuredReport", "TorchCudaRunner",
           "MIN_SEMI_STRUCTURED_CAPABILITY"]

MIN_SEMI_STRUCTURED_CAPABILITY = (8, 0)
#: Fallback shape minimums (rows, cols) per backend for fp16/bf16, as in PyTorch 2.4-2.13.
_FALLBACK_MIN = {"cusparselt": (16, 16), "cutlass": (32, 64)}


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
class CudaEventTimer:
    """Times a block with a pair of ``torch.cuda.Event(enable_timing=True)`` recorded on the
    current stream (or ``stream``); waits for the end event before reading the time."""

    def __init__(self, stream=None):
        torch = require_cuda()
        self._torch = torch
        self.stream = stream
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self.last_ms: float | None = None

    @contextlib.contextmanager
    def time(self):
        s = self.stream or self._torch.cuda.current_stream()
        self._start.record(s)
        yield self
        self._end.record(s)
        self._end.synchronize()
        self.last_ms = float(self._start.elapsed_time(self._end))


def _nvidia_smi(query: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def gpu_info(device: int = 0) -> dict:
    """GPU name, compute capability, memory, driver, CUDA and cuDNN versions (needs CUDA)."""
    torch = require_cuda()
    props = torch.cuda.get_device_properties(device)
    info = {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": _nvidia_smi("driver_version"), "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        info["cusparselt"] = bool(torch.backends.cusparselt.is_available())
    except AttributeError:
        info["cusparselt"] = False
    return info


# --------------------------------------------------------------------------------------------
# semi-structured (2:4) weights for torch
# --------------------------------------------------------------------------------------------
def backend_constraints(backend: str, dtype) -> tuple[int, int]:
    """(min rows, min cols) a semi-structured weight of ``dtype`` needs on ``backend``
    (``"cusparselt"`` or ``"cutlass"``): PyTorch's table where it has one, else our copy."""
    try:
        import torch

        cls = (torch.sparse.SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt"
               else torch.sparse.SparseSemiStructuredTensorCUTLASS)
        c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return int(c.sparse_min_rows), int(c.sparse_min_cols)
    except (AttributeError, KeyError, ImportError):
        return _FALLBACK_MIN["cusparselt" if backend == "cusparselt" else "cutlass"]


def semi_structured_reason(weight, capability: tuple[int, int] | None, backend: str = "cusparselt"
                           ) -> str | None:
    """Why ``weight`` (a Linear weight ``[d_out, d_in]``) cannot become semi-structured on a GPU
    of ``capability``, or None when it can. Pure: works on CPU tensors and numpy arrays."""
    import torch

    if capability is None:
        return "no CUDA GPU"
    if tuple(capability) < MIN_SEMI_STRUCTURED_CAPABILITY:
        return (f"compute capability {capability[0]}.{capability[1]} < 8.0 (no sparse tensor "
                "cores)")
    w = torch.as_tensor(weight)
    if w.dim() != 2:
        return f"weight is {w.dim()}-D, not 2-D"
    dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16
    rows, cols = backend_constraints(backend, dtype)
    m, n = w.shape
    if m % rows or n % cols or m < rows or n < cols:
        return (f"shape {m}x{n} is not a multiple of {rows}x{cols} ({backend}, "
                f"{str(dtype).replace('torch.', '')})")
    if not bool((w == 0).any()):
        return "weight is dense (no zeros)"
    groups = (w != 0).reshape(m, n // 4, 4).sum(-1)
    if bool((groups > 2).any()):
        return "weight is not 2:4 along its input dimension"
    return None


@dataclass
class SemiStructuredReport:
    backend: str | None
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # why nothing was tried at all
    planned: bool = False  # PlannedSparseLinear modules (per-shape plan) instead of swaps

    def to_dict(self) -> dict:
        return {"backend": self.backend, "swapped": list(self.swapped),
                "skipped": dict(self.skipped), "reason": self.reason, "planned": self.planned}

    def require_swaps(self, what: str = "the 2:4 model") -> None:
        """:class:`ModelError` (one line) when no layer was swapped: a "2:4" time measured on
        dense kernels would be reported as a sparse speedup of ~1.0x."""
        from ..errors import ModelError

        if self.swapped:
            return
        first = next(iter(self.skipped.items()), None)
        why = self.reason or (f"{len(self.skipped)} Linear layers skipped, e.g. {first[0]}: "
                              f"{first[1]}" if first else "it has no Linear layer")
        raise ModelError(f"no Linear layer of {what} became a semi-structured 2:4 tensor "
                         f"({why}); nothing would run on sparse kernels")


def choose_backend(cusparselt: bool, capability: tuple[int, int] | None, force_cutlass: bool = False
                   ) -> tuple[str | None, str | None]:
    """``(backend, None)`` for the semi-structured kernels to use on a GPU of ``capability``,
    or ``(None, why not)``. cuSPARSELt where PyTorch has it (unless CUTLASS is forced); the
    CUTLASS kernels only on sm8x: PyTorch builds them for Ampere/Ada and they raise on Hopper
    (sm90) and later. Pure."""
    if capability is None:
        return None, "no CUDA GPU"
    if tuple(capability) < MIN_SEMI_STRUCTURED_CAPABILITY:
        return None, (f"compute capability {capability[0]}.{capability[1]} < 8.0 (no sparse "
                      "tensor cores)")
    if cusparselt and not force_cutlass:
        return "cusparselt", None
    if capability[0] == 8:
        return "cutlass", None
    why = "CUTLASS is forced" if cusparselt else "this PyTorch has no cuSPARSELt"
    return None, (f"{why} and PyTorch's CUTLASS 2:4 kernels run only on sm8x, not on "
                  f"sm{capability[0]}{capability[1]}")


def _has_cusparselt(torch) -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except AttributeError:
        return False


def dense_min_rows(backend: str, dtype) -> int:
    """Row multiple the dense input of a semi-structured matmul needs (PyTorch pads to it)."""
    try:
        import torch

        cls = (torch.sparse.SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt"
               else torch.sparse.SparseSemiStructuredTensorCUTLASS)
        return int(cls._DTYPE_SHAPE_CONSTRAINTS[dtype].dense_min_rows)
    except (AttributeError, KeyError, ImportError):
        return 8 if backend == "cusparselt" else 32


def sparsify_linears(module, names=None, planned: bool = False) -> SemiStructuredReport:
    """Replace the weight of every 2:4 ``nn.Linear`` of ``module`` (on a CUDA GPU, in
    fp16/bf16) by ``torch.sparse.to_sparse_semi_structured(weight)``; ``names`` limits it to
    those module names. ``planned`` (cuSPARSELt only): each 2:4 Linear becomes a
    :class:`~vlcompress.runtime.graphs.PlannedSparseLinear` (one algorithm search and one
    padded input buffer per row count, no per-call padding) instead of a weight swap; the
    report's ``planned`` says which. Each swapped weight is tried once with ``F.linear`` before it is kept
    (a kernel that fails here would fail in the timed call). Layers that cannot are listed
    with the reason; the report's :meth:`~SemiStructuredReport.require_swaps` turns "none
    swapped" into an error. ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set only while
    CUTLASS tensors are made (the subclass is fixed at creation) and restored after."""
    import torch

    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return SemiStructuredReport(None, reason=f"torch {torch.__version__} has no "
                                                 "to_sparse_semi_structured")
    cls = torch.sparse.SparseSemiStructuredTensor
    forced = bool(getattr(cls, "_FORCE_CUTLASS", False))
    wanted = None if names is None else set(names)
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)
               and (wanted is None or n in wanted)]
    dev = next((m.weight.device for _, m in linears if m.weight.is_cuda), None)
    cap = tuple(torch.cuda.get_device_capability(dev)) if dev is not None else None
    backend, why_not = choose_backend(_has_cusparselt(torch), cap, forced)
    rep = SemiStructuredReport(backend, reason=why_not)
    rep.planned = bool(planned and backend == "cusparselt")
    if backend is None:
        rep.skipped.update({n: why_not for n, _ in linears})
        return rep
    try:
        cls._FORCE_CUTLASS = backend == "cutlass"
        for name, mod in linears:
            w = mod.weight
            if not w.is_cuda:
                rep.skipped[name] = "weight is not on a CUDA device"
                continue
            why = semi_structured_reason(w.detach(), cap, backend)
            if why is not None:
                rep.skipped[name] = why
                continue
            x = torch.zeros(backend_constraints(backend, w.dtype)[0], w.shape[1],
                            dtype=w.dtype, device=w.device)
            try:
                if rep.planned:
                    from .graphs import PlannedSparseLinear

                    new = PlannedSparseLinear(w, mod.bias, min_rows=max(
                        16, dense_min_rows(backend, w.dtype)))
                    new(x)  # the kernel runs here, or not at all
                else:
                    sparse = torch.sparse.to_sparse_semi_structured(w.detach().contiguous())
                    torch.nn.functional.linear(x, sparse)
                torch.cuda.synchronize(w.device)
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                rep.skipped[name] = " ".join(str(exc).split())[:200]
                continue
            if rep.planned:
                parent, _, child = name.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, child, new)
            else:
                mod.weight = torch.nn.Parameter(sparse, requires_grad=False)
            rep.swapped.append(name)
    finally:
        cls._FORCE_CUTLASS = forced
    return rep


# --------------------------------------------------------------------------------------------
# the torch CUDA runner
# --------------------------------------------------------------------------------------------
class TorchCudaRunner(TorchRunner):
    """A private fp16 (or ``dtype``) copy of ``module`` on the GPU, optionally with 2:4 Linear
    weights as semi-structured sparse tensors (``semi_structured=True``; layers that cannot be
    swapped are recorded in :attr:`semi_structured_report`; none swapped at all is a
    :class:`ModelError` on activation). ``compile=True``: one static ``torch.compile`` per
    input shape (:class:`~vlcompress.runtime.graphs.StaticCompile`, compilations counted in
    :attr:`compiles`). ``cuda_graphs=True``: each input shape is captured once as a CUDA graph
    and replayed (:class:`~vlcompress.runtime.graphs.GraphedCall`). Without ``compile`` the
    cuSPARSELt 2:4 layers are :class:`~vlcompress.runtime.graphs.PlannedSparseLinear` (one
    algorithm search per shape); with it they stay PyTorch's semi-structured tensors (their
    op traces into the compiled graph).

    Input arrays are copied to the GPU once per feed array (cached), so host-to-device copies
    stay out of timed calls; ``copy_outputs=False`` returns the output tensors on the GPU
    (no device-to-host copy either; what the latency harness wants).
    """

    runtime = "torch"

    def __init__(self, module, input_names, device: str = "cuda", name: str | None = None,
                 output_names=("embeds",), dtype: str = "float16", semi_structured: bool = False,
                 copy_outputs: bool = True, compile: bool = False, cuda_graphs: bool = False):
        label = name or f"torch-cuda-{dtype}{'-2:4' if semi_structured else ''}"
        super().__init__(module, input_names, device=device, name=label,
                         output_names=output_names)
        self.dtype_name = dtype
        self.semi_structured = semi_structured
        self.copy_outputs = copy_outputs
        self.semi_structured_report: SemiStructuredReport | None = None
        self.compile = bool(compile)
        self.cuda_graphs = bool(cuda_graphs)
        self._cache: dict[int, tuple[object, object]] = {}
        self._compiled = self._graphed = None
        self._counts = {"compiles": 0, "graph_captures": 0}  # of the last activation
        self.attn_implementation = None

    @property
    def compiles(self) -> int:
        """Graphs ``torch.compile`` built in this activation (the last one when inactive)."""
        return self._compiled.compiles if self._compiled is not None else \
            self._counts["compiles"]

    @property
    def graph_captures(self) -> int:
        return self._graphed.captures if self._graphed is not None else \
            self._counts["graph_captures"]

    @property
    def precision(self) -> str:
        return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(self.dtype_name,
                                                                               self.dtype_name)

    def describe(self) -> dict:
        import torch

        d = {"provider": f"torch {torch.__version__} ({self.device}"
                         f"{', torch.compile static' if self.compile else ''}"
                         f"{', CUDA graphs' if self.cuda_graphs else ''})",
             "precision": self.precision, "compile": self.compile,
             "cuda_graphs": self.cuda_graphs, "attn_implementation": self.attn_implementation}
        if self.compile:
            d["compiles"] = self.compiles
        if self.cuda_graphs:
            d["graph_captures"] = self.graph_captures
        if self.semi_structured_report is not None:
            rep = self.semi_structured_report
            d["provider"] += f", semi-structured 2:4 ({rep.backend})"
            d["semi_structured"] = {"backend": rep.backend, "swapped": len(rep.swapped),
                                    "skipped": len(rep.skipped), "reason": rep.reason,
                                    "planned": rep.planned}
        return d

    def _activate(self) -> None:
        torch = require_cuda()
        self._torch_device = torch.device(self.device)
        self._dtype = getattr(torch, self.dtype_name)
        self._module = copy.deepcopy(self.module).to(self._torch_device, self._dtype).eval()
        self.semi_structured_report = None
        from .graphs import GraphedCall, StaticCompile, attn_implementation

        self.attn_implementation = attn_implementation(self._module)
        if self.semi_structured:
            rep = sparsify_linears(self._module, planned=not self.compile)
            self.semi_structured_report = rep
            try:
                rep.require_swaps(f"runner {self.name!r}")
            except Exception:
                self._module = None
                raise
        self._fn = self._module
        if self.compile:  # inductor, a static graph per shape, compiled on its first call
            self._compiled = self._fn = StaticCompile(self._module)
        if self.cuda_graphs:
            self._graphed = self._fn = GraphedCall(self._fn)
        self._home = None  # the caller's module is never moved

    def _deactivate(self) -> None:
        self._counts = {"compiles": self.compiles, "graph_captures": self.graph_captures}
        self._module = self._fn = self._graphed = self._compiled = None
        self._cache.clear()

    def _to_device(self, arr):
        import torch

        key = id(arr)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is arr:
            return hit[1]
        t = torch.as_tensor(np.asarray(arr)).to(self._torch_device)
        if t.is_floating_point():
            t = t.to(self._dtype)
        self._cache[key] = (arr, t)  # holding arr keeps id(arr) from being reused
        return t

    def _infer(self, feed):
        import torch

        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise KeyError(f"feed lacks input(s) {', '.join(missing)} for runner {self.name!r}")
        args = {n: self._to_device(feed[n]) for n in self.input_names}
        with torch.inference_mode():
            out = self._fn(**args)
        if not self.copy_outputs:
            if isinstance(out, torch.Tensor):
                return {self.output_names[0]: out}
            if isinstance(out, (tuple, list)):
                return dict(zip(self.output_names, out, strict=False))
            return dict(out.items()) if hasattr(out, "items") else {"output": out}
        torch.cuda.synchronize(self._torch_device)
        res = self._name_outputs(out)
        return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in res.items()}


# --------------------------------------------------------------------------------------------
# registry entries: torch on CUDA in fp16, with and without 2:4 semi-structured weights
# --------------------------------------------------------------------------------------------
def _cuda_factory(semi_structured: bool):
    def factory(art, towers, opts):
        vlm = art.vlm
        # the dense model keeps dense weights: only the pruned one is swapped
        semi = semi_structured and art.variant != "dense"
        return Built({t: TorchCudaRunner(vlm.tower_module(t), tower_input_names(vlm, t),
                                         semi_structured=semi, copy_outputs=False,
                                         cuda_graphs=opts.cuda_graphs,
                                         name=f"torch-cuda-fp16-{art.variant}")
                      for t in towers})

    return factory


def _check_cuda():
    from .. import optional_deps

    return optional_deps.require_cuda()


def _check_semi_structured():
    torch = _check_cuda()
    from ..errors import MissingDependencyError

    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        raise MissingDependencyError(f"torch {torch.__version__} has no semi-structured sparse "
                                     "tensors: the torch-2:4 runtime needs PyTorch >= 2.1.")
    cap = torch.cuda.get_device_capability()
    if tuple(cap) < MIN_SEMI_STRUCTURED_CAPABILITY:
        raise MissingDependencyError(f"the GPU has compute capability {cap[0]}.{cap[1]}: the "
                                     "torch-2:4 runtime needs sparse tensor cores (8.0 or newer).")
    forced = bool(getattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False))
    backend, why = choose_backend(_has_cusparselt(torch), tuple(cap), forced)
    if backend is None:  # refused before any work, not after pruning
        raise MissingDependencyError(f"the torch-2:4 runtime has no 2:4 kernels here: {why}.")
    return torch


register(_Runtime("torch", "cuda", "fp16", MODEL, _cuda_factory(False), _check_cuda,
                  description="PyTorch eager, CUDA, fp16"))
register(_Runtime("torch-2:4", "cuda", "fp16", MODEL, _cuda_factory(True), _check_semi_structured,
                  patterns=("2:4",), accelerates=("structured", "2:4"),
                  description="PyTorch CUDA fp16, 2:4 weights as semi-structured sparse tensors"))
