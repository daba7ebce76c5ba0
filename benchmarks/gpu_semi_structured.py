"""Where does a 2:4 (semi-structured) linear spend its time on this GPU?

    python benchmarks/gpu_semi_structured.py [--out benchmarks/results/gpu_semi_structured.json]
                                             [--profile PATH]

``scripts/gpu_check.sh`` measured, on one H200 (torch 2.11, cuSPARSELt), the 2:4 CLIP vision
towers 10x *slower* than dense fp16 at batch 1 and 2.7x slower at batch 256: about 0.6 ms
more per swapped layer, whatever the batch, which points at a per-call cost rather than the
kernels. The first run of this script (``results/gpu_check_h200/gpu_semi_structured_*.log``)
showed it: 768->768 at 197 tokens, dense 0.022 ms, ``semi`` 0.810 ms on the GPU clock and
0.811 ms of host time to issue each call, so the GPU waits on the host. The graph-replay
variants below measure the kernels alone.

This isolates it on the ViT-B/16 layer shapes (768->768, 768->3072, 3072->768) at 197, 1576
and 12608 tokens (batch 1, 8, 64), fp16, CUDA events around 100 calls after a warm-up, and
host time around the same loop:

- ``dense``: ``F.linear(x, w)``;
- ``semi``: ``F.linear(x, to_sparse_semi_structured(w))``, what our runner swaps in;
- ``cslt``: ``torch._cslt_sparse_mm(_cslt_compress(w), x.t(), transpose_result=True)``, the
  cuSPARSELt op without the tensor subclass (default algorithm);
- ``cslt_search`` / ``semi_search``: the same with the algorithm ``_cslt_sparse_mm_search``
  picks for that shape;
- ``dense_graph`` / ``semi_graph``: 20 calls captured in one CUDA graph and replayed (the
  kernels alone, no per-call host work): what a graph-replaying runner would pay;
- ``planned`` / ``planned_graph``: ``vlcompress.runtime.graphs.PlannedSparseLinear``, what the
  torch-2:4 runner now uses (one algorithm search and one padded input buffer per token
  count, no per-call ``F.pad``/narrow copies), called directly and under graph replay: the
  2:4 cost a graph-replaying runner pays per layer.

cuSPARSELt's direct op and its search need the token count to be a multiple of 16 (197
raised "operation not supported" in ``cusparseLtDenseDescriptorInit`` and left the CUDA
context unusable): they run on the count rounded up to 16, as the tensor subclass pads.

Each variant's failure is recorded, not fatal. ``--profile`` writes torch.profiler's tables
for ``semi`` at 1576 tokens, 768->3072 (host ops and GPU kernels).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

SHAPES = ((768, 768), (3072, 768), (768, 3072))  # (out, in)
TOKENS = (197, 1576, 12608)
ITERS, WARMUP = 100, 10


def _w24(out_f: int, in_f: int) -> torch.Tensor:
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
    g = w.view(out_f, in_f // 4, 4)
    idx = g.abs().topk(2, dim=-1, largest=False).indices
    g.scatter_(-1, idx, 0)
    return w


def _time(fn) -> dict:
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    start.record()
    for _ in range(ITERS):
        fn()
    end.record()
    host_issue = time.perf_counter() - t  # host time to issue the calls
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    return {"gpu_ms": start.elapsed_time(end) / ITERS, "host_issue_ms": 1e3 * host_issue / ITERS,
            "wall_ms": 1e3 * wall / ITERS}


def _graph_time(fn, calls: int = 20, replays: int = 10) -> dict:
    """ms per call of ``fn`` replayed from one CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return {"gpu_ms": start.elapsed_time(end) / (calls * replays)}


def _variants(w: torch.Tensor, x: torch.Tensor) -> dict:
    out: dict = {}
    t = x.shape[0]
    xa = x if t % 16 == 0 else torch.nn.functional.pad(x, (0, 0, 0, 16 - t % 16))
    out["aligned_tokens"] = xa.shape[0]

    def run(name, make):
        try:
            fn = make()
            out[name] = _time(fn)
        except Exception as exc:  # noqa: BLE001 - recorded per variant
            out[name] = {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}

    run("dense", lambda: (lambda: F.linear(x, w)))
    ws = torch.sparse.to_sparse_semi_structured(w)
    run("semi", lambda: (lambda: F.linear(x, ws)))
    packed = torch._cslt_compress(w)
    run("cslt", lambda: (lambda: torch._cslt_sparse_mm(packed, xa.t(), transpose_result=True)))
    try:
        alg = torch._cslt_sparse_mm_search(packed, xa.t())
        out["searched_alg"] = alg if isinstance(alg, int) else repr(alg)
    except Exception as exc:  # noqa: BLE001
        alg = None
        out["searched_alg"] = {"error": " ".join(str(exc).split())[:300]}
    if isinstance(alg, int):
        run("cslt_search", lambda: (lambda: torch._cslt_sparse_mm(
            packed, xa.t(), transpose_result=True, alg_id=alg)))
        ws2 = torch.sparse.to_sparse_semi_structured(w)
        ws2.alg_id_cusparselt = alg
        run("semi_search", lambda: (lambda: F.linear(x, ws2)))
    from vlcompress.runtime.graphs import PlannedSparseLinear

    try:
        planned = PlannedSparseLinear(w, None)
        planned(x)  # its search and buffer for this token count, before any timing
        out["planned_searches"] = planned.searches
        run("planned", lambda: (lambda: planned(x)))
    except Exception as exc:  # noqa: BLE001
        planned = None
        out["planned"] = {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}
    graphs = [("dense_graph", lambda: F.linear(x, w)), ("semi_graph", lambda: F.linear(x, ws))]
    if planned is not None:
        graphs.append(("planned_graph", lambda: planned(x)))
    for name, fn in graphs:
        try:
            out[name] = _graph_time(fn)
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}
    ref = F.linear(x, w).float()
    got = F.linear(x, ws).float()
    out["semi_max_rel_err"] = float((got - ref).abs().max() / ref.abs().max())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_semi_structured.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    payload = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "cusparselt": getattr(torch.backends.cusparselt, "version", lambda: None)(),
               "iterations": ITERS, "warmup": WARMUP, "dtype": "float16", "rows": rows}
    for out_f, in_f in SHAPES:
        w = _w24(out_f, in_f)
        for t in TOKENS:
            x = torch.randn(t, in_f, device="cuda", dtype=torch.float16)
            row = {"out": out_f, "in": in_f, "tokens": t, **_variants(w, x)}
            rows.append(row)
            cells = "  ".join(f"{k} {v['gpu_ms']:.4f}/{v.get('host_issue_ms', 0):.3f}"
                              for k, v in row.items() if isinstance(v, dict) and "gpu_ms" in v)
            print(f"{in_f:5d}->{out_f:5d} T={t:6d}  gpu/host-issue ms: {cells}  "
                  f"alg {row.get('searched_alg')}", flush=True)
            write_result("gpu_semi_structured", payload, args.out)  # what ran survives a crash
    path = write_result("gpu_semi_structured", payload, args.out)
    print(f"-> {path}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        w = _w24(3072, 768)
        ws = torch.sparse.to_sparse_semi_structured(w)
        x = torch.randn(1576, 768, device="cuda", dtype=torch.float16)
        for _ in range(5):
            F.linear(x, ws)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                F.linear(x, ws)
            torch.cuda.synchronize()
        ka = prof.key_averages()
        Path(args.profile).write_text(
            "by GPU time\n" + ka.table(sort_by="cuda_time_total", row_limit=15)
            + "\n\nby host time\n" + ka.table(sort_by="cpu_time_total", row_limit=15))
        print(f"profile -> {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
