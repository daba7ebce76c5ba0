"""Accuracy of tiny-clip after pruning, per method and sparsity setting.

    python benchmarks/quality.py            # writes benchmarks/results/quality.json and prints
                                            # the Markdown table for docs/benchmarks.md

Every cell: load the dense model, prune it with the method at the setting (calibration: 256
bundled calibration pairs), evaluate on the bundled eval split (720 pairs, 36 classes).
Random is the floor every method must beat. For ``auto`` each row also records which
candidate won and by how much. A method may carry its options, ``name:key=value;key=value``
(e.g. ``--methods ecoflap,ecoflap:estimator=block-spsa``), as ``--method-option`` on the CLI.

Reconstruction (``vlcompress.methods.reconstruct``): ``--reconstruct default`` (prune()'s
default: on for scoring methods at unstructured and N:M), ``on``, ``off``, or ``both`` (each
scoring method twice, rows ``NAME`` without and ``NAME +rec`` with it; the others once).
``--settings 50%,2:4`` keeps only those columns.

Prune time: with ``--timing-repeats N`` (N >= 3) each cell is pruned once untimed (warm-up:
first-call costs, lazy imports) and then N more times, and the table's last column is the
median of those N ``prune()`` calls (calibration included), averaged over settings. By default
(0) no time is reported: one timed call mixes the warm-up into the first cell.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parse_spec, write_result  # noqa: E402

from vlcompress import evaluate, load_calibration, load_eval, load_model, prune  # noqa: E402

SETTINGS = [("50%", "unstructured", 0.5), ("2:4", "2:4", None), ("63%", "unstructured", 0.63),
            ("75%", "unstructured", 0.75), ("90%", "unstructured", 0.9)]
METHODS = ["random", "magnitude", "wanda", "multiflow", "lamp", "snip", "ecoflap", "sparsegpt",
           "auto"]


RECONSTRUCT = {"default": (None,), "on": (True,), "off": (False,), "both": (False, True)}


def variants(spec: str, mode: str) -> list[tuple[str, bool | None]]:
    """``(row label, reconstruct)`` of one method under ``--reconstruct mode``: a method that
    does not score (sparsegpt, auto) runs once, as prune() allows it."""
    from vlcompress.methods.registry import SCORING_KINDS, get_method

    if get_method(parse_spec(spec)[0]).kind not in SCORING_KINDS:
        return [(spec, None)]
    return [(f"{spec} +rec" if rc and mode == "both" else spec, rc) for rc in RECONSTRUCT[mode]]


def run(model: str, methods: list[str], calib_n: int, eval_n: int, repeats: int = 0,
        reconstruct: str = "default") -> dict:
    calib = load_calibration("shapes", n=calib_n)
    data = load_eval("shapes", n=eval_n)
    dense = evaluate(load_model(model), data)
    rows = []
    for spec, rc in [v for s in methods for v in variants(s, reconstruct)]:
        method, opts = parse_spec(spec.removesuffix(" +rec"))
        for label, pattern, sparsity in SETTINGS:
            times = []
            for _ in range(repeats + 1 if repeats else 0):  # the first call is the warm-up
                vlm = load_model(model)
                t = time.perf_counter()
                prune(vlm, method, sparsity, pattern, calibration=calib, method_options=opts,
                      reconstruct=rc)
                times.append(time.perf_counter() - t)
            vlm = load_model(model)
            res = prune(vlm, method, sparsity, pattern, calibration=calib, method_options=opts,
                        reconstruct=rc)
            m = evaluate(vlm, data)
            rows.append({"method": spec, "setting": label, "pattern": pattern,
                         "reconstruct": res.reconstruct,
                         "achieved": res.achieved, "per_modality": res.per_modality,
                         "method_options": res.details.get("method_options", {}), **m})
            if repeats:
                rows[-1]["prune_seconds_median"] = round(statistics.median(times[1:]), 3)
                rows[-1]["prune_seconds_all"] = [round(x, 3) for x in times[1:]]
            if method == "auto":
                d = res.details
                rows[-1]["auto"] = {k: d.get(k) for k in ("winner", "runner_up", "margin")}
            print(f"{spec:10s} {label:4s} zs={m['zeroshot_top1']:.3f} i2t@1={m['i2t_r1']:.3f} "
                  f"t2i@1={m['t2i_r1']:.3f}", flush=True)
    return {"model": model, "calibration_pairs": calib_n, "eval_pairs": eval_n, "dense": dense,
            "timing_repeats": repeats, "reconstruct": reconstruct, "rows": rows}


def markdown(res: dict) -> str:
    labels = list(dict.fromkeys(r["setting"] for r in res["rows"]))
    d = res["dense"]
    timed = bool(res.get("timing_repeats"))
    lines = ["| method | " + " | ".join(labels) + (" | prune s (median) |" if timed else " |"),
             "|---|" + "---:|" * (len(labels) + int(timed)),
             "| dense | " + " | ".join(f"{100 * d['zeroshot_top1']:.1f} / {100 * d['i2t_r1']:.1f}"
                                       for _ in labels) + (" | |" if timed else " |")]
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    for m in methods:
        cells = {r["setting"]: r for r in res["rows"] if r["method"] == m}
        tail = " |"
        if timed:
            secs = [c["prune_seconds_median"] for c in cells.values()]
            tail = f" | {sum(secs) / len(secs):.2f} |"
        lines.append(f"| {m} | " + " | ".join(
            f"{100 * cells[s]['zeroshot_top1']:.1f} / {100 * cells[s]['i2t_r1']:.1f}" for s in labels)
            + tail)
    auto = [r for r in res["rows"] if r["method"] == "auto" and r.get("auto")]
    if auto:
        lines += ["", "auto's picks (fidelity margin over the runner-up): " + "; ".join(
            f"{r['setting']} {r['auto']['winner']} (+{r['auto']['margin']:.3f} over "
            f"{r['auto']['runner_up']})" for r in auto)]
    return "\n".join(lines)


# --permutation: channel permutation for N:M (issue 26), and RIA
PERM_METHODS = ["magnitude", "wanda", "multiflow", "lamp", "snip", "ecoflap", "ria", "sparsegpt"]
RIA_SETTINGS = [("50%", "unstructured", 0.5, None)]


def perm_settings(objectives: list[str]) -> list[tuple[str, str, None, str | None]]:
    """``(label, pattern, sparsity, objective)``: 2:4 without permutation, then with it under
    each objective (``score`` keeps the label these rows were first published under)."""
    return [("2:4", "2:4", None, None)] + [
        ("2:4 + permutation" + ("" if o == "score" else f" ({o})"), "2:4", None, o)
        for o in objectives]


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion ``p`` measured on ``n`` items."""
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / den
    return [round(mid - half, 4), round(mid + half, 4)]


def run_permutation(model: str, methods: list[str], calib_n: int, eval_n: int,
                    permute_seconds: float, objectives: tuple[str, ...] = ("score",),
                    rounds: int = 0, reconstruct: str = "off") -> dict:
    """Each method at 2:4 without and with ``permute=true`` (one row per search objective),
    and RIA at 50% unstructured; ``reconstruct`` ``off`` (permutation alone, as these rows
    were first measured), ``on`` or ``both`` (rows ``... +rec`` too)."""
    import os

    load_start = os.getloadavg()
    calib = load_calibration("shapes", n=calib_n)
    data = load_eval("shapes", n=eval_n)
    dense = evaluate(load_model(model), data)
    rows = []
    for method in methods:
        settings = perm_settings(list(objectives)) + (RIA_SETTINGS if method == "ria" else [])
        # a solver (sparsegpt) runs once, as prune() allows it (its sweep is its own update)
        modes = [rc for _, rc in variants(method, reconstruct)]
        for (label, pattern, sparsity, objective), rc in (
                (st, rc) for st in settings for rc in modes):
            opts = None
            if objective:
                opts = {"permute": True, "permute_seconds": permute_seconds,
                        "permute_rounds": rounds, "permute_objective": objective}
            vlm = load_model(model)
            t = time.perf_counter()
            res = prune(vlm, method, sparsity, pattern, calibration=calib, method_options=opts,
                        reconstruct=rc)
            secs = time.perf_counter() - t
            m = evaluate(vlm, data)
            label = label + (" +rec" if rc else "")
            row = {"method": method, "setting": label, "pattern": pattern,
                   "permute": bool(objective), "objective": objective,
                   "reconstruct": res.reconstruct,
                   "achieved": res.achieved, "prune_seconds": round(secs, 2), **m,
                   "zeroshot_top1_95": wilson(m["zeroshot_top1"], len(data)),
                   "i2t_r1_95": wilson(m["i2t_r1"], len(data))}
            if objective:
                d = res.details["permute"]
                row["permute"] = {k: d.get(k) for k in (
                    "seconds", "budget_seconds", "max_rounds", "objective", "stopped",
                    "mean_gain", "permuted")}
            rows.append(row)
            print(f"{method:10s} {label:30s} zs={m['zeroshot_top1']:.3f} "
                  f"i2t@1={m['i2t_r1']:.3f} {secs:.1f}s", flush=True)
    return {"model": model, "calibration_pairs": calib_n, "eval_pairs": eval_n, "dense": dense,
            "permute_seconds": permute_seconds, "permute_rounds": rounds,
            "objectives": list(objectives), "reconstruct": reconstruct,
            "interval": "95% Wilson score interval",
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "note": "times on a shared 2-core machine under others' load", "rows": rows}


def markdown_permutation(res: dict) -> str:
    """One column per setting (2:4, each permutation objective, +rec, RIA's 50%): zero-shot /
    i2t R@1, and the zero-shot 95% interval of each cell under the table."""
    d = res["dense"]
    labels = list(dict.fromkeys(r["setting"] for r in res["rows"]))
    lines = ["| method | " + " | ".join(f"{x} zs / i2t" for x in labels) + " |",
             "|---|" + "---:|" * len(labels),
             "| dense | " + " | ".join(f"{100 * d['zeroshot_top1']:.1f} / {100 * d['i2t_r1']:.1f}"
                                       if i == 0 else "" for i in range(len(labels))) + " |"]
    for m in dict.fromkeys(r["method"] for r in res["rows"]):
        c = {r["setting"]: r for r in res["rows"] if r["method"] == m}
        lines.append(f"| {m} | " + " | ".join(
            f"{100 * c[x]['zeroshot_top1']:.1f} / {100 * c[x]['i2t_r1']:.1f}" if x in c else "-"
            for x in labels) + " |")
    lines.append("")
    lines.append("zero-shot 95% Wilson intervals: " + "; ".join(
        f"{r['method']} {r['setting']} [{100 * r['zeroshot_top1_95'][0]:.1f}, "
        f"{100 * r['zeroshot_top1_95'][1]:.1f}]" for r in res["rows"]))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calibration-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=720)
    ap.add_argument("--timing-repeats", type=int, default=0,
                    help="timed prune() calls per cell after one warm-up (0: no time; else >= 3)")
    ap.add_argument("--reconstruct", choices=sorted(RECONSTRUCT), default="default",
                    help="reconstruction after scoring methods' masks (both: rows with and without; "
                         "with --permutation, default means off: permutation alone)")
    ap.add_argument("--settings", default=None,
                    help=f"columns to run (default all: {','.join(s[0] for s in SETTINGS)})")
    ap.add_argument("--out", default=None)
    ap.add_argument("--permutation", action="store_true",
                    help="instead: each method at 2:4 without / with channel permutation, and RIA "
                         "at 50%% (writes quality_permutation.json; --methods defaults to "
                         + ",".join(PERM_METHODS) + ")")
    ap.add_argument("--permute-seconds", type=float, default=30.0,
                    help="with --permutation: the permutation search's budget per model")
    ap.add_argument("--permute-rounds", type=int, default=0,
                    help="with --permutation: cap on each layer's search rounds (0: none)")
    ap.add_argument("--permute-objectives", default="score",
                    help="with --permutation: comma-separated search objectives, one row each "
                         "(auto, score, row)")
    a = ap.parse_args()
    from _common import provenance

    provenance()  # the git state as the run starts (the results are written at the end)
    if a.settings:
        keep = a.settings.split(",")
        bad = [k for k in keep if k not in {s[0] for s in SETTINGS}]
        if bad:
            ap.error(f"unknown setting {bad[0]!r}; allowed: {','.join(s[0] for s in SETTINGS)}")
        SETTINGS[:] = [s for s in SETTINGS if s[0] in keep]
    if a.permutation:
        methods = PERM_METHODS if a.methods == ",".join(METHODS) else a.methods.split(",")
        objectives = tuple(a.permute_objectives.split(","))
        bad = [o for o in objectives if o not in ("auto", "score", "row")]
        if bad:
            ap.error(f"unknown permutation objective {bad[0]!r}; allowed: auto, score, row")
        res = run_permutation(a.model, methods, a.calibration_size, a.eval_size,
                              a.permute_seconds, objectives, a.permute_rounds,
                              "off" if a.reconstruct == "default" else a.reconstruct)
        res["table_markdown"] = markdown_permutation(res)
        path = write_result("quality_permutation", res, a.out)
        print(res["table_markdown"])
        print(f"wrote {path}")
        return
    if a.timing_repeats and a.timing_repeats < 3:
        ap.error("--timing-repeats must be 0 or at least 3")
    res = run(a.model, a.methods.split(","), a.calibration_size, a.eval_size, a.timing_repeats,
              a.reconstruct)
    res["table_markdown"] = markdown(res)
    path = write_result("quality", res, a.out)
    print(res["table_markdown"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
