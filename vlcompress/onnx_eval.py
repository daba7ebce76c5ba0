"""The ONNX evaluation view: a model whose towers run from ONNX files on ONNX Runtime CPU, so
the accuracy of what ships (float or quantized ONNX) is measured on the files themselves, not
on a PyTorch stand-in.

    emb = onnx_embed_eval(vlm, {"vision": Path("pruned_int8/vision.onnx"), ...}, eval_data)

fp8 QDQ files run at graph optimisation BASIC
(:func:`vlcompress.runtime.ort_runner.ort_optimization`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class _OnnxSession:
    """One tower file on ONNX Runtime CPU (fp8 QDQ at graph optimisation BASIC: see
    :func:`vlcompress.runtime.ort_runner.ort_optimization`)."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        from .runtime.ort_runner import ort_optimization

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if ort_optimization(path) == "basic":
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]

    def __call__(self, inputs: dict):
        import torch

        feed = {n: np.ascontiguousarray(inputs[n].detach().cpu().numpy()) for n in self.names}
        return torch.from_numpy(np.asarray(self.sess.run(None, feed)[0], dtype=np.float32))


def onnx_vlm(vlm, paths: dict[str, Path]):
    """A view of ``vlm`` whose ``embed_images`` / ``embed_texts`` run the ONNX towers in
    ``paths`` (ONNX Runtime CPU); None when the family's evaluation needs more than the
    vision and text towers (BLIP's ITM fusion tower)."""
    if set(getattr(vlm, "towers", ())) - {"vision", "text"}:
        return None
    sessions = {t: _OnnxSession(p) for t, p in paths.items()}
    base = type(vlm)

    class _Onnx(base):  # same tokenizer / processor; only the towers run in ONNX Runtime
        def embed_images(self, images):
            if "vision" not in sessions:
                return base.embed_images(vlm, images)
            return sessions["vision"](self.tower_inputs("vision", _batch(images, None)))

        def embed_texts(self, texts):
            if "text" not in sessions:
                return base.embed_texts(vlm, texts)
            return sessions["text"](self.tower_inputs("text", _batch(None, texts)))

    view = object.__new__(_Onnx)
    view.__dict__.update(vlm.__dict__)
    return view


def _batch(images, texts):
    from .data.pairs import PairBatch

    n = len(images) if images is not None else len(texts)
    return PairBatch(list(images) if images is not None else [None] * n,
                     list(texts) if texts is not None else [""] * n)


def onnx_embed_eval(vlm, paths: dict[str, Path], data, progress=None):
    """:func:`vlcompress.eval.embed_eval` with the towers run from ``paths``; None when the
    family cannot be evaluated that way (see :func:`onnx_vlm`)."""
    from .eval import embed_eval
    from .progress import NULL

    view = onnx_vlm(vlm, paths)
    if view is None:
        return None
    return embed_eval(view, data, progress or NULL, itm=False)


__all__ = ["onnx_vlm", "onnx_embed_eval"]
