"""Accuracy of the fp16 and int8 generative variants, measured from their ONNX files on ONNX
Runtime CPU, beside the PyTorch dense and pruned models (tiny-llava, shapes captions and VQA).

    python benchmarks/generative_precision.py      # writes benchmarks/results/generative_precision.json

Two prune-export runs of the same model, method and pattern (default the issue's
``--method sparsegpt --pattern 2:4`` on every part), one with ``--quantize int8
--quantize-method dynamic``, one with ``--fp16``; both prune identically (same seed and
calibration), so their ``dense`` / ``pruned`` rows agree and the four precision variants
(``dense_int8``, ``pruned_int8``, ``dense_fp16``, ``pruned_fp16``) are compared with the same
PyTorch models. Per variant: caption CIDEr and attribute accuracy, VQA accuracy, the fidelity
to the dense PyTorch model (token KL, next-token and greedy agreement) and to its own float twin,
the share of each metric the dense model's value retained, and the export validation
(logits cosine and top-1 agreement against PyTorch; greedy token-exactness reported).
Accuracy only: nothing here is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--eval-size", type=int, default=64)
    ap.add_argument("--calibration-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from vlcompress.pipeline import RunConfig, prune_export

    res = {"model": a.model, "method": a.method, "pattern": a.pattern, "eval_size": a.eval_size,
           "calibration_size": a.calibration_size, "max_new_tokens": a.max_new_tokens,
           "loadavg_start": list(os.getloadavg()), "runs": {}, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="gen-precision-") as work:
        for name, kw in (("int8", {"quantize": "int8", "quantize_method": "dynamic"}),
                         ("fp16", {"fp16": True})):
            cfg = RunConfig(model=a.model, method=a.method, pattern=a.pattern,
                            calibration="shapes", calibration_size=a.calibration_size,
                            eval_size=a.eval_size, max_new_tokens=a.max_new_tokens,
                            out=str(Path(work) / name), **kw)
            rep = prune_export(cfg)
            q = rep["quantize"]
            acc = q["accuracy"]["variants"]
            dense_m = acc["dense"]["metrics"]
            res["runs"][name] = {"dataset": q["accuracy"]["dataset"],
                                 "prune_achieved": rep["prune"]["achieved"],
                                 "seconds": rep["config"]["seconds_total"]}
            for v, entry in acc.items():
                row = {"metrics": entry["metrics"], "fidelity": entry["fidelity"],
                       "retained": {k: (entry["metrics"][k] / dense_m[k] if dense_m[k] else None)
                                    for k in entry["metrics"]},
                       "measured_on": "PyTorch" if v in ("dense", "pruned")
                       else "ONNX Runtime CPU (the variant's files)"}
                if "fidelity_to_float_twin" in entry:
                    row["fidelity_to_float_twin"] = entry["fidelity_to_float_twin"]
                if v in q["validation"]:
                    row["validation"] = q["validation"][v]
                    row["files"] = q["files"][v]
                res["variants"].setdefault(v, row)
    res["loadavg_end"] = list(os.getloadavg())
    path = write_result("generative_precision", res, a.out)
    cols = ("cider", "attribute_accuracy", "vqa_accuracy")
    print(f"{'variant':12s} " + " ".join(f"{c:>18s}" for c in cols) + "   greedy agreement")
    for v, row in res["variants"].items():
        m = row["metrics"]
        print(f"{v:12s} " + " ".join(f"{m.get(c, float('nan')):18.4f}" for c in cols)
              + f"   {row['fidelity']['greedy_agreement']:.4f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
