"""Accuracy retained after recovery: tiny-clip at 50% structured sparsity.

    python benchmarks/recover_quality.py [--steps 1200 --train-pairs 4096 --lr 2e-4]

Rows: multiflow structured + distillation recovery, mope + recovery, upop (search, slicing,
distillation retraining) and efficientvlm (L0 gates trained with distillation, slicing,
retraining). Every method gets the same number of distillation steps after slicing
(``--steps``, batch 32 of the bundled train split, AdamW lr ``--lr``), the dense model as
teacher. Accuracy on the bundled eval split (720 pairs, 36 classes): zero-shot top-1 and
image->text R@1, with the fraction of the dense value retained, and the wall time of the
whole method (prune + search + recovery) on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

from vlcompress import evaluate, load_calibration, load_eval, load_model, prune  # noqa: E402
from vlcompress.distill import dense_copy
from vlcompress.recover import recover  # noqa: E402

METHODS = ["multiflow", "mope", "upop", "efficientvlm"]
KEYS = ("zeroshot_top1", "i2t_r1", "t2i_r1")


def run(model: str, methods: list[str], sparsity: float, steps: int, lr: float, calib_n: int,
        eval_n: int, train_n: int = 4096) -> dict:
    import vlcompress.methods.efficientvlm as E
    import vlcompress.methods.upop as U
    from vlcompress.distill import DEFAULTS

    DEFAULTS["n"] = train_n  # distillation pairs (bundled train split) for every method

    U.RETRAIN_STEPS = E.RETRAIN_STEPS = steps
    U.RETRAIN_LR = E.RETRAIN_LR = lr
    calib = load_calibration("shapes", n=calib_n)
    data = load_eval("shapes", n=eval_n)
    dense = evaluate(load_model(model), data)
    rows = []
    for method in methods:
        vlm = load_model(model)
        teacher = dense_copy(vlm)
        t = time.perf_counter()
        res = prune(vlm, method, sparsity, "structured", calibration=calib)
        secs = time.perf_counter() - t
        row = {"method": method, "achieved": res.achieved, "per_modality": res.per_modality,
               "prune_seconds": round(secs, 2)}
        if method in ("upop", "efficientvlm"):
            row["recipe"] = f"{method} (search + {steps} distillation steps)"
            row["pruned"] = None  # the retraining is part of the method
        else:
            row["pruned"] = evaluate(vlm, data)
            rec = recover(vlm, steps=steps, teacher=teacher, lr=lr, n=train_n)
            row["recipe"] = f"{method} structured + recover ({steps} steps)"
            row["recover_loss"] = [rec.losses[0], rec.losses[-1]]
            row["recover_seconds"] = round(rec.seconds, 2)
            secs += rec.seconds
        row["seconds"] = round(secs, 2)  # prune (+ search) + recovery, evaluation excluded
        m = evaluate(vlm, data)
        row["recovered"] = m
        row["retained"] = {k: m[k] / dense[k] for k in KEYS if dense.get(k)}
        rows.append(row)
        print(f"{method:12s} achieved={res.achieved:.3f} zs={m['zeroshot_top1']:.3f} "
              f"({row['retained']['zeroshot_top1']:.1%}) i2t@1={m['i2t_r1']:.3f} "
              f"({row['retained']['i2t_r1']:.1%}) {row['seconds']:.1f}s", flush=True)
    return {"model": model, "pattern": "structured", "sparsity": sparsity, "steps": steps,
            "lr": lr, "batch_size": 32, "calibration_pairs": calib_n, "eval_pairs": eval_n,
            "train_pairs": train_n,
            "dense": dense, "rows": rows}


def markdown(res: dict) -> str:
    d = res["dense"]
    lines = [f"| method ({res['sparsity']:.0%} structured) | zero-shot top-1 | i2t R@1 | "
             "retained (zs / i2t) | wall time |", "|---|---|---|---|---|",
             f"| dense | {100 * d['zeroshot_top1']:.1f}% | {100 * d['i2t_r1']:.1f}% | - | - |"]
    for r in res["rows"]:
        m, k = r["recovered"], r["retained"]
        lines.append(f"| {r['recipe']} | {100 * m['zeroshot_top1']:.1f}% | {100 * m['i2t_r1']:.1f}% "
                     f"| {100 * k['zeroshot_top1']:.1f}% / {100 * k['i2t_r1']:.1f}% "
                     f"| {r['seconds']:.0f}s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--train-pairs", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--calibration-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=720)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    res = run(a.model, a.methods.split(","), a.sparsity, a.steps, a.lr, a.calibration_size,
              a.eval_size, a.train_pairs)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    path = write_result("recover_quality", res, a.out)
    print(markdown(res))
    print(f"wrote {path} in {res['total_seconds']}s")


if __name__ == "__main__":
    main()
