"""The one place optional heavy backends are imported, lazily.

Each helper imports its backend on first use and turns its absence into a single sentence
saying what is missing and how to install it.
"""

from __future__ import annotations

from .errors import MissingDependencyError


def require_tensorrt():
    try:
        import tensorrt  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise MissingDependencyError(
            "TensorRT is not installed: install it with `pip install vlcompress[trt]` "
            "(NVIDIA's wheels, GPU machines only)."
        ) from exc
    return tensorrt


def require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(
            "No CUDA GPU is available: this step needs an NVIDIA GPU with a CUDA build of PyTorch."
        )
    return torch


def require_onnxruntime_provider(provider: str):
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise MissingDependencyError(
            f"ONNX Runtime provider {provider} is not available (have: {', '.join(available)}); "
            "install it with `pip install vlcompress[gpu]`."
        )
    return ort
