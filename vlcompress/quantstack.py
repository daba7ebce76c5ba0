"""Quantization on top of sparsity, inside a run: the quantized variants, their accuracy, their
latency, and the search for the lowest structured sparsity that meets a latency budget.

    q = quantize_variants(vlm, {"dense": dense_export.paths, "pruned": pruned_export.paths},
                          calib, "int8", "static", root)        # dense_int8/, pruned_int8/
    emb = onnx_embed_eval(vlm, q["pruned"], eval_data)           # accuracy of what ships
    best = search_sparsity(2.5, measure)                          # --target-speedup

The quantized files are what a user deploys, so their accuracy is measured on them (ONNX
Runtime CPU over the eval pairs), not on a PyTorch stand-in. On a TensorRT run the files are
explicit QDQ for TensorRT (``target="tensorrt"``: symmetric int8, or fp8 e4m3), quantized from
an fp32 export (the run's own ONNX is fp16 there), and timed as TensorRT engines on the
``tensorrt/cuda/<int8|fp8>`` entries; their accuracy is still measured on ONNX Runtime CPU from
the same QDQ files (fp8 with graph optimisation BASIC:
:func:`vlcompress.runtime.ort_runner.ort_optimization`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, VlcError

#: structured sparsities ``--target-speedup`` may choose from (kept counts are rounded anyway)
SEARCH_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: most candidates one search measures (the final pruning is timed fully afterwards)
MAX_CANDIDATES = 6
#: calibration pairs for static quantization (activation ranges), at most
QUANT_CALIBRATION_PAIRS = 64


class TargetUnreachableError(VlcError):
    """``--target-speedup`` cannot be met on this runtime (the message says the best reached)."""


def check_target_speedup(value) -> float | None:
    """``None`` or a float > 1 (ConfigError naming the value otherwise)."""
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--target-speedup {value!r} is not a number; allowed: a number > 1, "
                          "e.g. 2.5") from None
    if isinstance(value, bool) or not math.isfinite(x) or x <= 1:
        raise ConfigError(f"--target-speedup {value!r} is not valid; allowed: a number > 1 "
                          "(a speedup over the dense model), e.g. 2.5")
    return x


def calibration_feeds(vlm, tower: str, calib, max_pairs: int = QUANT_CALIBRATION_PAIRS,
                      batch: int = 8) -> list[dict]:
    """The first ``max_pairs`` calibration pairs as ``tower`` feeds of ``batch`` pairs."""
    from .data.pairs import PairBatch
    from .runtime.latency import make_feeds

    feeds, n = [], 0
    for b in calib.batches():
        for i in range(0, len(b), batch):
            if n >= max_pairs:
                return feeds
            labels = None if b.labels is None else b.labels[i:i + batch]
            sub = PairBatch(b.images[i:i + batch] if b.images is not None else None,
                            b.captions[i:i + batch], labels)
            feeds.append(make_feeds(vlm, [tower], [len(sub)], sub)[(tower, len(sub))])
            n += len(sub)
    return feeds


def quantize_variants(vlm, exports: dict[str, dict[str, Path]], calib, quantize: str,
                      method: str, root: Path, progress=None, target: str = "onnxruntime"
                      ) -> tuple[dict, dict]:
    """Quantize each variant's ONNX towers into ``root/<variant>_<quantize>/<tower>.onnx``.

    Static int8 is calibrated on the run's calibration pairs (each tower on its own inputs).
    ``target``: the runtime the files are for (:func:`..exporters.quantize.quantize_target`).
    Returns (variant -> tower -> path, variant -> tower -> QuantizeResult dict)."""
    from .exporters.quantize import quantize_onnx

    paths, info = {}, {}
    feeds_cache: dict[str, list] = {}
    for variant, towers in exports.items():
        paths[variant], info[variant] = {}, {}
        for tower, src in towers.items():
            feeds = None
            if quantize in ("int8", "fp8") and method == "static":
                if tower not in feeds_cache:
                    feeds_cache[tower] = calibration_feeds(vlm, tower, calib)
                feeds = feeds_cache[tower]
            dst = Path(root) / f"{variant}_{quantize}" / f"{tower}.onnx"
            res = quantize_onnx(src, dst, quantize, calibration=feeds, method=method,
                                target=target)
            paths[variant][tower] = dst
            info[variant][tower] = {**res.to_dict(), "path": f"{variant}_{quantize}/{tower}.onnx"}
    return paths, info


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


# --------------------------------------------------------------------------------------------
# --target-speedup: the measured search
# --------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    sparsity: float
    speedup: float
    fidelity: float | None = None
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"sparsity": self.sparsity, "speedup": round(self.speedup, 4),
                "fidelity": None if self.fidelity is None else round(self.fidelity, 5),
                **self.detail}


@dataclass
class SearchResult:
    target: float
    sparsity: float
    candidates: list[Candidate]

    def to_dict(self) -> dict:
        return {"target_speedup": self.target, "chosen_sparsity": self.sparsity,
                "candidates": [c.to_dict() for c in self.candidates]}


def search_sparsity(target: float, measure: Callable[[float], Candidate],
                    grid: Sequence[float] = SEARCH_GRID, max_candidates: int = MAX_CANDIDATES
                    ) -> SearchResult:
    """The lowest sparsity of ``grid`` whose measured speedup reaches ``target``.

    ``measure(s)`` prunes a copy to ``s`` and times it briefly against dense. The highest
    grid point is measured first: when even it misses the target the search stops with
    :class:`TargetUnreachableError` naming the best speedup reached. Then a bisection over the
    grid (speedup assumed to grow with sparsity), at most ``max_candidates`` measurements in
    all; timing noise can make it non-monotone, in which case the lowest sparsity measured to
    reach the target wins."""
    target = check_target_speedup(target)
    grid = sorted(set(float(g) for g in grid))
    if not grid or max_candidates < 1:
        raise ConfigError("the sparsity search needs a grid and at least one candidate")
    seen: dict[float, Candidate] = {}

    def run(s: float) -> Candidate:
        if s not in seen:
            seen[s] = measure(s)
        return seen[s]

    top = run(grid[-1])
    if top.speedup < target:
        best = max(seen.values(), key=lambda c: c.speedup)
        raise TargetUnreachableError(
            f"--target-speedup {target:g} is out of reach: the best reached is "
            f"{best.speedup:.2f}x at structured sparsity {best.sparsity:g} (the highest tried); "
            "allowed: a target up to about that speedup on this runtime and batch size")
    lo, hi = -1, len(grid) - 1  # grid[hi] reaches the target; grid[lo] (if >= 0) does not
    while hi - lo > 1 and len(seen) < max_candidates:
        mid = (lo + hi) // 2
        if run(grid[mid]).speedup >= target:
            hi = mid
        else:
            lo = mid
    ok = [c for c in seen.values() if c.speedup >= target]
    chosen = min(ok, key=lambda c: c.sparsity)
    return SearchResult(target, chosen.sparsity, sorted(seen.values(), key=lambda c: c.sparsity))


# --------------------------------------------------------------------------------------------
# inside prune_export
# --------------------------------------------------------------------------------------------
def _feeds(cfg, vlm, towers, example, batch_sizes=None):
    from .runtime.latency import make_feeds

    return make_feeds(vlm, towers, batch_sizes or cfg.latency_config.batch_sizes, example)


def _fidelity(dense_emb, emb) -> dict:
    from .eval import fidelity

    return fidelity(dense_emb, emb) if (dense_emb is not None and emb is not None) else {}


def quantized_runtime(rt, quantize: str):
    """The registry entry the ``<variant>_<quantize>`` files run on: ``tensorrt/cuda/<q>`` for a
    TensorRT run (engines from the QDQ files), the runtime's fp16 entry for fp16, else the
    run's own entry (ONNX Runtime runs QDQ int8 on its fp32 entry)."""
    from .runtime.registry import get_runtime

    if rt.name == "tensorrt":
        return get_runtime(rt.name, rt.device, quantize)
    return get_runtime(rt.name, rt.device, "fp16") if quantize == "fp16" else rt


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


def quantized_section(cfg, vlm, calib, dense_export, pruned_export, dense_emb, eval_data,
                      example, root: Path, progress, sources: dict | None = None):
    """Quantize dense and pruned, evaluate the four variants from their ONNX files, time them
    interleaved on the run's runtime. Returns (report["quantize"], latency rows).

    What each variant is built from:

    - ``dense`` / ``pruned``: the run's exports (``dense/``, ``pruned/``; fp16 ONNX on a
      TensorRT run, timed as fp16 engines built there);
    - ``dense_<q>`` / ``pruned_<q>``: ``quantize_onnx`` of ``sources`` (variant -> tower ->
      fp32 ONNX; default: the run's exports, which must then be fp32), written to
      ``<variant>_<q>/`` for the run's runtime (:func:`..exporters.quantize.quantize_target`:
      explicit QDQ for TensorRT) and timed on :func:`quantized_runtime` (TensorRT: engines
      built from the QDQ files in ``<variant>_<q>/``, 2:4 sparse weights for ``pruned_<q>``
      of a 2:4 run).

    Accuracy of all four is measured from their ONNX files on ONNX Runtime CPU."""
    from dataclasses import replace

    from .eval import metrics_from_embeddings
    from .exporters.quantize import quantize_target
    from .progress import NULL
    from .runtime.registry import Artefacts
    from .runtime.timing import time_variants

    progress = progress or NULL
    q = cfg.quantize
    lc = cfg.latency_config
    rt = lc.runtime_entry
    target = quantize_target(rt)
    exports = {"dense": dict(dense_export.paths), "pruned": dict(pruned_export.paths)}
    srcs = {k: dict(v) for k, v in (sources or exports).items()}
    paths, info = quantize_variants(vlm, srcs, calib, q, cfg.quantize_method, root, progress,
                                    target=target)
    acc = None
    if eval_data is not None:
        embs, unmeasured = {}, {}
        for variant, ps in [("dense", exports["dense"]), ("pruned", exports["pruned"]),
                            (f"dense_{q}", paths["dense"]), (f"pruned_{q}", paths["pruned"])]:
            try:
                embs[variant] = onnx_embed_eval(vlm, ps, eval_data)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
                if q != "fp8" or variant in ("dense", "pruned"):
                    raise
                import onnxruntime

                msg = " ".join(str(exc).split())[:200]
                unmeasured[variant] = (f"fp8 accuracy not measured: onnxruntime "
                                       f"{onnxruntime.__version__} CPU cannot run the fp8 QDQ "
                                       f"files ({msg})")
        if all(e is not None for e in embs.values()):
            preset = vlm.source.startswith("preset:")
            # fidelity: to the dense PyTorch model's embeddings
            acc = {"dataset": getattr(eval_data, "source", ""), "measured_on": "ONNX Runtime CPU",
                   "variants": {k: {"metrics": {} if preset else metrics_from_embeddings(e),
                                    "fidelity": _fidelity(dense_emb, e)}
                                for k, e in embs.items()}}
            for k, why in unmeasured.items():  # said, not skipped
                acc["variants"][k] = {"not_measured": why}
            if q == "fp8" and not unmeasured:
                acc["note"] = ("fp8 variants measured from their fp8 QDQ files on ONNX Runtime "
                               "CPU at graph optimisation BASIC (each Q/DQ pair's e4m3 rounding "
                               "computed as written), not on the TensorRT engine")
        else:
            acc = {"note": f"{vlm.family}: accuracy of quantized files needs the ITM fusion "
                           "tower; not measured"}
    qrt = quantized_runtime(rt, q)
    towers = [t for t in vlm.towers if t in pruned_export.paths]
    feeds = _feeds(cfg, vlm, towers, example)
    pruned_names = pruned_layer_names(vlm)
    variants = {
        "dense": (rt, Artefacts("dense", onnx=exports["dense"], folder=root / "dense")),
        f"dense_{q}": (qrt, Artefacts(f"dense_{q}", onnx=paths["dense"],
                                      folder=root / f"dense_{q}")),
        "pruned": (rt, Artefacts("pruned", onnx=exports["pruned"], folder=root / "pruned",
                                 pruned_layers=pruned_names)),
        f"pruned_{q}": (qrt, Artefacts(f"pruned_{q}", onnx=paths["pruned"],
                                       folder=root / f"pruned_{q}", pruned_layers=pruned_names)),
    }
    opts = run_build_options(cfg, vlm, feeds, towers, root)
    rows = time_variants(variants, feeds, replace(lc, towers=tuple(towers)), towers=towers,
                         options=opts, progress=progress)
    for row in rows:
        v = row["variants"]
        row["quantize"] = q
        row["gain_over_quantized"] = v[f"dense_{q}"]["ms"]["p50"] / v[f"pruned_{q}"]["ms"]["p50"]
    built_from = ("the run's ONNX (dense/, pruned/)" if sources is None else
                  "an fp32 export of each variant made for quantizing (not kept: the run's own "
                  "ONNX is fp16)")
    return {"quantize": q, "method": cfg.quantize_method, "target": target,
            "runtime": qrt.label, "quantized_from": built_from, "files": info,
            "nm_survives": _nm_check(cfg, srcs["pruned"], paths["pruned"]),
            "accuracy": acc}, rows


def _nm_check(cfg, float_paths, quant_paths):
    """For an N:M run: the weights that are N:M in the float file but not in the quantized
    one (empty = the pattern survived), per tower."""
    pat = cfg.prune_config.pattern
    if not getattr(pat, "is_nm", False) or cfg.quantize not in ("int8", "fp8"):
        return None
    from .exporters.onnx import check_nm
    from .exporters.quantize import check_nm_quantized

    n, m = pat.n, pat.m
    return {t: sorted(set(check_nm_quantized(quant_paths[t], n, m)) - set(check_nm(p, n, m)))
            for t, p in float_paths.items()}


def allowed_grid(vlm, cfg, grid: Sequence[float] = SEARCH_GRID) -> list[float]:
    """The sparsities of ``grid`` this model can take structurally with the run's units,
    rounding and depth (a grid point that would remove every head of a layer is dropped:
    e.g. 0.8 of a 4-head layer); ConfigError when none is left."""
    from .config import PruneConfig
    from .errors import PatternError
    from .sparsity.structured import check_structured

    pc = cfg.prune_config
    ok = []
    for s in grid:
        try:
            check_structured(vlm, PruneConfig(method=pc.method, sparsity=s, pattern="structured",
                                              scope=pc.scope, units=pc.units,
                                              round_to=pc.round_to, depth=pc.depth))
        except (PatternError, ConfigError):
            continue
        ok.append(s)
    if not ok:
        raise ConfigError(f"--target-speedup: no structured sparsity of {list(grid)} fits "
                          f"{vlm.family} with --units {','.join(pc.units)}; allowed: another "
                          "--units or --depth")
    return ok


def run_search(cfg, vlm, calib, train, dense_export, dense_emb, eval_data, example, check,
               work: Path, progress) -> SearchResult:
    """``--target-speedup``: prune copies of the dense model to grid sparsities, export (and
    quantize) each, time it briefly against dense at the largest batch size on the run's
    runtime (all towers summed), and bisect (:func:`search_sparsity`).

    A candidate is exported like the run's own ONNX (fp16 where the run is, e.g. TensorRT),
    or, with ``--quantize``, exported fp32 and quantized for the run's runtime
    (:func:`..exporters.quantize.quantize_target`) and timed on :func:`quantized_runtime`
    (TensorRT: engines built from its QDQ files); the dense reference is the run's dense
    export, its TensorRT engines built in ``work/dense`` (one profile, for the search only)."""
    import shutil
    from dataclasses import replace

    from .exporters.onnx import export_model
    from .exporters.quantize import quantize_target
    from .prune import prune
    from .runtime.registry import ENGINE, MODEL, Artefacts, BuildOptions
    from .runtime.timing import time_variants

    lc = cfg.latency_config
    rt = lc.runtime_entry
    q = cfg.quantize
    qrt = quantized_runtime(rt, q) if q != "none" else rt
    batch = max(lc.batch_sizes)
    towers = [t for t in vlm.towers if t in dense_export.paths or rt.consumes == MODEL]
    feeds = _feeds(cfg, vlm, towers, example, (batch,))
    brief = replace(lc, batch_sizes=(batch,), warmup=1, iterations=max(3, lc.iterations // 5),
                    towers=tuple(towers))
    dense_art = Artefacts("dense", vlm=copy.deepcopy(vlm) if rt.consumes == MODEL else None,
                          onnx=dict(dense_export.paths), folder=Path(work) / "dense")
    if rt.consumes == ENGINE:  # engines are written into an existing folder
        dense_art.folder.mkdir(parents=True, exist_ok=True)
    opts = BuildOptions(threads=lc.threads, batch_sizes=(batch,),
                        seq_len=getattr(vlm, "text_max_length", None),
                        timing_cache=Path(work) / "timing.cache")
    pc = cfg.prune_config

    def measure(s: float) -> Candidate:
        v = copy.deepcopy(vlm)
        prune(v, cfg.method, s, "structured", calibration=calib, train=train, scope=cfg.scope,
              seed=cfg.seed, units=pc.units, round_to=pc.round_to, depth=pc.depth)
        folder = Path(work) / f"s{s:g}"
        paths = {}
        if rt.consumes != MODEL:
            paths = dict(export_model(v, folder, example, check, towers=towers,
                                      fp16=cfg.onnx_fp16 and q == "none").paths)
            if q != "none":
                paths, _ = quantize_variants(v, {"c": paths}, calib, q, cfg.quantize_method,
                                             folder, target=quantize_target(rt))
                paths = paths["c"]
        art = Artefacts("candidate", vlm=v if rt.consumes == MODEL else None, onnx=paths,
                        folder=folder)
        rows = time_variants({"dense": (rt, dense_art), "candidate": (qrt, art)},
                             feeds, brief, towers=towers, options=opts)
        d = sum(r["variants"]["dense"]["ms"]["p50"] for r in rows)
        c = sum(r["variants"]["candidate"]["ms"]["p50"] for r in rows)
        fid = None
        if dense_emb is not None and eval_data is not None:
            emb = onnx_embed_eval(v, paths, eval_data) if paths else None
            if emb is None:
                from .eval import embed_eval

                emb = embed_eval(v, eval_data)
            f = _fidelity(dense_emb, emb)
            fid = min(f.values()) if f else None
        shutil.rmtree(folder, ignore_errors=True)
        return Candidate(s, d / c if c > 0 else float("nan"), fid,
                         {"batch": batch, "dense_ms": round(d, 3), "candidate_ms": round(c, 3),
                          "quantize": q, "iterations": brief.iterations})

    grid = allowed_grid(vlm, cfg)
    try:
        return search_sparsity(cfg.target_speedup, measure, grid)
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = ["SEARCH_GRID", "MAX_CANDIDATES", "TargetUnreachableError", "check_target_speedup",
           "calibration_feeds", "quantize_variants", "onnx_vlm", "onnx_embed_eval", "Candidate",
           "SearchResult", "search_sparsity", "allowed_grid", "quantized_section", "run_search",
           "quantized_runtime", "pruned_layer_names"]
