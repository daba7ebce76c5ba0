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

Per method and depth (``--methods``; issue 17, the block-sequential engine):

    python benchmarks/prune_cost.py --models clip-vit-b16,clip-vit-l14 \
        --methods multiflow,sparsegpt --n 32 --batch-size 8 --threads 1 [--jobs 4] \
        [--out benchmarks/results/prune_cost_methods.json]

For each model x method a fresh process (so its peak RSS is its own) loads the model, runs
one warm-up no-grad forward over the calibration pairs (peak RSS after it: the dense
forward's), then, timed: forward, ``prune(method, pattern)``, forward (interleaved; the
ratio is prune over the mean of the two forwards), and reports the peak RSS after pruning.
Targets (issue 17): sparsegpt <= 3x one calibration pass, and peak RSS within 1.2x of the
dense forward's.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parse_spec, write_result  # noqa: E402

TARGET_RATIO = 1.5
TARGET_SOLVER_RATIO = 3.0  # sparsegpt prune / one calibration pass (issue 17)
TARGET_RSS_RATIO = 1.2  # peak RSS while pruning / peak RSS of the dense forward


def forward_pass(vlm, data) -> None:
    with torch.no_grad():
        for batch in data.batches():
            vlm.model(**vlm.model_inputs(vlm.encode(batch)))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(model: str, method: str, pattern: str, n: int, batch_size: int) -> dict:
    """One model x method in this (fresh) process: see the module doc."""
    from vlcompress.data import load_calibration
    from vlcompress.models import load_model
    from vlcompress.prune import prune

    vlm = load_model(model)
    rss_loaded = _peak_rss_mib()
    data = load_calibration("shapes", n=n, batch_size=batch_size)
    forward_pass(vlm, data)  # warm-up; its peak is the dense forward's
    rss_forward = _peak_rss_mib()
    t = time.perf_counter()
    forward_pass(vlm, data)
    f1 = time.perf_counter() - t
    t = time.perf_counter()
    name, opts = parse_spec(method)
    res = prune(vlm, name, pattern=pattern, calibration=data, method_options=opts)
    p = time.perf_counter() - t
    rss_prune = _peak_rss_mib()
    t = time.perf_counter()
    forward_pass(vlm, data)
    f2 = time.perf_counter() - t
    f = (f1 + f2) / 2
    blocks = sorted({(ly.modality, ly.block) for ly in vlm.prunable_layers()})
    return {"model": model, "method": method, "pattern": pattern,
            "blocks": len(blocks), "forward_s": [f1, f2], "prune_s": p,
            "prune_calibration_s": res.calibration_seconds, "ratio": p / f,
            "peak_rss_mib": {"loaded": rss_loaded, "dense_forward": rss_forward,
                             "after_prune": rss_prune},
            "rss_ratio": rss_prune / rss_forward, "achieved": res.achieved,
            "details": {k: v for k, v in res.details.items() if not isinstance(v, list)}}


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "vlcompress",
                                "benchmarks"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def per_method(args) -> int:
    """Every model x method in its own process; one JSON with the ratios and peak RSS."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args.git_commit = _git_commit()  # the code the children run, not HEAD when they finish
    cmds = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", model, method, "--pattern", args.pattern,
                   "--n", str(args.n), "--batch-size", str(args.batch_size)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            cmds.append((model, method, cmd))
    # --jobs > 1 runs that many children at once (each times its own forward and prune,
    # interleaved, so the ratios stay within one process; on a loaded machine this only
    # shortens the wall time).
    rows: list = [None] * len(cmds)
    running: list = []
    todo = list(enumerate(cmds))
    while todo or running:
        while todo and len(running) < max(1, args.jobs):
            i, (model, method, cmd) = todo.pop(0)
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            running.append((i, model, method, out, err,
                            subprocess.Popen(cmd, stdout=out, stderr=err, text=True)))
        i, model, method, out, err, proc = running.pop(0)
        proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        out.close()
        err.close()
        if proc.returncode:
            sys.stderr.write(stderr)
            raise SystemExit(f"{model} {method}: the child process failed")
        row = json.loads(stdout.strip().splitlines()[-1])
        rows[i] = row
        print(f"{model:14s} {method:10s} blocks {row['blocks']:3d}  prune {row['prune_s']:8.1f}s"
              f"  forward {sum(row['forward_s']) / 2:6.1f}s  ratio {row['ratio']:6.2f}"
              f"  peak RSS {row['peak_rss_mib']['after_prune']:7.0f} MiB"
              f" / dense forward {row['peak_rss_mib']['dense_forward']:7.0f} MiB"
              f" = {row['rss_ratio']:.2f}", flush=True)
        # a partial result survives a kill
        _write_methods(args, [r for r in rows if r is not None], complete=False)
    rows = [r for r in rows if r is not None]
    path = _write_methods(args, rows, complete=True)
    print(f"-> {path}")
    return 0 if _methods_ok(rows) else 1


def _methods_ok(rows) -> bool:
    return all(r["ratio"] <= TARGET_SOLVER_RATIO and r["rss_ratio"] <= TARGET_RSS_RATIO
               for r in rows if r["method"] == "sparsegpt")  # as shipped (no options)


def _write_methods(args, rows, *, complete: bool):
    from _common import write_result

    payload = {"command": "python " + " ".join(sys.argv), "git_commit": args.git_commit,
               "n_pairs": args.n, "batch_size": args.batch_size, "pattern": args.pattern,
               "threads": args.threads or torch.get_num_threads(),
               "forward_includes_encoding": True,
               "targets": {"sparsegpt_ratio": TARGET_SOLVER_RATIO,
                           "sparsegpt_rss_ratio": TARGET_RSS_RATIO},
               "complete": complete, "ok": _methods_ok(rows), "rows": rows}
    return write_result("prune_cost_methods", payload,
                        None if args.out == DEFAULT_OUT else args.out)


DEFAULT_OUT = "benchmarks/results/prune_cost.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--method", default="multiflow")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own choice)")
    ap.add_argument("--models", default=None,
                    help="comma list: per-method mode (with --methods), one process each")
    ap.add_argument("--methods", default=None,
                    help="comma list of methods (per-method mode), each with its options as "
                         "METHOD:KEY=VALUE;KEY=VALUE, e.g. sparsegpt:next_block_inputs=dense")
    ap.add_argument("--jobs", type=int, default=1,
                    help="per-method mode: children run at once (default 1)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child, args.pattern, args.n, args.batch_size)))
        return 0
    if args.methods:
        args.models = args.models or args.model
        return per_method(args)

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
