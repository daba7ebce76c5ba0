"""Accuracy of quantization on top of sparsity: tiny-clip, dense / dense int8 / pruned / pruned
int8, at 2:4 and at structured 50% with recovery; and which op types stay fp32.

    python benchmarks/quant_quality.py          # writes benchmarks/results/quant_quality.json

Part 1 runs the product as shipped, once per pattern: ``prune_export(RunConfig(model=
"tiny-clip", method="multiflow", pattern=..., quantize="int8", ...))`` (CLI equivalents are in
the JSON, ``runs[].cli_equivalent``). Every variant's accuracy is measured from its ONNX files
on ONNX Runtime CPU over the bundled eval split (zero-shot top-1, image<->text R@1/R@5,
fidelity = mean cosine to the dense fp32 PyTorch embeddings). int8 = static QDQ, per-channel
symmetric int8 weights, uint8 activations calibrated (MinMax) on the first 64 calibration pairs.
Goal: structured 50% + int8 + recovery within 1 point of zero-shot top-1 of dense fp32.

Part 2 (``quant_ops``) justifies what stays fp32 (``exporters/quantize.py``'s module doc):
the dense and the recovered structured model quantized two ways -- weight-bearing ops only
(MatMul/Gemm with a weight, Conv: the shipped default) and, in addition, the attention's
activation x activation MatMuls (``Q K^T``, ``softmax V``; ``quantize_activation_matmuls=True``)
-- evaluated the same way and timed interleaved against dense fp32 (ONNX Runtime CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

from vlcompress.pipeline import RunConfig, prune_export  # noqa: E402

KEYS = ("zeroshot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")


def _variants(report: dict) -> dict:
    acc = report["quantize"]["accuracy"]["variants"]
    return {k: {**{m: round(v, 5) for m, v in x["metrics"].items()},
                **{m: round(v, 5) for m, v in x["fidelity"].items()}} for k, x in acc.items()}


def run_pattern(a, pattern: str, recover: int, root: Path) -> tuple[dict, Path]:
    sparsity = a.sparsity if pattern == "structured" else None
    cfg = RunConfig(model=a.model, method=a.method, sparsity=sparsity, pattern=pattern,
                    calibration_size=a.calibration_size, eval_size=a.eval_size,
                    recover_steps=recover, quantize="int8", batch_sizes=a.batch_sizes,
                    iterations=a.iterations, warmup=2, out=str(root / pattern.replace(":", "_")))
    t0 = time.perf_counter()
    rep = prune_export(cfg)
    v = _variants(rep)
    d = v["dense"]["zeroshot_top1"]
    cli = (f"vlcompress prune-export --model {a.model} --method {a.method} --pattern {pattern}"
           + (f" --sparsity {sparsity}" if sparsity else "")
           + (f" --recover-steps {recover}" if recover else "")
           + f" --quantize int8 --calibration-size {a.calibration_size} --eval-size "
           f"{a.eval_size} --batch-sizes {a.batch_sizes} --iterations {a.iterations}")
    lat = [{"tower": r["tower"], "batch": r["batch"],
            **{f"{k}_p50_ms": round(x["ms"]["p50"], 4) for k, x in r["variants"].items()},
            "pruned_int8_vs_dense_int8": round(r["gain_over_quantized"], 3)}
           for r in rep["latency"]]
    row = {"pattern": pattern, "sparsity": sparsity, "achieved": rep["prune"]["achieved"],
           "recover_steps": recover, "cli_equivalent": cli, "variants": v,
           "zeroshot_drop_points": {k: round(100 * (d - x["zeroshot_top1"]), 2)
                                    for k, x in v.items()},
           "nm_survives": rep["quantize"].get("nm_survives"),
           "float_ops": rep["quantize"]["files"]["pruned"]["vision"]["float_ops"],
           "latency": lat, "seconds": round(time.perf_counter() - t0, 1)}
    if pattern == "structured":
        row["goal_within_1_point"] = row["zeroshot_drop_points"]["pruned_int8"] <= 1.0
    return row, Path(cfg.out)


def quant_ops(a, run_dir: Path, work: Path) -> dict:
    """Weights-only int8 vs int8 with the attention MatMuls too, dense and pruned."""
    from dataclasses import replace

    from vlcompress.data import load_calibration, load_eval
    from vlcompress.eval import embed_eval, fidelity, metrics_from_embeddings
    from vlcompress.exporters.quantize import quantize_onnx
    from vlcompress.models import load_model
    from vlcompress.onnx_eval import onnx_embed_eval
    from vlcompress.pipeline import export_examples
    from vlcompress.quantized_variants import calibration_feeds
    from vlcompress.runtime.latency import make_feeds
    from vlcompress.runtime.registry import Artefacts, BuildOptions, LatencyConfig, get_runtime
    from vlcompress.runtime.timing import time_variants

    calib = load_calibration("shapes", n=a.calibration_size, batch_size=32)
    data = load_eval("shapes", n=a.eval_size)
    dense = load_model(a.model)
    dense_emb = embed_eval(dense, data)
    rt = get_runtime("onnxruntime")
    bs = tuple(int(b) for b in a.batch_sizes.split(","))
    lc = LatencyConfig(batch_sizes=bs, warmup=2, iterations=a.iterations)
    out = {}
    for name, folder, vlm in (("dense", run_dir / "dense", dense),
                              ("pruned", run_dir / "pruned",
                               load_model(str(run_dir / "pruned" / "model")))):
        towers = [t for t in vlm.towers if (folder / f"{t}.onnx").is_file()]
        fp32 = {t: folder / f"{t}.onnx" for t in towers}
        feeds = {t: calibration_feeds(vlm, t, calib) for t in towers}
        variants = {"fp32": fp32}
        for label, act in (("int8_weights_only", False), ("int8_with_attention_matmuls", True)):
            variants[label] = {}
            for t in towers:
                dst = work / name / label / f"{t}.onnx"
                quantize_onnx(fp32[t], dst, "int8", calibration=feeds[t],
                              quantize_activation_matmuls=act)
                variants[label][t] = dst
        acc = {}
        for label, paths in variants.items():
            e = onnx_embed_eval(vlm, paths, data)
            acc[label] = {**{k: round(v, 5) for k, v in metrics_from_embeddings(e).items()},
                          **{k: round(v, 5) for k, v in fidelity(dense_emb, e).items()}}
        lat_feeds = make_feeds(vlm, towers, bs, export_examples(calib)[0])
        rows = time_variants({k: (rt, Artefacts(k, onnx=p)) for k, p in variants.items()},
                             lat_feeds, replace(lc, towers=tuple(towers)), towers=towers,
                             options=BuildOptions(threads=a.threads, batch_sizes=bs))
        lat = [{"tower": r["tower"], "batch": r["batch"],
                **{f"{k}_p50_ms": round(x["ms"]["p50"], 4) for k, x in r["variants"].items()},
                **{f"{k}_speedup": round(x["speedup"], 3) for k, x in r["variants"].items()}}
               for r in rows]
        out[name] = {"accuracy": acc, "latency": lat}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--method", default="multiflow")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--patterns", default="2:4,structured")
    ap.add_argument("--recover-steps", type=int, default=1200,
                    help="distillation steps after structured pruning (2:4: none)")
    ap.add_argument("--calibration-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=720)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime intra-op threads in the quant_ops timing")
    ap.add_argument("--skip-ops", action="store_true", help="part 1 only")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    load0 = list(os.getloadavg())
    runs, ops = [], None
    with tempfile.TemporaryDirectory(prefix="vlc-qq-") as td:
        for pattern in [p.strip() for p in a.patterns.split(",") if p.strip()]:
            row, run_dir = run_pattern(a, pattern, a.recover_steps if pattern == "structured"
                                       else 0, Path(td))
            runs.append(row)
            print({k: row[k] for k in ("pattern", "achieved", "zeroshot_drop_points")},
                  flush=True)
            if pattern == "structured" and not a.skip_ops:
                ops = quant_ops(a, run_dir, Path(td) / "ops")
                print("quant_ops", ops, flush=True)
    path = write_result("quant_quality", {
        "model": a.model, "method": a.method, "runs": runs, "quant_ops": ops,
        "eval": {"source": "shapes:eval", "n": a.eval_size},
        "calibration_pairs": a.calibration_size, "quantization_calibration_pairs": 64,
        "loadavg_before": load0, "loadavg_after": list(os.getloadavg()),
        "seconds": round(time.perf_counter() - t0, 1)}, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
