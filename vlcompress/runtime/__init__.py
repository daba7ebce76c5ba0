"""Runners (torch, onnxruntime) and the one latency harness.

    with OrtRunner("out/vision.onnx") as r:
        out = r.infer(feed)
    rows = compare_latency(dense_runners, pruned_runners, feeds, LatencyConfig())

Backends beyond torch and onnxruntime-CPU are imported lazily (``vlcompress._deps``).
"""

from __future__ import annotations

from .base import InactiveRunnerError, Runner
from .latency import (
    build_runners,
    compare_latency,
    interleaved_order,
    make_feeds,
    measure,
    resize_batch,
    summary,
    tower_input_names,
)
from .ort_runner import OrtRunner
from .torch_runner import TorchRunner

__all__ = ["Runner", "InactiveRunnerError", "TorchRunner", "OrtRunner", "measure", "summary",
           "compare_latency", "make_feeds", "resize_batch", "interleaved_order",
           "build_runners", "tower_input_names"]
