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


#: how to get the CUDA execution provider (docs/runtimes.md "GPU install"; scripts/install_ort_gpu.sh)
ORT_GPU_STEPS = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.18' "
                 "(one package: onnxruntime and onnxruntime-gpu both install the module "
                 "`onnxruntime`, and together the CPU build wins)")


def onnxruntime_distributions() -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` module."""
    from importlib import metadata

    names = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
             "ort-nightly", "ort-nightly-gpu")
    found = []
    for n in names:
        try:
            metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
        found.append(n)
    return found


def onnxruntime_clash(dists: list[str] | None = None) -> str | None:
    """One sentence when several onnxruntime packages share the ``onnxruntime`` module (the
    CPU wheel then shadows the GPU one and only the CPU provider remains), else None."""
    dists = onnxruntime_distributions() if dists is None else dists
    if len(dists) < 2:
        return None
    return (f"{' and '.join(dists)} are both installed and share the module `onnxruntime`, so "
            f"only one build's providers remain; keep one: {ORT_GPU_STEPS}.")


def require_onnxruntime_provider(provider: str):
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        clash = onnxruntime_clash()
        how = clash or f"for the CUDA and TensorRT providers: {ORT_GPU_STEPS}."
        raise MissingDependencyError(
            f"ONNX Runtime provider {provider} is not available (have: {', '.join(available)}); "
            + how)
    return ort


def require_onnxruntime_genai():
    """ONNX Runtime GenAI (the ``[genai]`` extra): a second generation runtime for generative
    exports (:mod:`vlcompress.runtime.genai_generate`)."""
    try:
        import onnxruntime_genai as og  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime-genai is not installed: install it with "
                                     "`pip install vlcompress[genai]`.") from exc
    return og


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


def check_onnxruntime_gpu(provider: str = "CUDAExecutionProvider") -> str:
    """The GPU install check (scripts/install_ort_gpu.sh runs it): one onnxruntime package, the
    provider available, and a session on it that really runs there (onnxruntime falls back
    to CPU when the provider's libraries fail to load). Returns a one-line summary; raises
    :class:`MissingDependencyError` (one sentence) otherwise."""
    clash = onnxruntime_clash()
    if clash:
        raise MissingDependencyError(clash)
    ort = require_onnxruntime_provider(provider)
    import numpy as np
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "check",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=[provider, "CPUExecutionProvider"])
    got = sess.get_providers()[0]
    if got != provider:
        raise MissingDependencyError(
            f"onnxruntime {ort.__version__} lists {provider} but a session runs on {got}: the "
            "provider's CUDA/cuDNN libraries failed to load (see onnxruntime's requirements "
            "for this version).")
    y = sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0]
    if y.tolist() != [0.0, 2.0]:
        raise MissingDependencyError(f"onnxruntime {provider} computed {y.tolist()} for "
                                     "Relu([-1, 2])")
    return (f"onnxruntime {ort.__version__} ({', '.join(onnxruntime_distributions())}): "
            f"{provider} runs")



def require_accelerate():
    """accelerate's big-model tools (``init_empty_weights``, ``set_module_tensor_to_device``),
    which disk offload (``vlcompress.offload``) is built on."""
    try:
        import accelerate  # noqa: PLC0415
        import accelerate.utils  # noqa: F401, PLC0415
    except ImportError as exc:
        raise MissingDependencyError(
            "accelerate is not installed: disk offload needs it (`pip install vlcompress[big]`)."
        ) from exc
    return accelerate
