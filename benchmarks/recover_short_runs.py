"""How many steps a recovery rate needs: fidelity to the dense model after short runs.

    python benchmarks/recover_short_runs.py    # writes benchmarks/results/recover_short_runs.json

The measurement behind ``min_steps`` in tiny-clip's recovery recipe (``vlcompress.json``):
``recover`` uses the recipe's learning rate only for runs of at least that many steps.

The setting is the one a user with a small folder of their own meets (and the one
``tests/test_spine_data.py`` checks): 24 image-caption pairs (the first 24 of the bundled eval
split, written as PNG files + captions.jsonl), tiny-clip pruned 2:4 by magnitude with those
pairs as calibration data, then ``recover`` on the same pairs for each (steps, lr) with the
recipe's relation weight (``w_relation=1``) and the shipped cosine schedule. Fidelity is the
mean cosine of the pruned / recovered image and caption embeddings to the dense model's, on
the same 24 pairs, before and after recovery.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

from vlcompress import load_calibration, load_eval, load_model, prune  # noqa: E402
from vlcompress.data import load_train, save_pairs  # noqa: E402
from vlcompress.distill import dense_copy  # noqa: E402
from vlcompress.eval import embed_eval, fidelity  # noqa: E402
from vlcompress.recover import recover  # noqa: E402

RUNS = "20:1e-3,40:1e-3,60:1e-3,100:1e-3,20:5e-5,100:5e-5"


def mean_cos(f: dict) -> float:
    return (f["image_cosine"] + f["text_cosine"]) / 2


def run(model: str, runs: list[tuple[int, float]], n: int, weights: dict) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = load_eval("shapes", n=n)
        folder = save_pairs(src, Path(tmp) / "pairs", src.retrieval_captions)
        ev = load_eval(str(folder), n=n)
        calib = load_calibration(str(folder), n=n)
        for steps, lr in runs:
            vlm = load_model(model)
            teacher = dense_copy(vlm)
            dense = embed_eval(teacher, ev)
            prune(vlm, "magnitude", None, "2:4", calibration=calib)
            before = fidelity(dense, embed_eval(vlm, ev))
            rec = recover(vlm, steps=steps, teacher=teacher, lr=lr, weights=weights,
                          data=load_train(str(folder), n=n, seed=0))
            after = fidelity(dense, embed_eval(vlm, ev))
            row = {"steps": steps, "lr": lr, "before": before, "after": after,
                   "mean_before": mean_cos(before), "mean_after": mean_cos(after),
                   "gain": mean_cos(after) - mean_cos(before), "seconds": round(rec.seconds, 2)}
            rows.append(row)
            print(f"steps {steps:4d} lr {lr:g}: mean cosine {row['mean_before']:.3f} -> "
                  f"{row['mean_after']:.3f} (image {after['image_cosine']:.3f}, text "
                  f"{after['text_cosine']:.3f})", flush=True)
    return {"model": model, "pairs": n, "prune": "magnitude 2:4", "distill_weights": weights,
            "schedule": "cosine", "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--runs", default=RUNS, help="comma list of STEPS:LR")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--distill-weight", action="append", default=["w_relation=1"],
                    help="KEY=VALUE (repeatable); default w_relation=1, the recipe's")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    runs = [(int(s), float(lr)) for s, lr in (r.split(":") for r in a.runs.split(","))]
    weights = {k: float(v) for k, v in (w.split("=", 1) for w in a.distill_weight)}
    res = run(a.model, runs, a.pairs, weights)
    print(f"wrote {write_result('recover_short_runs', res, a.out)}")


if __name__ == "__main__":
    main()
