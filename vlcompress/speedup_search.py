"""``--target-speedup``: the measured search for the lowest structured sparsity that meets a
latency budget on the run's runtime, and the final verdict from the run's full timing.

    best = search_sparsity(2.5, measure, confirm=full)   # brief timings, then a full one
    final_speedup(latency, "none", 2.5)                  # the run's own timing, judged again
    print("\n".join(search_lines(report["target_speedup"])))

Every speedup is judged by its bootstrap interval (:data:`CONFIDENCE`, two-sided; the
iterations of each tower resampled with dense and candidate paired), not by its point: a
candidate reaches the target when the interval's lower end does. The search bisects over brief
timings, then times its choice fully (the run's iterations, at the largest batch size) and,
when that misses, steps to the next sparsity of the grid, so a brief timing that was optimistic
does not decide. The run's own full timing of the shipped model is judged once more
(:func:`final_speedup`); when it misses, ``prune-export`` writes the run, says so on the
terminal and exits 1, like a broken gate.
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
#: most candidates one search measures briefly (its choice is then timed fully)
MAX_CANDIDATES = 6
#: confidence of the speedup intervals the search and the final verdict judge by
CONFIDENCE = 0.95
#: bootstrap replicates of a speedup interval
BOOTSTRAP = 2000


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


def speedup_interval(pairs, confidence: float = CONFIDENCE, n: int = BOOTSTRAP, seed: int = 0
                     ) -> tuple[float, float, float]:
    """Speedup ``sum(p50 dense) / sum(p50 candidate)`` over towers and its two-sided bootstrap
    interval at ``confidence``. ``pairs``: per tower ``(dense_ms, candidate_ms)`` samples, timed
    interleaved (resampled together when of equal length, as :func:`..gate.paired_bootstrap`)."""
    rng = np.random.default_rng(seed)
    d_sum, c_sum = np.zeros(n), np.zeros(n)
    d_pt = c_pt = 0.0
    for d, c in pairs:
        d, c = np.asarray(d, dtype=np.float64), np.asarray(c, dtype=np.float64)
        d_pt += float(np.median(d))
        c_pt += float(np.median(c))
        idx = rng.integers(0, c.size, (n, c.size))
        jdx = idx if d.size == c.size else rng.integers(0, d.size, (n, d.size))
        d_sum += np.median(d[jdx], axis=1)
        c_sum += np.median(c[idx], axis=1)
    ratio = d_sum / np.maximum(c_sum, 1e-12)
    lo, hi = np.quantile(ratio, [(1.0 - confidence) / 2, (1.0 + confidence) / 2])
    return (d_pt / c_pt if c_pt > 0 else float("nan")), float(lo), float(hi)


@dataclass
class Candidate:
    sparsity: float
    speedup: float
    fidelity: float | None = None
    detail: dict = field(default_factory=dict)
    interval: tuple[float, float] | None = None  # of ``speedup`` (CONFIDENCE); None: a point

    @property
    def low(self) -> float:
        """The lower end of the speedup's interval (the speedup when there is none)."""
        return self.interval[0] if self.interval else self.speedup

    def reaches(self, target: float) -> bool:
        """Whether the whole interval clears ``target``."""
        return self.low >= target

    def describe(self) -> str:
        iv = (f" [{self.interval[0]:.2f}-{self.interval[1]:.2f}]" if self.interval else "")
        return f"{self.sparsity:g} -> {self.speedup:.2f}x{iv}"

    def to_dict(self) -> dict:
        return {"sparsity": self.sparsity, "speedup": round(self.speedup, 4),
                "interval": None if self.interval is None else [round(x, 4)
                                                                for x in self.interval],
                "fidelity": None if self.fidelity is None else round(self.fidelity, 5),
                **self.detail}


@dataclass
class SearchResult:
    target: float
    sparsity: float
    candidates: list[Candidate]
    confirmations: list[Candidate] = field(default_factory=list)  # full timings, in order

    def to_dict(self) -> dict:
        return {"target_speedup": self.target, "chosen_sparsity": self.sparsity,
                "confidence": CONFIDENCE,
                "candidates": [c.to_dict() for c in self.candidates],
                "confirmations": [c.to_dict() for c in self.confirmations]}


def search_sparsity(target: float, measure: Callable[[float], Candidate],
                    grid: Sequence[float] = SEARCH_GRID, max_candidates: int = MAX_CANDIDATES,
                    confirm: Callable[[float], Candidate] | None = None) -> SearchResult:
    """The lowest sparsity of ``grid`` whose measured speedup reaches ``target``
    (:meth:`Candidate.reaches`: the interval's lower end).

    ``measure(s)`` prunes a copy to ``s`` and times it briefly against dense. The highest
    grid point is measured first: when even it misses the target the search stops with
    :class:`TargetUnreachableError` naming the best speedup reached. Then a bisection over the
    grid (speedup assumed to grow with sparsity), at most ``max_candidates`` measurements in
    all; timing noise can make it non-monotone, in which case the lowest sparsity measured to
    reach the target wins. ``confirm(s)``, if given, times the choice fully; when that misses,
    the next grid sparsity is confirmed, and so on (TargetUnreachableError when none holds)."""
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
    if not top.reaches(target):
        best = max(seen.values(), key=lambda c: c.speedup)
        iv = (f" (interval {best.interval[0]:.2f}-{best.interval[1]:.2f}x)" if best.interval
              else "")
        raise TargetUnreachableError(
            f"--target-speedup {target:g} is out of reach: the best reached is "
            f"{best.speedup:.2f}x at structured sparsity {best.sparsity:g}{iv} (the highest "
            "tried); allowed: a target up to about that speedup on this runtime and batch size")
    lo, hi = -1, len(grid) - 1  # grid[hi] reaches the target; grid[lo] (if >= 0) does not
    while hi - lo > 1 and len(seen) < max_candidates:
        mid = (lo + hi) // 2
        if run(grid[mid]).reaches(target):
            hi = mid
        else:
            lo = mid
    ok = [c for c in seen.values() if c.reaches(target)]
    chosen = min(ok, key=lambda c: c.sparsity).sparsity
    candidates = sorted(seen.values(), key=lambda c: c.sparsity)
    confirmations: list[Candidate] = []
    if confirm is not None:
        for s in [g for g in grid if g >= chosen]:
            c = confirm(s)
            confirmations.append(c)
            if c.reaches(target):
                chosen = s
                break
        else:
            tried = ", ".join(c.describe() for c in confirmations)
            raise TargetUnreachableError(
                f"--target-speedup {target:g} is out of reach in the full timing: {tried} "
                f"(brief timings reached it from {confirmations[0].sparsity:g}); allowed: a "
                "target up to about the best of those on this runtime and batch size")
    return SearchResult(target, chosen, candidates, confirmations)



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
    """``--target-speedup``: prune copies of the dense model to grid sparsities (with the run's
    method options and ``--skip-incompatible``: the searched model is the shipped one), export
    (and quantize) each, time it briefly against dense at the largest batch size on the run's
    runtime (all towers summed), bisect, then time the choice with the run's iterations and
    step up the grid while that misses (:func:`search_sparsity`).

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
    from .quantized_variants import (
        fidelity_to_dense,
        quantize_float16,
        quantize_variants,
        quantized_runtime,
    )
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
    brief = replace(lc, batch_sizes=(batch,), warmup=1, iterations=max(5, lc.iterations // 5),
                    towers=tuple(towers))
    dense_art = Artefacts("dense", vlm=copy.deepcopy(vlm) if rt.consumes == MODEL else None,
                          onnx=dict(dense_export.paths), folder=Path(work) / "dense")
    if rt.consumes == ENGINE:  # engines are written into an existing folder
        dense_art.folder.mkdir(parents=True, exist_ok=True)
    opts = BuildOptions(threads=lc.threads, batch_sizes=(batch,),
                        seq_len=getattr(vlm, "text_max_length", None),
                        timing_cache=Path(work) / "timing.cache")
    pc = cfg.prune_config

    full = replace(brief, iterations=lc.iterations, warmup=lc.warmup)

    def _measure(s: float, timing) -> Candidate:
        # pruned exactly as the run will prune (the user's method options, skip-incompatible)
        v = copy.deepcopy(vlm)
        prune(v, cfg.method, s, "structured", calibration=calib, train=train, scope=cfg.scope,
              skip_incompatible=cfg.skip_incompatible, seed=cfg.seed, units=pc.units,
              round_to=pc.round_to, depth=pc.depth, method_options=pc.method_options)
        folder = Path(work) / f"s{s:g}"
        paths = {}
        if rt.consumes != MODEL:
            paths = dict(export_model(v, folder, example, check, towers=towers,
                                      fp16=cfg.onnx_fp16 and q == "none").paths)
            if q != "none":
                paths, _ = quantize_variants(v, {"c": paths}, calib, q, cfg.quantize_method,
                                             folder, target=quantize_target(rt),
                                             float16=quantize_float16(cfg))
                paths = paths["c"]
        art = Artefacts("candidate", vlm=v if rt.consumes == MODEL else None, onnx=paths,
                        folder=folder)
        rows = time_variants({"dense": (rt, dense_art), "candidate": (qrt, art)},
                             feeds, timing, towers=towers, options=opts)
        d = sum(r["variants"]["dense"]["ms"]["p50"] for r in rows)
        c = sum(r["variants"]["candidate"]["ms"]["p50"] for r in rows)
        point, lo, hi = speedup_interval([(r["variants"]["dense"]["samples_ms"],
                                           r["variants"]["candidate"]["samples_ms"])
                                          for r in rows])
        fid = None
        if timing is brief and dense_emb is not None and eval_data is not None:
            emb = onnx_embed_eval(v, paths, eval_data) if paths else None
            if emb is None:
                from .eval import embed_eval

                emb = embed_eval(v, eval_data)
            f = fidelity_to_dense(dense_emb, emb)
            fid = min(f.values()) if f else None
        shutil.rmtree(folder, ignore_errors=True)
        return Candidate(s, point, fid,
                         {"batch": batch, "dense_ms": round(d, 3), "candidate_ms": round(c, 3),
                          "quantize": q, "iterations": timing.iterations,
                          "timing": "full" if timing is full else "brief"}, (lo, hi))

    def measure(s: float, timing=brief) -> Candidate:  # on the terminal as it goes
        kind = "full" if timing is full else "brief"
        with progress.task(f"speedup at {s:g} ({kind})") as t:
            done = _measure(s, timing)
            t.update(description=f"speedup {kind} {done.describe()}")
        return done

    grid = allowed_grid(vlm, cfg)
    try:
        return search_sparsity(cfg.target_speedup, measure, grid,
                               confirm=lambda s: measure(s, full))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _row_samples(row: dict, key: str) -> list | None:
    if "variants" in row:
        return row["variants"][key].get("samples_ms")
    return row.get("dense_samples_ms" if key == "dense" else "pruned_samples_ms")


def final_speedup(latency: list[dict], quantize: str, target: float) -> dict:
    """The chosen sparsity's speedup in the run's full timing: at the largest batch, p50
    summed over towers, dense over the deployed variant (``pruned_<q>`` when quantized), its
    interval (:func:`speedup_interval`, when the rows hold their samples) and whether it still
    reaches ``target`` (the interval's lower end; the point when there are no samples)."""
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
    out = {"batch": batch, "variant": key, "speedup": round(speedup, 4)}
    pairs = [(_row_samples(r, "dense"), _row_samples(r, key)) for r in rows]
    low = speedup
    if all(d and c for d, c in pairs):
        _, lo, hi = speedup_interval(pairs)
        out["interval"] = [round(lo, 4), round(hi, 4)]
        out["confidence"] = CONFIDENCE
        low = lo
    out["reached"] = bool(low >= target)
    return {"final": out}


def search_lines(section: dict) -> list[str]:
    """The search and its verdict in plain lines for the terminal (``report["target_speedup"]``)."""
    t = section["target_speedup"]

    def one(c: dict) -> str:
        iv = c.get("interval")
        return f"{c['sparsity']:g} -> {c['speedup']:.2f}x" + (
            f" [{iv[0]:.2f}-{iv[1]:.2f}]" if iv else "")

    lines = [f"--target-speedup {t:g}: brief timings " + ", ".join(
        one(c) for c in section["candidates"])]
    if section.get("confirmations"):
        lines.append("full timings " + ", ".join(one(c) for c in section["confirmations"]))
    lines.append(f"chose structured sparsity {section['chosen_sparsity']:g}")
    fin = section.get("final")
    if fin:
        iv = fin.get("interval")
        span = f" (interval {iv[0]:.2f}-{iv[1]:.2f}x)" if iv else ""
        verdict = "REACHED" if fin["reached"] else "MISSED"
        lines.append(f"{verdict}: the run's full timing of {fin['variant']} at batch "
                     f"{fin['batch']} is {fin['speedup']:.2f}x over dense{span}, target "
                     f"{t:g}x")
    return lines


def target_missed(report: dict) -> bool:
    """Whether a ``--target-speedup`` run's own full timing missed its target."""
    fin = (report.get("target_speedup") or {}).get("final")
    return bool(fin) and not fin["reached"]


__all__ = ["SEARCH_GRID", "MAX_CANDIDATES", "TargetUnreachableError", "check_target_speedup",
           "Candidate", "SearchResult", "search_sparsity", "allowed_grid", "run_search",
           "final_speedup", "speedup_interval", "search_lines", "target_missed", "CONFIDENCE"]
