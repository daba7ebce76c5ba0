"""The runner protocol (as in Polygraphy): activate once, infer many times, deactivate.

    with OrtRunner("vision.onnx") as runner:
        outputs = runner.infer({"pixel_values": x})   # dict[str, np.ndarray]

A runner only runs; latency is measured outside it, by :mod:`vlcompress.runtime.latency`.
"""

from __future__ import annotations

import numpy as np


class InactiveRunnerError(RuntimeError):
    """``infer`` was called on a runner that is not active (outside its ``with`` block)."""


class Runner:
    """Base runner. Subclasses implement ``_activate``, ``_infer`` and ``_deactivate``.

    ``name`` labels the runner in reports; ``device`` is ``"cpu"`` or ``"cuda"``;
    ``runtime`` names the backend (``"torch"``, ``"onnxruntime"``, ...).
    """

    runtime: str = "?"

    def __init__(self, name: str | None = None, device: str = "cpu"):
        self.name = name or type(self).__name__
        self.device = device
        self._active = False

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> None:
        if self._active:
            raise RuntimeError(f"runner {self.name!r} is already active")
        self._activate()
        self._active = True

    def deactivate(self) -> None:
        if not self._active:
            return
        try:
            self._deactivate()
        finally:
            self._active = False

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # --- inference ---------------------------------------------------------------------------
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on ``feed`` (input name -> array); return output name -> array."""
        if not self._active:
            raise InactiveRunnerError(
                f"runner {self.name!r} is not active: use it inside `with runner:` "
                "(or call runner.activate() first)"
            )
        return self._infer(feed)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU)."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def describe(self) -> dict:
        """What actually ran, for the latency rows: at least ``provider`` (the backend used)
        and ``precision``; subclasses add what they know (call after the runner has run)."""
        return {"provider": self.runtime, "precision": getattr(self, "precision", None)}

    # --- to implement ------------------------------------------------------------------------
    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"{type(self).__name__}(name={self.name!r}, device={self.device!r}, {state})"
