"""``--target-speedup``: the measured search for the lowest structured sparsity that meets a
latency budget on the run's runtime, and the final verdict from the run's full timing.

    best = search_sparsity(2.5, measure)     # measure(s) -> Candidate (brief timing)
    final_speedup(latency, "none", 2.5)      # the full timing of the chosen pruning
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, VlcError

#: structured sparsities ``--target-speedup`` may choose from (kept counts are rounded anyway)
SEARCH_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: most candidates one search measures (the final pruning is timed fully afterwards)
MAX_CANDIDATES = 6


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
    from .onnx_eval import onnx_embed_eval
    from .prune import prune
    from .quantized_variants import fidelity_to_dense, quantize_variants, quantized_runtime
    from .run_latency import run_feeds
    from .runtime.registry import ENGINE, MODEL, Artefacts, BuildOptions
    from .runtime.timing import time_variants

    lc = cfg.latency_config
    rt = lc.runtime_entry
    q = cfg.quantize
    qrt = quantized_runtime(rt, q) if q != "none" else rt
    batch = max(lc.batch_sizes)
    towers = [t for t in vlm.towers if t in dense_export.paths or rt.consumes == MODEL]
    feeds = run_feeds(cfg, vlm, towers, example, (batch,))
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
            f = fidelity_to_dense(dense_emb, emb)
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


def final_speedup(latency: list[dict], quantize: str, target: float) -> dict:
    """The chosen sparsity's speedup in the run's full timing (the search times each candidate
    briefly): at the largest batch, p50 summed over towers, dense over the deployed variant
    (``pruned_<q>`` when quantized), and whether it still reaches ``target``."""
    if not latency:
        return {}
    batch = max(r["batch"] for r in latency)
    rows = [r for r in latency if r["batch"] == batch]
    key = f"pruned_{quantize}" if quantize != "none" else "pruned"
    try:
        dense = sum(r["variants"]["dense"]["ms"]["p50"] if "variants" in r else r["dense_ms"]["p50"]
                    for r in rows)
        got = sum(r["variants"][key]["ms"]["p50"] if "variants" in r else r["pruned_ms"]["p50"]
                  for r in rows)
    except KeyError:
        return {}
    speedup = dense / got if got > 0 else float("nan")
    return {"final": {"batch": batch, "variant": key, "speedup": round(speedup, 4),
                      "reached": bool(speedup >= target)}}


__all__ = ["SEARCH_GRID", "MAX_CANDIDATES", "TargetUnreachableError", "check_target_speedup",
           "Candidate", "SearchResult", "search_sparsity", "allowed_grid", "run_search",
           "final_speedup"]
