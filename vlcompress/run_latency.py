"""The latency step of a ``prune_export`` run: its timing inputs, its runtime build options, and
dense vs pruned timed interleaved on the run's runtime.

    rows = time_dense_pruned(cfg, vlm, dense_model, dense_export, pruned_export, example,
                             progress, root)
"""

from __future__ import annotations

from pathlib import Path


def run_feeds(cfg, vlm, towers, example, batch_sizes=None):
    """Each tower's inputs at each of the run's batch sizes (or ``batch_sizes``), built from
    ``example`` (the first calibration pairs)."""
    from .runtime.latency import make_feeds

    return make_feeds(vlm, towers, batch_sizes or cfg.latency_config.batch_sizes, example)


def pruned_layer_names(vlm) -> list[str]:
    """Names of the prunable layers holding zeros (TensorRT's 2:4 pre-check reads these)."""
    return [ly.name for ly in vlm.prunable_layers() if bool((ly.module.weight == 0).any())]


def run_build_options(cfg, vlm, feeds, towers, root: Path):
    """The runtime build options of a ``prune_export`` run: its threads, batch sizes and
    pattern, the tokenizer's length, each tower's smallest-batch feed to check engines on and
    one timing cache in the run folder ``root``."""
    from .runtime.registry import BuildOptions

    lc = cfg.latency_config
    first = min(lc.batch_sizes)
    return BuildOptions(threads=lc.threads, batch_sizes=lc.batch_sizes,
                        pattern=str(cfg.prune_config.pattern),
                        seq_len=getattr(vlm, "text_max_length", None),
                        check_feeds={t: feeds[(t, first)] for t in towers},
                        timing_cache=root / "timing.cache")



def time_dense_pruned(cfg, vlm, dense_model, dense_export, pruned_export, example, progress,
                      root):
    """Dense vs pruned latency of every tower on the run's runtime, interleaved in one
    process (:func:`vlcompress.runtime.time_models`). TensorRT engines are built from the
    fp16 ONNX next to it (``<dense|pruned>/<tower>.engine``, one timing cache; 2:4 sparse
    weights for a 2:4 pattern), each validated against its ONNX."""
    from .runtime.registry import MODEL, Artefacts
    from .runtime.timing import time_models

    lc = cfg.latency_config
    rt = lc.runtime_entry
    towers = [t for t in vlm.towers if t in pruned_export.paths or rt.consumes == MODEL]
    feeds = run_feeds(cfg, vlm, towers, example)
    dense_vlm = (type(vlm)(dense_model, vlm.tokenizer, vlm.image_processor, name=vlm.name)
                 if dense_model is not None else None)
    dense = Artefacts("dense", vlm=dense_vlm, onnx=dict(dense_export.paths), folder=root / "dense")
    pruned = Artefacts("pruned", vlm=vlm if rt.consumes == MODEL else None,
                       onnx=dict(pruned_export.paths), folder=root / "pruned",
                       pruned_layers=pruned_layer_names(vlm))
    opts = run_build_options(cfg, vlm, feeds, towers, root)
    return time_models(rt, dense, pruned, feeds, lc, towers=towers, options=opts,
                       progress=progress)


__all__ = ["run_feeds", "pruned_layer_names", "run_build_options", "time_dense_pruned"]
