"""A runner for an ONNX file on ONNX Runtime (CPU, CUDA or TensorRT execution provider)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._deps import require_onnxruntime_provider
from ..errors import ModelError
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
    """An ``onnxruntime.InferenceSession`` built on activation (graph optimisation level ALL).

    ``providers`` in order of preference; each must be available (else
    :class:`MissingDependencyError`). ``threads`` sets ``intra_op_num_threads`` (None:
    onnxruntime's default, one per physical core). ``device`` is ``"cuda"`` when the first
    provider is a GPU one. ``infer`` passes only the model's own inputs from the feed.

    On a GPU provider (CUDA / TensorRT EP) ``io_binding`` (default on there) binds inputs as
    device ``OrtValue`` s, copied once per feed array and cached, and binds outputs to the
    device, so timed calls hold no host<->device copies; ``copy_outputs=False`` then returns
    the outputs as device ``OrtValue`` s. ``provider_options`` (one dict per provider) go to
    the session as they are.
    """

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, providers=("CPUExecutionProvider",),
                 threads: int | None = None, name: str | None = None,
                 io_binding: bool | None = None, copy_outputs: bool = True,
                 provider_options: list[dict] | None = None):
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
        self.active_providers: list[str] = []  # what the session really uses (after activation)
        self.precision: str | None = None  # the graph's, read on activation

    def _activate(self) -> None:
        ort = None
        for p in self.providers:
            ort = require_onnxruntime_provider(p)
        if not self.path.is_file():
            raise ModelError(f"ONNX file {str(self.path)!r} does not exist")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: keep the CLI output clean
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        try:
            kw = {"provider_options": self.provider_options} if self.provider_options else {}
            self.session = ort.InferenceSession(str(self.path), so, providers=list(self.providers),
                                                **kw)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"onnxruntime cannot load {str(self.path)!r}: {msg}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.active_providers = list(self.session.get_providers())
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        self.precision = meta.get("vlcompress.precision", "fp32")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._ort = ort
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}
        self._bound: dict[int, tuple[object, object]] = {}

    def describe(self) -> dict:
        """The provider the session actually ran on (its first), and the graph's precision."""
        prov = self.active_providers[0] if self.active_providers else self.providers[0]
        return {"provider": prov, "precision": self.precision or onnx_precision(self.path)}

    def _deactivate(self) -> None:
        self.session = None
        self._bound = {}

    def synchronize(self) -> None:
        """Nothing to wait for: ``session.run`` returns host arrays, so it has finished (and
        a CUDA provider must not need a CUDA build of torch to be timed)."""

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
        hit = self._bound.get(id(arr))
        if hit is not None and hit[0] is arr:
            return hit[1]
        want = ORT_NP_TYPES.get(self._input_types.get(name, ""))
        host = np.ascontiguousarray(arr if want is None else np.asarray(arr, dtype=want))
        dev = "cuda" if self.device == "cuda" else "cpu"
        val = self._ort.OrtValue.ortvalue_from_numpy(host, dev, 0)
        self._bound[id(arr)] = (arr, val)  # keeps arr alive, so its id is not reused
        return val

    def _infer_bound(self, sub):
        io = self.session.io_binding()
        for n, arr in sub.items():
            io.bind_ortvalue_input(n, self._device_value(n, arr))
        dev = "cuda" if self.device == "cuda" else "cpu"
        for n in self.output_names:
            io.bind_output(n, dev)
        self.session.run_with_iobinding(io)  # the CUDA EP synchronises its stream at the end
        if not self.copy_outputs:
            return dict(zip(self.output_names, io.get_outputs(), strict=True))
        outs = io.copy_outputs_to_cpu()
        return dict(zip(self.output_names, (np.asarray(o) for o in outs), strict=True))


def onnx_precision(path: str | Path) -> str:
    """``fp16`` or ``fp32``: what :func:`vlcompress.exporters.onnx.export_tower` recorded in
    the model metadata (``vlcompress.precision``), else ``fp32``."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file fails later, with onnxruntime's words
        return "fp32"
    meta = {p.key: p.value for p in proto.metadata_props}
    return meta.get("vlcompress.precision", "fp32")


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
        from .. import _deps

        _deps.require_onnxruntime_provider(providers[0])

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
