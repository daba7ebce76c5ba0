"""SparseGPT's arithmetic, part by part, and how its masks move with float rounding.

    python benchmarks/obs_parts.py [--threads 1] [--repeats 3]
                                   [--out benchmarks/results/obs_parts.json]

1. **Timings** (one thread by default, the variants interleaved, median of ``--repeats``), at
   the ViT-B/16 widths d = 768 and 3072 over T = 1576 tokens (8 images):

   - the upper Cholesky factor of the dampened inverse Hessian: the reference's three cubic
     steps (``cholesky``, ``cholesky_inverse``, ``cholesky(upper=True)``) against ours
     (:func:`vlcompress.sparsity.obs.inverse_hessian_cholesky`: flipped Cholesky + LAPACK
     ``trtri``), with their largest relative difference;
   - the Gram matrix ``X^T X``: one full product, the block triangle
     (:func:`vlcompress.calibrate._sym_gram`) and BLAS ``ssyrk`` (``_gram_lower``);
   - completing a lower triangle: ``tril(g) + tril(g, -1).T`` against
     :func:`vlcompress.calibrate.mirror_lower`.

2. **Rounding** (tiny-clip, sparsegpt 2:4 through ``prune``): the fraction of mask entries
   that differ, and the mean error ratio, between one thread and two, and after scaling every
   weight by 1 + 1e-7. Then, on tiny-clip's block-0 layers, the mask entries where the float32
   sweep differs from the float64 column loop (``obs_prune_columns``), with the reference's
   three-step factor and with ours, at 12 and 64 calibration pairs, for 2:4, 50% unstructured
   and 1:4 with lazy blocks of 8, and the worst ratio of their reconstruction errors.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

from vlcompress.calibrate import _gram_lower, _sym_gram, collect_stats, mirror_lower  # noqa: E402
from vlcompress.sparsity.obs import (  # noqa: E402
    inverse_hessian_cholesky,
    obs_prune,
    obs_prune_columns,
    reconstruction_error,
)

TOKENS = 1576
WIDTHS = (768, 3072)
PERCDAMP = 0.01


def reference_factor(gram: torch.Tensor, percdamp: float = PERCDAMP) -> torch.Tensor:
    """The reference's sequence (``fasterprune``), float32."""
    dead = torch.diag(gram) == 0
    h = gram.clone()
    h[dead, dead] = 1.0
    h.diagonal().add_(percdamp * float(torch.diag(gram).masked_fill(dead, 1.0).double().mean()))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _timed(fns: dict, repeats: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats + 1):  # the first round warms up
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: round(statistics.median(v[1:]), 4) for k, v in times.items()}


def _width(d: int, x: torch.Tensor, repeats: int) -> dict:
    gram = x.t() @ x
    ref, (ours, _) = reference_factor(gram), inverse_hessian_cholesky(gram, PERCDAMP)
    return {
        "d": d, "tokens": x.shape[0],
        "factor_s": _timed({"reference_three_steps": lambda: reference_factor(gram),
                            "ours_flipped_trtri": lambda: inverse_hessian_cholesky(
                                gram, PERCDAMP)}, repeats),
        "factor_max_rel_diff": float((ours - ref).abs().max() / ref.abs().max()),
        "gram_s": _timed({"full_product": lambda: x.t() @ x,
                          "block_triangle": lambda: _sym_gram(x),
                          "ssyrk": lambda: _gram_lower(x)}, repeats),
        "mirror_s": _timed({"tril_plus_transpose": lambda: torch.tril(gram)
                            + torch.tril(gram, -1).t(),
                            "mirror_lower": lambda: mirror_lower(gram)}, repeats),
    }


def timings(repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for d in WIDTHS:
        rows.append(_width(d, torch.randn(TOKENS, d, generator=gen), repeats))
        print(rows[-1], flush=True)
    return rows


def _agreement(a, b) -> float:
    eq = sum(int((a.masks[k] == b.masks[k]).sum()) for k in a.masks)
    return eq / sum(m.numel() for m in a.masks.values())


def rounding() -> dict:
    from vlcompress.data import load_calibration
    from vlcompress.models import load_model
    from vlcompress.prune import prune

    vlm = load_model("tiny-clip")
    data = load_calibration("shapes", n=12, batch_size=4)
    threads = torch.get_num_threads()
    res = {}
    for t in (1, 2):
        torch.set_num_threads(t)
        res[t] = prune(copy.deepcopy(vlm), "sparsegpt", pattern="2:4", calibration=data)
    torch.set_num_threads(1)
    scaled = copy.deepcopy(vlm)
    with torch.no_grad():
        for p in scaled.model.parameters():
            p.mul_(1 + 1e-7)
    res["scaled"] = prune(scaled, "sparsegpt", pattern="2:4", calibration=data)
    torch.set_num_threads(threads)
    out = {"model": "tiny-clip", "pairs": 12, "pattern": "2:4",
           "differ_threads_1_vs_2": 1 - _agreement(res[1], res[2]),
           "differ_weights_times_1_plus_1e-7": 1 - _agreement(res[1], res["scaled"]),
           "error_ratio": {"threads_1": res[1].details["error_ratio"],
                           "threads_2": res[2].details["error_ratio"],
                           "scaled": res["scaled"].details["error_ratio"]},
           "flips_vs_float64": []}
    layers = [ly for ly in vlm.prunable_layers() if ly.block == 0]
    for n in (12, 64):
        stats = collect_stats(vlm, load_calibration("shapes", n=n, batch_size=4), layers,
                              gram=True)
        for kw in (dict(n=2, m=4), dict(sparsity=0.5), dict(n=1, m=4, blocksize=8)):
            row = {"pairs": n, "setting": {k: v for k, v in kw.items()}}
            for name, factor in (("reference", lambda g: (reference_factor(g),
                                                          torch.diag(g) == 0)),
                                 ("ours", lambda g: inverse_hessian_cholesky(g, PERCDAMP))):
                flips = total = 0
                worst = 1.0
                for ly in layers:
                    g = stats[ly.name].gram
                    want_w, want_keep = obs_prune_columns(ly.weight, g, **kw)
                    w32, k32 = obs_prune(ly.weight, None, hinv=factor(g), **kw)
                    flips += int((k32 != want_keep).sum())
                    total += k32.numel()
                    e = reconstruction_error(ly.weight, w32, g) / reconstruction_error(
                        ly.weight, want_w, g)
                    worst = max(worst, e, 1 / e)
                row[name] = {"flips": flips, "entries": total, "worst_error_ratio": worst}
            out["flips_vs_float64"].append(row)
            print(row, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload = {"threads": args.threads, "repeats": args.repeats,
               "timings": timings(args.repeats), "rounding": rounding()}
    path = write_result("obs_parts", payload, args.out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
