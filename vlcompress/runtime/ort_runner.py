"""A runner for an ONNX file on ONNX Runtime (CPU, CUDA or TensorRT execution provider)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..optional_deps import require_onnxruntime_provider
from .base import Runner
from .registry import ONNX, Built, register
from .registry import Runtime as _Runtime

#: numpy dtype of each ONNX Runtime input type string (shared with export validation)
ORT_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                "tensor(bool)": np.bool_}

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                  "MIGraphXExecutionProvider", "DmlExecutionProvider")


class OrtRunner(Runner):
    """An ``onnxruntime.InferenceSession`` built on activation (graph optimisation level ALL,
    or ``optimization="basic"``: see :func:`ort_optimization`).

    ``providers`` in order of preference; each must be available (else
    :class:`MissingDependencyError`). ``threads`` sets ``intra_op_num_threads`` (None:
    onnxruntime's default, one per physical core). ``device`` is ``"cuda"`` when the first
    provider is a GPU one. ``infer`` passes only the model's own inputs from the feed.

    On a GPU provider (CUDA / TensorRT EP) ``io_binding`` (default on there) builds one
    ``IOBinding`` per feed (inputs copied to the device once, outputs bound on the first run
    to the buffers that run allocated and re-bound to them after), so a timed call is
    ``run_with_iobinding`` and nothing else: no copies, no allocation. ``copy_outputs=False``
    then returns those device ``OrtValue`` s (overwritten by the next call on the same feed).
    ``provider_options`` (one dict per provider) go to the session as they are.

    The session must run on the provider asked for first: onnxruntime falls back to the next
    one (CPU) when a GPU provider fails to load, so activation checks ``get_providers()`` and
    raises one line (:class:`MissingDependencyError`) instead of timing the CPU.

    On a GPU provider, when torch sees the GPU, the session computes on a CUDA stream of our
    own (the ``user_compute_stream`` provider option, onnxruntime >= 1.17), exposed as
    :attr:`stream`: the latency harness records its CUDA events on it, so the time is the
    GPU's. Without a CUDA build of torch there is no stream; :meth:`describe` then labels the
    timing for what it is, host wall time around a synchronous ``run``.
    """

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, providers=("CPUExecutionProvider",),
                 threads: int | None = None, name: str | None = None,
                 io_binding: bool | None = None, copy_outputs: bool = True,
                 provider_options: list[dict] | None = None, optimization: str = "all"):
        providers = tuple(providers) if not isinstance(providers, str) else (providers,)
        if not providers:
            raise ValueError("OrtRunner needs at least one execution provider")
        device = "cuda" if providers[0] in _GPU_PROVIDERS else "cpu"
        short = providers[0].replace("ExecutionProvider", "").lower()
        super().__init__(name or f"onnxruntime-{short}", device)
        self.path = Path(path)
        self.providers = providers
        self.threads = threads
        self.session = None
        self.io_binding = (device == "cuda") if io_binding is None else bool(io_binding)
        self.copy_outputs = copy_outputs
        self.provider_options = provider_options
        if optimization not in _OPT_LEVELS:
            raise ValueError(f"optimization {optimization!r}; allowed: {', '.join(_OPT_LEVELS)}")
        self.optimization = optimization
        self.active_providers: list[str] = []  # what the session really uses (after activation)
        self.precision: str | None = None  # the graph's, read on activation
        self.stream = None  # a torch CUDA stream the session computes on (GPU providers)

    def _activate(self) -> None:
        ort = None
        for p in self.providers:
            ort = require_onnxruntime_provider(p)
        if not self.path.is_file():
            raise ModelError(f"ONNX file {str(self.path)!r} does not exist")
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              _OPT_LEVELS[self.optimization])
        so.log_severity_level = 3  # errors only: keep the CLI output clean
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        options = self._session_provider_options()
        try:
            kw = {"provider_options": options} if options else {}
            self.session = ort.InferenceSession(str(self.path), so, providers=list(self.providers),
                                                **kw)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"onnxruntime cannot load {str(self.path)!r}: {msg}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.active_providers = list(self.session.get_providers())
        check_active_provider(self.providers[0], self.active_providers, self.path)
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        self.precision = meta.get("vlcompress.precision", "fp32")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._ort = ort
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}
        self._bound: dict[int, tuple[object, object]] = {}

    def _session_provider_options(self) -> list[dict] | None:
        """The provider options, with ``user_compute_stream`` (a torch stream of our own) for
        a CUDA / TensorRT EP when torch has CUDA; None when there is nothing to pass."""
        opts = [dict(o) for o in self.provider_options] if self.provider_options else None
        self.stream = None
        if self.device != "cuda" or self.providers[0] not in _STREAM_PROVIDERS:
            return opts
        try:
            import torch

            if not torch.cuda.is_available():
                return opts
            self.stream = torch.cuda.Stream()  # non-default: onnxruntime ignores stream 0
        except Exception:  # noqa: BLE001 - no usable torch CUDA: host timing, labelled
            self.stream = None
            return opts
        if opts is None:
            opts = [{} for _ in self.providers]
        opts[0] = {**opts[0], "has_user_compute_stream": "1",
                   "user_compute_stream": str(self.stream.cuda_stream)}
        return opts

    def describe(self) -> dict:
        """The provider the session actually ran on (its first), and the graph's precision;
        on a GPU provider also how a call is timed (``timing``)."""
        prov = self.active_providers[0] if self.active_providers else self.providers[0]
        d = {"provider": prov, "precision": self.precision or onnx_precision(self.path)}
        if self.device == "cuda":
            d["timing"] = ("cuda events on the session's compute stream" if self.stream is not None
                           else "host wall time around a synchronous run (no CUDA torch)")
        return d

    def _deactivate(self) -> None:
        self.session = None
        self._bound = {}
        self.stream = None

    def synchronize(self) -> None:
        """Wait for the session's stream (GPU providers); ``run`` itself returns only when
        its work has finished, so on CPU there is nothing to wait for."""
        if self.stream is not None:
            self.stream.synchronize()

    def _infer(self, feed):
        try:
            sub = {n: feed[n] for n in self.input_names}
        except KeyError as exc:
            raise KeyError(f"feed lacks input {exc.args[0]!r} for {self.path.name} "
                           f"(inputs: {', '.join(self.input_names)})") from None
        if self.io_binding:
            return self._infer_bound(sub)
        outs = self.session.run(self.output_names, sub)
        return dict(zip(self.output_names, (np.asarray(o) for o in outs), strict=True))

    def _device_value(self, name: str, arr):
        want = ORT_NP_TYPES.get(self._input_types.get(name, ""))
        host = np.ascontiguousarray(arr if want is None else np.asarray(arr, dtype=want))
        dev = "cuda" if self.device == "cuda" else "cpu"
        return self._ort.OrtValue.ortvalue_from_numpy(host, dev, 0)

    def _binding(self, sub):
        """The IOBinding of this feed: built (inputs copied to the device) on first use."""
        key = tuple(id(a) for a in sub.values())
        hit = self._bound.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], sub.values(), strict=True)):
            return hit[1]
        io = self.session.io_binding()
        values = {n: self._device_value(n, arr) for n, arr in sub.items()}
        for n, val in values.items():
            io.bind_ortvalue_input(n, val)
        dev = "cuda" if self.device == "cuda" else "cpu"
        for n in self.output_names:
            io.bind_output(n, dev)  # first run allocates; _infer_bound re-binds those buffers
        entry = {"io": io, "inputs": values, "outputs_fixed": False}
        self._bound[key] = (tuple(sub.values()), entry)  # holds the arrays: ids stay unique
        return entry

    def _infer_bound(self, sub):
        entry = self._binding(sub)
        io = entry["io"]
        self.session.run_with_iobinding(io)  # returns once the provider's stream is done
        outs = io.get_outputs()
        if not entry["outputs_fixed"]:  # later runs write into these buffers: no allocation
            for n, val in zip(self.output_names, outs, strict=True):
                io.bind_ortvalue_output(n, val)
            entry["outputs_fixed"] = True
        if not self.copy_outputs:
            return dict(zip(self.output_names, outs, strict=True))
        return {n: np.asarray(v.numpy()) for n, v in zip(self.output_names, outs, strict=True)}


#: OrtRunner ``optimization`` -> onnxruntime GraphOptimizationLevel member
_OPT_LEVELS = {"all": "ORT_ENABLE_ALL", "basic": "ORT_ENABLE_BASIC"}


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (``{}`` when it cannot be read: onnxruntime
    says why later)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file fails later, with onnxruntime's words
        return {}
    return {p.key: p.value for p in proto.metadata_props}


def ort_optimization(path: str | Path) -> str:
    """The graph optimisation level to run an ONNX file at on the CPU provider: ``"basic"``
    for fp8 QDQ files (``vlcompress.quantize`` fp8), ``"all"`` otherwise.

    Measured (onnxruntime 1.32, CPU): on an fp8 e4m3 QDQ MLP the EXTENDED/ALL levels' QDQ
    fusions give outputs 0.64 away from the float model (cosine 0.55) where the graph's own
    semantics, computed op by op with ml_dtypes, give 0.08; at BASIC (and with optimisations
    off) onnxruntime matches that op-by-op result exactly. int8 QDQ is right at every level."""
    return "basic" if onnx_metadata(path).get("vlcompress.quantize") == "fp8" else "all"


#: providers that take a ``user_compute_stream`` option
_STREAM_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def check_active_provider(asked: str, active, path) -> None:
    """One-line :class:`MissingDependencyError` when the session's first provider is not the
    one asked for (onnxruntime's silent fallback when a GPU provider fails to load)."""
    from ..errors import MissingDependencyError

    got = list(active)[0] if list(active) else "no provider"
    if got != asked:
        raise MissingDependencyError(
            f"onnxruntime was asked for {asked} but the session for {Path(path).name} runs on "
            f"{got}: {asked} failed to load (CUDA/cuDNN/TensorRT libraries missing or not "
            "matching this onnxruntime build); nothing is timed on a provider not asked for.")


def onnx_precision(path: str | Path) -> str:
    """``fp16`` or ``fp32``: what :func:`vlcompress.exporters.onnx.export_tower` recorded in
    the model metadata (``vlcompress.precision``), else ``fp32``."""
    return onnx_metadata(path).get("vlcompress.precision", "fp32")


def check_onnx_precision(label: str, precision: str, artefacts, towers) -> None:
    """ConfigError when an ONNX file is not of the runtime's precision (what ran must be
    what the row says)."""
    from ..errors import ConfigError

    for t in towers:
        got = onnx_precision(artefacts.onnx[t])
        if got != precision:
            raise ConfigError(f"runtime {label} needs {precision} ONNX; {artefacts.variant} "
                              f"{Path(artefacts.onnx[t]).name} is {got} (export with"
                              f"{'' if precision == 'fp16' else 'out'} --fp16)")


_PROVIDERS = {"cpu": ("CPUExecutionProvider",),
              "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
              "trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")}


def _ort_entry(name: str, device: str, precision: str, providers: tuple[str, ...], what: str):
    label = f"{name}/{device}/{precision}"

    def check():
        from .. import optional_deps

        optional_deps.require_onnxruntime_provider(providers[0])

    def factory(art, towers, opts):
        check_onnx_precision(label, precision, art, towers)
        return Built({t: OrtRunner(art.onnx[t], providers=providers, threads=opts.threads,
                                   name=f"{name}-{device}-{art.variant}") for t in towers})

    register(_Runtime(name, device, precision, ONNX, factory, check, description=what))


for _prec in ("fp32", "fp16"):
    _ort_entry("onnxruntime", "cpu", _prec, _PROVIDERS["cpu"], "ONNX Runtime, CPU provider")
for _prec in ("fp32", "fp16"):
    _ort_entry("onnxruntime", "cuda", _prec, _PROVIDERS["cuda"], "ONNX Runtime, CUDA provider")
for _prec in ("fp16", "fp32"):
    _ort_entry("onnxruntime-trt", "cuda", _prec, _PROVIDERS["trt"],
               "ONNX Runtime, TensorRT execution provider")
