"""Quantization on top of structured sparsity: clip-vit-b16 vision on ONNX Runtime CPU.

    python benchmarks/quant_speedup.py          # writes benchmarks/results/quant_speedup.json

Runs the product as shipped: ``prune_export(RunConfig(model="clip-vit-b16", tower="vision",
pattern="structured", sparsity=0.5, quantize="int8", ...))`` (the preset: random weights,
latency does not depend on them; accuracy is fidelity only), which times the four variants
dense fp32, dense int8, structured 50% fp32, structured 50% int8 interleaved in one process
(``runtime.timing.time_variants``) at batch 1 and 8. int8 = static QDQ, per-channel weights,
activations calibrated on the run's calibration pairs. Goals: pruned int8 >= 3x dense fp32
and >= 1.7x dense int8. The CLI equivalent is printed into the JSON (``command``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

from vlcompress.pipeline import RunConfig, prune_export  # noqa: E402
from vlcompress.speedup_search import TargetUnreachableError  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="clip-vit-b16")
    ap.add_argument("--method", default="magnitude")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--quantize", default="int8")
    ap.add_argument("--quantize-method", default="static")
    ap.add_argument("--calibration-size", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime intra-op threads for every variant (default: its own)")
    ap.add_argument("--target-speedup", type=float, default=None,
                    help="search the lowest structured sparsity reaching it (--sparsity ignored; "
                         "writes quant_target_speedup.json)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    load0 = list(os.getloadavg())  # the machine is shared: say how loaded it was
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(model=a.model, tower="vision", method=a.method,
                        sparsity=None if a.target_speedup else a.sparsity,  # the search picks
                        pattern="structured", calibration_size=a.calibration_size, eval_size=16,
                        batch_sizes=a.batch_sizes, iterations=a.iterations, warmup=a.warmup,
                        quantize=a.quantize, quantize_method=a.quantize_method,
                        target_speedup=a.target_speedup, out=str(Path(tmp) / "run"))
        if a.threads:  # RunConfig has no --threads; the latency config carries it
            object.__setattr__(cfg, "latency_config",
                               replace(cfg.latency_config, threads=a.threads))
        try:
            report = prune_export(cfg)
        except TargetUnreachableError as exc:  # the search's one line, recorded as the result
            print(exc, flush=True)
            path = write_result("quant_target_speedup", {
                "target_speedup": a.target_speedup, "reached": False, "message": str(exc),
                "threads": a.threads, "iterations": a.iterations,
                "loadavg_before": load0, "loadavg_after": list(os.getloadavg()),
                "seconds": round(time.perf_counter() - t0, 1)}, a.out)
            print(f"wrote {path}")
            return
    q = a.quantize
    rows = []
    for r in report["latency"]:
        if q == "none":  # --target-speedup without quantization: dense vs pruned only
            row = {"tower": r["tower"], "batch": r["batch"],
                   "dense_p50_ms": round(r["dense_ms"]["p50"], 3),
                   "pruned_p50_ms": round(r["pruned_ms"]["p50"], 3),
                   "pruned_speedup": round(r["speedup"], 3)}
        else:
            v = r["variants"]
            row = {"tower": r["tower"], "batch": r["batch"],
                   **{f"{k}_p50_ms": round(x["ms"]["p50"], 3) for k, x in v.items()},
                   **{f"{k}_speedup": round(x["speedup"], 3) for k, x in v.items()},
                   "pruned_q_vs_dense_q": round(r["gain_over_quantized"], 3)}
            row["goal_3x_over_dense"] = v[f"pruned_{q}"]["speedup"] >= 3.0
            row["goal_1.7x_over_dense_q"] = r["gain_over_quantized"] >= 1.7
        rows.append(row)
        print(row, flush=True)
    sp = "" if a.target_speedup else f" --sparsity {a.sparsity}"  # the search picks it
    cmd = (f"vlcompress prune-export --model {a.model} --tower vision --method {a.method} "
           f"--pattern structured{sp} --quantize {q} --quantize-method "
           f"{a.quantize_method} --calibration-size {a.calibration_size} --eval-size 16 "
           f"--batch-sizes {a.batch_sizes} --iterations {a.iterations}")
    if a.target_speedup:
        cmd += f" --target-speedup {a.target_speedup}"
    name = "quant_target_speedup" if a.target_speedup else "quant_speedup"
    path = write_result(name, {
        "target_speedup": report.get("target_speedup"), "achieved": report["prune"]["achieved"],
        "command": "python benchmarks/quant_speedup.py " + " ".join(sys.argv[1:]),
        "cli_equivalent": cmd, "rows": rows,
        "accuracy": (report["quantize"]["accuracy"] if q != "none"
                     else report.get("accuracy")),
        "quantize": report["quantize"]["files"] if q != "none" else None,
        "iterations": a.iterations, "warmup": a.warmup, "threads": a.threads,
        "loadavg_before": load0, "loadavg_after": list(os.getloadavg()),
        "seconds": round(time.perf_counter() - t0, 1)}, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
