"""SparseGPT's per-layer OBS cost: today's obs_prune against the float64 column loop it replaced.

    python benchmarks/obs_sweep.py [--shapes 768x768,768x3072,1024x4096] [--repeats 3]
                                   [--threads 1] [--out benchmarks/results/obs_sweep.json]

For each ``d_out x d_in`` (a ViT-B/16 attention or fc1 layer, its fc2, a ViT-L/14 fc2) a
random weight and the Gram matrix of random correlated inputs (4 x d_in tokens); per repeat,
interleaved: ``obs_prune_columns`` (float64, one column at a time: the old code), the
inverse-Hessian factor alone (float32, ``inverse_hessian_cholesky``) and ``obs_prune``
(float32, factor + N:M group sweep), all 2:4. Medians, the speedup, and whether the masks
agree (count of differing entries: float32 near-ties).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="768x768,768x3072,1024x4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import write_result
    from prune_cost import _git_commit

    from vlcompress.sparsity.obs import inverse_hessian_cholesky, obs_prune, obs_prune_columns

    commit = _git_commit()
    rows = []
    for shape in args.shapes.split(","):
        d_out, d_in = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(d_in)
        x = torch.randn(4 * d_in, d_in, generator=g) @ (
            torch.eye(d_in) + 0.05 * torch.randn(d_in, d_in, generator=g))
        gram = x.t() @ x
        del x
        w = torch.randn(d_out, d_in, generator=g)
        old, fac, new = [], [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            _, keep_old = obs_prune_columns(w, gram, n=2, m=4)
            old.append(time.perf_counter() - t)
            t = time.perf_counter()
            inverse_hessian_cholesky(gram, 0.01)
            fac.append(time.perf_counter() - t)
            t = time.perf_counter()
            _, keep_new = obs_prune(w, gram, n=2, m=4)
            new.append(time.perf_counter() - t)
        o, f, n = (statistics.median(v) for v in (old, fac, new))
        row = {"d_out": d_out, "d_in": d_in, "old_float64_columns_s": o,
               "factor_float32_s": f, "new_float32_groups_s": n, "speedup": o / n,
               "mask_entries_differing": int((keep_old != keep_new).sum()),
               "all": {"old": old, "factor": fac, "new": new}}
        rows.append(row)
        print(f"{d_out}x{d_in}: old {o:.2f}s  new {n:.2f}s (factor {f:.2f}s)  "
              f"speedup {o / n:.1f}x  masks differ in {row['mask_entries_differing']}", flush=True)
    path = write_result("obs_sweep", {"command": "python " + " ".join(sys.argv),
                                      "git_commit": commit, "threads": args.threads, "repeats": args.repeats,
                                      "pattern": "2:4", "rows": rows}, args.out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
