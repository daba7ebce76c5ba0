"""A runner for an ONNX file on ONNX Runtime (CPU, CUDA or TensorRT execution provider)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._deps import require_onnxruntime_provider
from ..errors import ModelError
from .base import Runner

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                  "MIGraphXExecutionProvider", "DmlExecutionProvider")


class OrtRunner(Runner):
    """An ``onnxruntime.InferenceSession`` built on activation (graph optimisation level ALL).

    ``providers`` in order of preference; each must be available (else
    :class:`MissingDependencyError`). ``threads`` sets ``intra_op_num_threads`` (None:
    onnxruntime's default, one per physical core). ``device`` is ``"cuda"`` when the first
    provider is a GPU one. ``infer`` passes only the model's own inputs from the feed.
    """

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, providers=("CPUExecutionProvider",),
                 threads: int | None = None, name: str | None = None):
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
            self.session = ort.InferenceSession(str(self.path), so, providers=list(self.providers))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"onnxruntime cannot load {str(self.path)!r}: {msg}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _deactivate(self) -> None:
        self.session = None

    def synchronize(self) -> None:
        """Nothing to wait for: ``session.run`` returns host arrays, so it has finished (and
        a CUDA provider must not need a CUDA build of torch to be timed)."""

    def _infer(self, feed):
        try:
            sub = {n: feed[n] for n in self.input_names}
        except KeyError as exc:
            raise KeyError(f"feed lacks input {exc.args[0]!r} for {self.path.name} "
                           f"(inputs: {', '.join(self.input_names)})") from None
        outs = self.session.run(self.output_names, sub)
        return dict(zip(self.output_names, (np.asarray(o) for o in outs), strict=True))
