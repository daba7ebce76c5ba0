"""What does pruning cost next to one forward pass over the calibration data?

    python benchmarks/prune_cost.py [--model tiny-clip] [--n 256] [--batch-size 32]
                                    [--repeats 5] [--threads N]
                                    [--out benchmarks/results/prune_cost.json]

In one process, alternating, ``--repeats`` times each:

- forward: encode every calibration batch (``vlm.encode``: image processor + tokenizer) and
  run one ``torch.no_grad`` forward of the model. Encoding is included on purpose, because
  ``prune`` has to encode the same batches for its calibration pass: both sides do the same
  data work, so the ratio measures what pruning adds (hooks, scoring, allocation, masking).
- prune: ``prune(vlm, method="multiflow", pattern="2:4", calibration=data)`` on a fresh copy
  of the dense model (the copy is made outside the timed region).

Writes medians, the ratio prune / forward (target <= 1.5), the breakdown of the prune time
(calibration vs the rest) and the provenance of the run (``_common.write_result``) as JSON.
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

TARGET_RATIO = 1.5


def forward_pass(vlm, data) -> None:
    with torch.no_grad():
        for batch in data.batches():
            vlm.model(**vlm.encode(batch))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--method", default="multiflow")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--out", default="benchmarks/results/prune_cost.json")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from vlcompress.data import load_calibration
    from vlcompress.models import load_model
    from vlcompress.prune import prune

    dense = load_model(args.model)
    data = load_calibration("shapes", n=args.n, batch_size=args.batch_size)
    # Warm-up: one forward and one prune (first-call costs: allocator, lazy imports).
    forward_pass(dense, data)
    prune(copy.deepcopy(dense), args.method, pattern=args.pattern, calibration=data)

    fwd, prn, calib = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        forward_pass(dense, data)
        fwd.append(time.perf_counter() - t)
        vlm = copy.deepcopy(dense)
        t = time.perf_counter()
        res = prune(vlm, args.method, pattern=args.pattern, calibration=data)
        prn.append(time.perf_counter() - t)
        calib.append(res.calibration_seconds)

    f, p, c = statistics.median(fwd), statistics.median(prn), statistics.median(calib)
    out = {
        "model": args.model,
        "n_pairs": args.n,
        "batch_size": args.batch_size,
        "method": args.method,
        "pattern": args.pattern,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "forward_includes_encoding": True,
        "forward_s": {"median": f, "all": fwd},
        "prune_s": {"median": p, "all": prn},
        "prune_calibration_s": {"median": c, "all": calib},
        "prune_other_s": p - c,
        "ratio": p / f,
        "target_ratio": TARGET_RATIO,
        "ok": p / f <= TARGET_RATIO,
        "achieved": res.achieved,
    }
    path = write_result("prune_cost", out, args.out)
    print(f"forward {f:.3f}s  prune {p:.3f}s (calibration {c:.3f}s, rest {p - c:.3f}s)  "
          f"ratio {p / f:.2f} (target <= {TARGET_RATIO})  -> {path}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
