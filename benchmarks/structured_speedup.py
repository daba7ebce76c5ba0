"""Structured pruning speedup: clip-vit-b16 vision tower on ONNX Runtime CPU.

    python benchmarks/structured_speedup.py            # writes benchmarks/results/structured_speedup.json
    python benchmarks/structured_speedup.py --method magnitude --iterations 10,4

Four models of the ``clip-vit-b16`` preset's vision tower (randomly initialised; latency does
not depend on the weights), all exported to ONNX fp32 and validated against PyTorch:

- ``dense``: 12 layers x 12 heads, MLP 3072;
- ``structured25`` / ``structured50``: ``prune(..., pattern="structured", scope="vision")``
  at 25% / 50% with ``--method`` (multiflow by default, on ``--calibration-size`` bundled
  pairs), heads and neurons, widths rounded to 8;
- ``hand50``: the limit, every layer sliced by hand to 6 of 12 heads and half the MLP (1536).

All four run interleaved in one process (``vlcompress.runtime.latency.measure``: round robin,
order reversed every other iteration), at batch 1 and 8. The target: our 50% model's p50
within 5% of the hand-sliced one's in the same run. Iterations are reduced to fit ~10 minutes
on a 2-core machine; the counts used are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

from vlcompress import load_calibration, load_model, prune  # noqa: E402
from vlcompress.exporters.onnx import export_tower, validate_tower  # noqa: E402
from vlcompress.flops import tower_size  # noqa: E402
from vlcompress.models.surgery import STRUCTURED_FLAG, find_blocks, slice_block  # noqa: E402
from vlcompress.runtime.latency import make_feeds, measure, summary  # noqa: E402
from vlcompress.runtime.ort_runner import OrtRunner  # noqa: E402


def hand_sliced(vlm, heads: int, mlp: int):
    """A copy of ``vlm`` whose vision layers keep their first ``heads`` heads and ``mlp``
    neurons (uniform; the speed limit for this size)."""
    v = copy.deepcopy(vlm)
    for b in find_blocks(v):
        if b.modality == "vision":
            slice_block(b, torch.arange(heads), torch.arange(mlp))
    setattr(v.model, STRUCTURED_FLAG, True)
    return v


def vision_shape(vlm) -> dict:
    bl = [b for b in find_blocks(vlm) if b.modality == "vision"]
    return {"heads": [b.num_heads for b in bl], "mlp": [b.mlp_width for b in bl]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="clip-vit-b16")
    ap.add_argument("--method", default="multiflow")
    ap.add_argument("--calibration-size", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--iterations", default="20,6", help="timed iterations per batch size")
    ap.add_argument("--warmup", default="3,1", help="warm-up iterations per batch size")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (None: all)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    iters = [int(x) for x in a.iterations.split(",")]
    warm = [int(x) for x in a.warmup.split(",")]
    dense = load_model(a.model)
    calib = load_calibration("shapes", n=a.calibration_size, batch_size=a.calibration_size)
    batches = iter(load_calibration("shapes", n=5, batch_size=3, seed=1).batches())
    example, check = next(batches), next(batches)

    models = {"dense": dense}
    prune_info = {}
    for label, s in (("structured25", 0.25), ("structured50", 0.5)):
        v = copy.deepcopy(dense)
        t = time.perf_counter()
        res = prune(v, a.method, s, "structured", calibration=calib, scope="vision")
        prune_info[label] = {"sparsity": s, "achieved": res.achieved,
                             "seconds": round(time.perf_counter() - t, 2),
                             "allocation": res.allocation,
                             "verify_max_abs_diff": res.details["structured"]["verify_max_abs_diff"]}
        models[label] = v
        print(f"{label}: pruned in {prune_info[label]['seconds']}s, achieved {res.achieved:.3f}",
              flush=True)
    vc = dense.model.config.vision_config
    models["hand50"] = hand_sliced(dense, vc.num_attention_heads // 2, vc.intermediate_size // 2)

    sizes = {k: tower_size(v)["vision"] for k, v in models.items()}
    shapes = {k: vision_shape(v) for k, v in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        paths, diffs = {}, {}
        for k, v in models.items():
            t = time.perf_counter()
            paths[k] = export_tower(v, "vision", Path(tmp) / f"{k}.onnx", example)
            diffs[k] = validate_tower(v, "vision", paths[k], check)["max_abs_diff"]
            print(f"exported {k} in {time.perf_counter() - t:.1f}s (max abs diff {diffs[k]:.2e})",
                  flush=True)
        feeds = make_feeds(dense, ["vision"], batch_sizes, example)
        rows = []
        runners = {k: OrtRunner(p, threads=a.threads) for k, p in paths.items()}
        for r in runners.values():
            r.activate()
        try:
            for i, b in enumerate(batch_sizes):
                n_it, n_w = iters[min(i, len(iters) - 1)], warm[min(i, len(warm) - 1)]
                feed = feeds[("vision", b)]
                t = time.perf_counter()
                times = measure({k: (r, feed) for k, r in runners.items()}, warmup=n_w,
                                iterations=n_it)
                st = {k: summary(v) for k, v in times.items()}
                d50 = st["dense"]["p50"]
                row = {"batch": b, "iterations": n_it, "warmup": n_w,
                       "seconds": round(time.perf_counter() - t, 1),
                       "ms": st,
                       "speedup_vs_dense": {k: d50 / v["p50"] for k, v in st.items()},
                       "structured50_vs_hand50": st["structured50"]["p50"] / st["hand50"]["p50"]}
                rows.append(row)
                print(f"batch {b}: " + ", ".join(f"{k} {v['p50']:.1f} ms" for k, v in st.items())
                      + f"; ours50/hand50 = {row['structured50_vs_hand50']:.3f}", flush=True)
        finally:
            for r in runners.values():
                r.deactivate()
    res = {
        "model": a.model, "tower": "vision", "runtime": "onnxruntime", "device": "cpu",
        "threads": a.threads, "method": a.method, "calibration_pairs": a.calibration_size,
        "prune": prune_info, "shapes": shapes, "size": sizes, "onnx_max_abs_diff": diffs,
        "rows": rows,
        "target": "structured50 p50 within 5% of hand50 p50 (ratio <= 1.05)",
        "target_met": all(r["structured50_vs_hand50"] <= 1.05 for r in rows),
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    path = write_result("structured_speedup", res, a.out)
    print(f"wrote {path} in {res['seconds_total']}s")


if __name__ == "__main__":
    main()
