"""A runner for an ``nn.Module`` (e.g. ``vlm.tower_module("vision")``)."""

from __future__ import annotations

import numpy as np
import torch

from ..optional_deps import require_cuda
from .base import Runner
from .registry import MODEL, Built, register
from .registry import Runtime as _Runtime


class TorchRunner(Runner):
    """Runs ``module(**{name: tensor})`` under ``torch.no_grad``.

    ``input_names`` picks (and orders) the entries of each feed passed to the module as
    keyword arguments; numpy arrays become tensors on ``device``. The module is moved to
    ``device`` on activation and moved back where it was on deactivation (a tower module
    shares its weights with the VLM). Outputs: a tensor becomes ``{output_names[0]: array}``,
    a tuple/list is named in order, a dict (or HF ``ModelOutput``) keeps its keys. On CUDA
    the runner synchronises before returning.
    """

    runtime = "torch"

    def __init__(self, module: torch.nn.Module, input_names, device: str = "cpu",
                 name: str | None = None, output_names=("embeds",)):
        super().__init__(name or f"torch-{device}", device)
        self.module = module
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._home: torch.device | None = None

    precision = "fp32"

    def describe(self) -> dict:
        from .graphs import attn_implementation

        return {"provider": f"torch {torch.__version__} ({self.device})",
                "precision": self.precision,
                "attn_implementation": attn_implementation(self.module)}

    def _activate(self) -> None:
        if self.device.startswith("cuda"):
            require_cuda()
        self._torch_device = torch.device(self.device)
        p = next(self.module.parameters(), None)
        self._home = p.device if p is not None else None
        if self._home is not None and self._home != self._torch_device:
            self.module.to(self._torch_device)
        self.module.eval()

    def _deactivate(self) -> None:
        if self._home is not None and self._home != self._torch_device:
            self.module.to(self._home)
        self._home = None

    def _infer(self, feed):
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise KeyError(f"feed lacks input(s) {', '.join(missing)} for runner {self.name!r}")
        dev = self._torch_device
        args = {n: torch.as_tensor(np.asarray(feed[n])).to(dev, non_blocking=True)
                for n in self.input_names}
        with torch.no_grad():
            out = self.module(**args)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return self._name_outputs(out)

    def _name_outputs(self, out) -> dict[str, np.ndarray]:
        if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # HF ModelOutput
            out = dict(out.items())
        if isinstance(out, torch.Tensor):
            return {self.output_names[0]: _np(out)}
        if isinstance(out, dict):
            return {k: _np(v) for k, v in out.items() if isinstance(v, torch.Tensor)}
        if isinstance(out, (tuple, list)):
            names = self.output_names + [f"output_{i}" for i in range(len(self.output_names),
                                                                         len(out))]
            return {n: _np(v) for n, v in zip(names, out, strict=False) if isinstance(v, torch.Tensor)}
        raise TypeError(f"runner {self.name!r}: module returned {type(out).__name__}")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def tower_input_names(vlm, tower: str) -> list[str]:
    """The keyword arguments of ``vlm.tower_module(tower).forward``, in order."""
    import inspect

    sig = inspect.signature(vlm.tower_module(tower).forward)
    return [n for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _torch_factory(device: str):
    def factory(art, towers, opts):
        vlm = art.vlm
        return Built({t: TorchRunner(vlm.tower_module(t), tower_input_names(vlm, t), device=device,
                                     name=f"torch-{device}-{art.variant}") for t in towers})

    return factory


def _no_check():
    return None


def _check_cuda():
    from .. import optional_deps

    return optional_deps.require_cuda()


register(_Runtime("torch", "cpu", "fp32", MODEL, _torch_factory("cpu"), _no_check,
                  description="PyTorch eager, CPU"))
register(_Runtime("torch", "cuda", "fp32", MODEL, _torch_factory("cuda"), _check_cuda,
                  description="PyTorch eager, CUDA, fp32"))
