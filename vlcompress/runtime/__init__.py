"""Runners (torch, onnxruntime, TensorRT), the runtime registry and the one latency harness.

    with OrtRunner("out/vision.onnx") as r:
        out = r.infer(feed)
    rows = time_models(get_runtime("onnxruntime"), dense, pruned, feeds, LatencyConfig())

Every module of this package is imported here, so each runtime file registers its entries
(:mod:`vlcompress.runtime.registry`): a new runtime is one new file. Backends beyond torch
and onnxruntime-CPU are imported lazily (``vlcompress.optional_deps``).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import InactiveRunnerError, Runner
from .registry import (
    Artefacts,
    BuildOptions,
    Built,
    LatencyConfig,
    Runtime,
    get_runtime,
    register,
    runtime_names,
    runtimes,
)

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

from .latency import (  # noqa: E402
    build_runners,
    compare_latency,
    interleaved_order,
    make_feeds,
    measure,
    resize_batch,
    summary,
    tower_input_names,
)
from .ort_runner import OrtRunner  # noqa: E402
from .timing import time_models  # noqa: E402
from .torch_runner import TorchRunner  # noqa: E402

__all__ = ["Runner", "InactiveRunnerError", "TorchRunner", "OrtRunner", "measure", "summary",
           "compare_latency", "make_feeds", "resize_batch", "interleaved_order",
           "build_runners", "tower_input_names", "Runtime", "Artefacts", "BuildOptions", "Built",
           "LatencyConfig", "get_runtime", "register", "runtimes", "runtime_names", "time_models"]
