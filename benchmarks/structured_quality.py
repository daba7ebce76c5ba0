"""Accuracy of tiny-clip after structured pruning (heads and MLP neurons physically removed).

    python benchmarks/structured_quality.py     # writes benchmarks/results/structured_quality.json
                                                # and prints the Markdown table for docs/benchmarks.md

Every cell: load the dense model, ``prune(..., pattern="structured")`` at the sparsity
(heads and neurons, widths rounded to 8; calibration: 256 bundled calibration pairs, of which
MoPE evaluates its removals on the first 64), evaluate on the bundled eval split (720 pairs,
36 classes). Group scores: multiflow, wanda and magnitude weight scores summed per head /
neuron (each with its own allocation: per-modality, uniform, global), and MoPE's
contrastive-loss increase per removed group (pooled per tower). Cells read
``zero-shot top-1 / image->text R@1`` in percent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

from vlcompress import evaluate, load_calibration, load_eval, load_model, prune  # noqa: E402
from vlcompress.flops import tower_size  # noqa: E402

SPARSITIES = [0.1, 0.2, 0.3, 0.5]
METHODS = ["magnitude", "wanda", "multiflow", "mope"]


def run(model: str, methods: list[str], sparsities: list[float], calib_n: int, eval_n: int) -> dict:
    calib = load_calibration("shapes", n=calib_n)
    data = load_eval("shapes", n=eval_n)
    dense_vlm = load_model(model)
    dense = evaluate(dense_vlm, data)
    dense_size = tower_size(dense_vlm)
    rows = []
    for method in methods:
        for s in sparsities:
            vlm = load_model(model)
            t = time.perf_counter()
            res = prune(vlm, method, s, "structured", calibration=calib)
            secs = time.perf_counter() - t
            m = evaluate(vlm, data)
            size = tower_size(vlm)
            info = res.details["structured"]
            rows.append({"method": method, "sparsity": s, "achieved": res.achieved,
                         "per_modality": res.per_modality, "allocation": res.allocation,
                         "prune_seconds": round(secs, 2),
                         "flops_ratio": {t: size[t]["flops"] / dense_size[t]["flops"] for t in size},
                         "heads": {p: v["heads"][0] for p, v in info["layers"].items()},
                         "mlp": {p: v["mlp"][0] for p, v in info["layers"].items()}, **m})
            print(f"{method:10s} {s:.0%} achieved={res.achieved:.3f} zs={m['zeroshot_top1']:.3f} "
                  f"i2t@1={m['i2t_r1']:.3f} t2i@1={m['t2i_r1']:.3f} ({secs:.1f}s)", flush=True)
    return {"model": model, "pattern": "structured", "units": "heads,neurons", "round_to": 8,
            "calibration_pairs": calib_n, "eval_pairs": eval_n, "dense": dense, "rows": rows}


def markdown(res: dict) -> str:
    sps = list(dict.fromkeys(r["sparsity"] for r in res["rows"]))
    labels = [f"{round(100 * s)}%" for s in sps]
    d = res["dense"]
    dense_cell = f"{100 * d['zeroshot_top1']:.1f} / {100 * d['i2t_r1']:.1f}"
    lines = ["| method (structured) | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels),
             "| dense | " + " | ".join(dense_cell for _ in labels) + " |"]
    for m in dict.fromkeys(r["method"] for r in res["rows"]):
        cells = {r["sparsity"]: r for r in res["rows"] if r["method"] == m}
        lines.append(f"| {m} | " + " | ".join(
            f"{100 * cells[s]['zeroshot_top1']:.1f} / {100 * cells[s]['i2t_r1']:.1f}" for s in sps) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    ap.add_argument("--calibration-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=720)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    res = run(a.model, a.methods.split(","), [float(x) for x in a.sparsities.split(",")],
              a.calibration_size, a.eval_size)
    res["table_markdown"] = markdown(res)
    res["seconds_total"] = round(time.perf_counter() - t0, 1)
    path = write_result("structured_quality", res, a.out)
    print(res["table_markdown"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
