"""Quality of one-shot methods on a generative VLM (llava family), dense vs pruned, all parts.

    OMP_NUM_THREADS=1 python benchmarks/generative_quality.py --model tiny-llava \
        --methods magnitude,wanda,multiflow,sparsegpt,ecoflap --patterns unstructured,2:4

For each method x pattern the dense model is copied, pruned whole (vision, bridge, language;
``--parts`` to choose) on ``--calibration`` sequences, and scored on the evaluation data
(``shapes``: held-out captions and questions) with greedy generation: caption attribute
accuracy, CIDEr, VQA exact match (each with a 95% Wilson interval where it is a proportion),
and fidelity to the dense model (next-token KL, greedy-token agreement). ``retained`` is
pruned / dense. Writes ``benchmarks/results/generative_quality.json`` (or ``--out``) with the
command, commit, machine and the load average (a shared machine: timings are indicative).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import parse_spec, write_result  # noqa: E402

PROPORTIONS = ("attribute_accuracy", "vqa_accuracy")


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion ``p`` measured on ``n`` items."""
    if n == 0:
        return [0.0, 1.0]
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)]


def _metrics(evals, runs, dense_runs=None):
    from vlcompress.eval.generative import generative_fidelity, generative_metrics

    out = {}
    for r in runs:
        for k, v in generative_metrics(r).items():
            out[k] = {"value": round(v, 4), "n": r.n}
            if k in PROPORTIONS:
                out[k]["ci95"] = wilson(v, r.n)
    if dense_runs is not None:
        from vlcompress.eval.generative import merged_runs

        out["fidelity"] = {k: round(v, 4) for k, v in
                           generative_fidelity(merged_runs(dense_runs), merged_runs(runs)).items()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--methods", default="magnitude,wanda,multiflow,sparsegpt,ecoflap")
    ap.add_argument("--patterns", default="unstructured,2:4",
                    help="comma list; unstructured uses --sparsity")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--parts", default=None, help="e.g. language (default: every part)")
    ap.add_argument("--calibration", default="shapes")
    ap.add_argument("--calibration-size", type=int, default=64)
    ap.add_argument("--eval-data", default="shapes")
    ap.add_argument("--eval-size", type=int, default=240)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from vlcompress.data import generative_eval_data, load_calibration
    from vlcompress.eval.generative import run_all
    from vlcompress.models import load_model
    from vlcompress.prune import prune

    torch.manual_seed(0)
    load0 = os.getloadavg()
    dense = load_model(args.model)
    calib = load_calibration(args.calibration, n=args.calibration_size, batch_size=8)
    evals = generative_eval_data(args.eval_data, n=args.eval_size)
    t = time.perf_counter()
    dense_runs = run_all(dense, evals, max_new_tokens=args.max_new_tokens)
    rows = [{"method": "dense", "pattern": None, "seconds_eval": round(time.perf_counter() - t, 1),
             "metrics": _metrics(evals, dense_runs),
             "examples": [{"dense": r.texts[i], "references": r.references[i][:2]}
                          for r in dense_runs for i in range(min(2, r.n))]}]
    scope = tuple(args.parts.split(",")) if args.parts else None
    for spec in args.methods.split(","):
        method, opts = parse_spec(spec)
        for pattern in args.patterns.split(","):
            vlm = copy.deepcopy(dense)
            t = time.perf_counter()
            res = prune(vlm, method, args.sparsity if pattern == "unstructured" else None,
                        pattern, calibration=calib, scope=scope, method_options=opts or None)
            secs = time.perf_counter() - t
            runs = run_all(vlm, evals, max_new_tokens=args.max_new_tokens)
            m = _metrics(evals, runs, dense_runs)
            for k, v in m.items():
                if k != "fidelity" and rows[0]["metrics"][k]["value"] > 0:
                    v["retained"] = round(v["value"] / rows[0]["metrics"][k]["value"], 4)
            rows.append({"method": spec, "pattern": pattern, "achieved": round(res.achieved, 4),
                         "per_part": {k: round(v, 4) for k, v in res.per_modality.items()},
                         "seconds_prune": round(secs, 1), "metrics": m})
            print(spec, pattern, {k: v.get("value", v) for k, v in m.items()}, flush=True)
            del vlm
    path = write_result("generative_quality", {
        "model": args.model, "parts": args.parts or "vision,bridge,language",
        "calibration": f"{args.calibration} (n={args.calibration_size})",
        "eval": [f"{d.source} (n={len(d)})" for d in evals],
        "max_new_tokens": args.max_new_tokens, "sparsity": args.sparsity,
        "rows": rows, "loadavg": {"start": load0, "end": os.getloadavg()},
        "threads": torch.get_num_threads()}, out=args.out)
    print(path)


if __name__ == "__main__":
    main()
