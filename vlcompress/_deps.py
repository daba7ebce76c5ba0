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


_SERVE_HINT = "install it with `pip install vlcompress[serve]` (nvidia-pytriton, tritonclient[http])"


def require_tritonserver():
    """The ``tritonserver`` binary of the ``nvidia-pytriton`` wheel: (its ``tritonserver``
    folder, the wheel's shared-library folder). The wheel is not imported (its Python API is
    not used, and it pins numpy < 2); only its files are located."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("pytriton")
    root = Path(next(iter(spec.submodule_search_locations))) if spec and \
        spec.submodule_search_locations else None
    if root is None or not (root / "tritonserver" / "bin" / "tritonserver").is_file():
        raise MissingDependencyError(f"The Triton server (nvidia-pytriton) is not installed: {_SERVE_HINT}.")
    return root / "tritonserver", root.parent / "nvidia_pytriton.libs"


def require_tritonclient_http():
    try:
        import tritonclient.http as httpclient  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError(f"tritonclient[http] is not installed: {_SERVE_HINT}.") from exc
    return httpclient


def triton_model_config_pb2():
    """Triton's own ModelConfig protobuf module (shipped in the tritonclient wheel), loaded
    from its file so that the grpc extra is not needed."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"tritonclient is not installed: {_SERVE_HINT}.")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    name = "_vlcompress_triton_model_config_pb2"
    import sys

    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod
