"""Accuracy of tiny-clip after pruning, per method and sparsity setting.

    python benchmarks/quality.py            # writes benchmarks/results/quality.json and prints
                                            # the Markdown table that goes in the README

Every cell: load the dense model, prune it with the method at the setting (calibration: 256
bundled calibration pairs), evaluate on the bundled eval split (720 pairs, 36 classes).
Random is the floor every method must beat. Each cell records ``prune_seconds`` (the whole
``prune()`` call, calibration included); the table's last column is the mean over settings.
For ``auto`` each row also records which candidate won and by how much.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

from vlcompress import evaluate, load_calibration, load_eval, load_model, prune  # noqa: E402

SETTINGS = [("50%", "unstructured", 0.5), ("2:4", "2:4", None), ("63%", "unstructured", 0.63),
            ("75%", "unstructured", 0.75), ("90%", "unstructured", 0.9)]
METHODS = ["random", "magnitude", "wanda", "multiflow", "lamp", "snip", "ecoflap", "sparsegpt",
           "auto"]


def run(model: str, methods: list[str], calib_n: int, eval_n: int) -> dict:
    calib = load_calibration("shapes", n=calib_n)
    data = load_eval("shapes", n=eval_n)
    dense = evaluate(load_model(model), data)
    rows = []
    for method in methods:
        for label, pattern, sparsity in SETTINGS:
            vlm = load_model(model)
            t = time.perf_counter()
            res = prune(vlm, method, sparsity, pattern, calibration=calib)
            secs = time.perf_counter() - t
            m = evaluate(vlm, data)
            rows.append({"method": method, "setting": label, "pattern": pattern,
                         "achieved": res.achieved, "per_modality": res.per_modality,
                         "prune_seconds": round(secs, 3), **m})
            if method == "auto":
                d = res.details
                rows[-1]["auto"] = {k: d.get(k) for k in ("winner", "runner_up", "margin")}
            print(f"{method:10s} {label:4s} zs={m['zeroshot_top1']:.3f} i2t@1={m['i2t_r1']:.3f} "
                  f"t2i@1={m['t2i_r1']:.3f} ({secs:.1f}s)", flush=True)
    return {"model": model, "calibration_pairs": calib_n, "eval_pairs": eval_n, "dense": dense,
            "rows": rows}


def markdown(res: dict) -> str:
    labels = [s[0] for s in SETTINGS]
    d = res["dense"]
    lines = ["| method | " + " | ".join(labels) + " | prune s |",
             "|---|" + "---:|" * (len(labels) + 1),
             "| dense | " + " | ".join(f"{100 * d['zeroshot_top1']:.1f} / {100 * d['i2t_r1']:.1f}"
                                       for _ in labels) + " | |"]
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    for m in methods:
        cells = {r["setting"]: r for r in res["rows"] if r["method"] == m}
        secs = [c["prune_seconds"] for c in cells.values()]
        lines.append(f"| {m} | " + " | ".join(
            f"{100 * cells[s]['zeroshot_top1']:.1f} / {100 * cells[s]['i2t_r1']:.1f}" for s in labels)
            + f" | {sum(secs) / len(secs):.1f} |")
    auto = [r for r in res["rows"] if r["method"] == "auto" and r.get("auto")]
    if auto:
        lines += ["", "auto's picks (fidelity margin over the runner-up): " + "; ".join(
            f"{r['setting']} {r['auto']['winner']} (+{r['auto']['margin']:.3f} over "
            f"{r['auto']['runner_up']})" for r in auto)]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calibration-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=720)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = run(a.model, a.methods.split(","), a.calibration_size, a.eval_size)
    res["table_markdown"] = markdown(res)
    path = write_result("quality", res, a.out)
    print(res["table_markdown"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
