"""How reliable is the CI gate? False fails on an unchanged model, detection of real regressions.

    python benchmarks/gate_reliability.py          # ~25-35 minutes on 2 idle cores
    python benchmarks/gate_reliability.py --trials 5 --out /tmp/gr.json   # a quick look
    python benchmarks/gate_reliability.py --slowdowns 0.2 --no-accuracy-drop   # 20% only

Setup (all real, nothing simulated):

1. ``prune_export`` tiny-clip with multiflow, unstructured ``--base-sparsity`` (0.30): the
   deployed model. ``benchmark`` on that folder gives the cached baseline report.
2. **slower by a fraction f** (``--slowdowns``, default ``1.0,0.2``: 2x and +20%): a copy of
   the folder whose pruned ONNX graphs do extra work: for f = 1 every node and weight of the
   graph is duplicated under new names (``onnx.compose.add_prefix``); for f < 1 only the
   subgraph from the inputs to the output of the MatMul/Gemm at fraction f of them (in graph
   order) is duplicated (``onnx.utils.Extractor``), so about f of the matmul work is added.
   The copy's output is an extra graph output, so onnxruntime runs it (distinct weight
   tensors: no common-subexpression elimination can merge them). Dense ONNX and the pruned
   PyTorch model are untouched, so accuracy is unchanged and only latency regresses. The
   *measured* slowdown of each variant (median change over trials) is reported beside its
   detection count, since f is work added, not time.
3. **accuracy drop**: a fresh ``prune_export`` at a higher sparsity, the lowest of
   base + 0.04, 0.08, ... whose zero-shot top-1 is at least 5 points below the base model's
   on the same eval data (the measured drop is recorded).

Each trial round runs ``benchmark(folder, baseline=...)`` (the same call as
``vlcompress bench``) once per variant, interleaved, so machine-load drift hits all three
alike. Counted: unchanged passes (target 20/20), slow runs failed by a latency check
(20/20) per slowdown, drop runs failed by an accuracy check (20/20). Result:
``benchmarks/results/gate_reliability.json``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

from vlcompress import evaluate, load_calibration, load_eval, load_model, prune, prune_export  # noqa: E402
from vlcompress.bench import BenchConfig, benchmark  # noqa: E402
from vlcompress.gate import GateConfig  # noqa: E402


def double_graph(src: Path, dst: Path) -> None:
    """``dst``: the graph of ``src`` twice (second copy's names prefixed, its output added)."""
    import onnx
    import onnx.compose

    m = onnx.load(str(src))
    twin = onnx.compose.add_prefix(m, "twice_", rename_inputs=False, rename_outputs=True).graph
    m.graph.node.extend(twin.node)
    m.graph.initializer.extend(twin.initializer)
    m.graph.value_info.extend(twin.value_info)
    m.graph.output.extend(twin.output)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))


def partial_twin(src: Path, dst: Path, fraction: float) -> None:
    """``dst``: the graph of ``src`` plus a renamed copy of its subgraph up to the output of
    the MatMul/Gemm at ``fraction`` of them (``fraction >= 1``: the whole graph)."""
    import onnx
    import onnx.compose
    import onnx.utils

    if fraction >= 1:
        double_graph(src, dst)
        return
    m = onnx.load(str(src))
    mm = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm")]
    cut = mm[max(0, round(fraction * len(mm)) - 1)].output[0]
    inputs = [i.name for i in m.graph.input]
    sub = onnx.utils.Extractor(m).extract_model(inputs, [cut])
    twin = onnx.compose.add_prefix(sub, "extra_", rename_inputs=False, rename_outputs=True).graph
    shared = {f"extra_{n}": n for n in inputs}  # the copy reads the graph's own inputs
    for node in twin.node:
        for i, name in enumerate(node.input):
            if name in shared:
                node.input[i] = shared[name]
    m.graph.node.extend(twin.node)
    m.graph.initializer.extend(twin.initializer)
    m.graph.output.extend(twin.output)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))


def find_drop_sparsity(model: str, base: float, calib_n: int, eval_n: int, target: float = 0.05):
    calib = load_calibration("shapes", n=calib_n)
    data = load_eval("shapes", n=eval_n)
    vlm = load_model(model)
    prune(vlm, "multiflow", base, "unstructured", calibration=calib)
    ref = evaluate(vlm, data)["zeroshot_top1"]
    s = base
    while s < 0.9:
        s = round(s + 0.04, 4)
        vlm = load_model(model)
        prune(vlm, "multiflow", s, "unstructured", calibration=calib)
        acc = evaluate(vlm, data)["zeroshot_top1"]
        print(f"  sparsity {s:.2f}: zero-shot top-1 {100 * acc:.1f}% (base {100 * ref:.1f}%)", flush=True)
        if ref - acc >= target:
            return s, ref - acc
    raise RuntimeError("no sparsity below 0.9 drops accuracy by 5 points")


def slow_name(frac: float) -> str:
    """``slow_2x`` for the whole graph twice (the older files' name), ``slow_+20pct`` else."""
    return "slow_2x" if frac >= 1 else f"slow_+{round(100 * frac)}pct"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=80, help="timed iterations per latency cell")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--eval-size", type=int, default=144)
    ap.add_argument("--calibration-size", type=int, default=64)
    ap.add_argument("--base-sparsity", type=float, default=0.3)
    ap.add_argument("--max-latency-regression", type=float, default=0.10)
    ap.add_argument("--max-accuracy-drop", type=float, default=0.01)
    ap.add_argument("--slowdowns", default="1.0,0.2",
                    help="extra work added to the pruned graphs, fractions (1.0 = 2x)")
    ap.add_argument("--no-accuracy-drop", action="store_true", help="skip the accuracy-drop variant")
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime intra-op threads of every bench run (vlcompress bench "
                         "--threads; default: ONNX Runtime's own, one per core)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/...)")
    ap.add_argument("--keep", default=None, help="keep the run folders here")
    a = ap.parse_args(argv)
    fractions = [float(x) for x in a.slowdowns.split(",") if x.strip()]
    t_start = time.perf_counter()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="vlc-gate-"))
    work.mkdir(parents=True, exist_ok=True)
    common = dict(model="tiny-clip", method="multiflow", pattern="unstructured",
                  calibration_size=a.calibration_size, eval_size=a.eval_size,
                  batch_sizes=a.batch_sizes, iterations=30, force=True)
    try:
        print("building the base run, the slower copies and the accuracy-drop run", flush=True)
        prune_export(out=str(work / "base"), sparsity=a.base_sparsity, **common)
        slow_kinds = {}
        for frac in fractions:
            name = slow_name(frac)
            slow_kinds[name] = name
            shutil.copytree(work / "base", work / name, dirs_exist_ok=True)
            for tower in ("vision", "text"):
                f = Path("pruned") / f"{tower}.onnx"
                partial_twin(work / "base" / f, work / name / f, frac)
        s_drop = drop_probe = None
        if not a.no_accuracy_drop:
            s_drop, drop_probe = find_drop_sparsity("tiny-clip", a.base_sparsity,
                                                    a.calibration_size, a.eval_size)
            prune_export(out=str(work / "drop"), sparsity=s_drop, **common)
        gate = GateConfig(max_latency_regression=a.max_latency_regression,
                          max_accuracy_drop=a.max_accuracy_drop)
        bench_kw = dict(iterations=a.iterations, warmup=10, gate=gate, threads=a.threads)
        baseline = benchmark(BenchConfig(run_dir=str(work / "base"), report=str(work / "baseline.json"),
                                         **bench_kw))
        print(f"baseline written ({baseline.report['config']['seconds_total']} s)", flush=True)
        kinds = {"unchanged": "base", **slow_kinds,
                 **({} if a.no_accuracy_drop else {"accuracy_drop": "drop"})}
        trials = {k: [] for k in kinds}
        for i in range(a.trials):
            for kind, folder in kinds.items():
                res = benchmark(BenchConfig(run_dir=str(work / folder), baseline=str(work / "baseline.json"),
                                            report=str(work / f"{kind}-{i}.json"), **bench_kw))
                g = res.gate
                trials[kind].append({
                    "exit_code": g.exit_code,
                    "failed": [c.name for c in g.failures],
                    "latency": {c.name: {"change": round(c.change, 4), "ci": [round(x, 4) for x in c.ci]}
                                for c in g.checks if c.kind == "latency"},
                    "accuracy_drop": {c.name: round(c.change, 4) for c in g.checks if c.kind == "accuracy"},
                    "seconds": res.report["config"]["seconds_total"],
                })
            row = {k: trials[k][-1]["exit_code"] for k in kinds}
            print(f"trial {i + 1}/{a.trials}: exit codes {row} ({time.perf_counter() - t_start:.0f} s)",
                  flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    def lat_failed(t):
        return any(n.startswith("latency") for n in t["failed"])

    def acc_failed(t):
        return any(n.startswith("accuracy") for n in t["failed"])

    def changes(kind, key):
        return [v[key] if key == "change" else v["ci"][0]
                for t in trials[kind] for v in t["latency"].values()]

    un = trials["unchanged"]
    slowed = {}
    for frac in fractions:
        slow = trials[slow_name(frac)]
        slowed[slow_name(frac)] = {
            "work_added": frac, "detected": sum(lat_failed(t) for t in slow), "of": len(slow),
            "failed_exit_1": sum(t["exit_code"] == 1 for t in slow),
            "accuracy_checks_failed": sum(acc_failed(t) for t in slow),
            "latency_change_median": statistics.median(changes(slow_name(frac), "change")),
            "min_ci_lower_bound": min(changes(slow_name(frac), "lo"))}
    payload = {
        "setup": {"model": "tiny-clip", "method": "multiflow", "base_sparsity": a.base_sparsity,
                  "drop_sparsity": s_drop, "trials": a.trials, "iterations": a.iterations,
                  "batch_sizes": a.batch_sizes, "eval_size": a.eval_size, "slowdowns": fractions,
                  "max_latency_regression": a.max_latency_regression,
                  "max_accuracy_drop": a.max_accuracy_drop, "latency_basis": gate.basis,
                  "threads": a.threads,
                  "quantile": gate.quantile, "confidence": gate.confidence, "bootstrap": gate.bootstrap},
        "unchanged": {"passed": sum(t["exit_code"] == 0 for t in un), "of": len(un),
                      "false_fail_rate": sum(t["exit_code"] != 0 for t in un) / len(un),
                      "latency_change_range": [min(changes("unchanged", "change")),
                                               max(changes("unchanged", "change"))],
                      "max_ci_lower_bound": max(changes("unchanged", "lo"))},
        **slowed,
    }
    if not a.no_accuracy_drop:
        drop = trials["accuracy_drop"]
        payload["accuracy_drop"] = {
            "detected": sum(acc_failed(t) for t in drop), "of": len(drop),
            "failed_exit_1": sum(t["exit_code"] == 1 for t in drop),
            "zeroshot_top1_drop": drop[0]["accuracy_drop"].get("accuracy zeroshot_top1"),
            "zeroshot_top1_drop_probe": round(drop_probe, 4)}
    payload.update({
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "trials": trials,
    })
    path = write_result("gate_reliability", payload, a.out)
    msg = [f"unchanged: {payload['unchanged']['passed']}/{len(un)} passed"]
    for name, v in slowed.items():
        msg.append(f"{name} (measured {100 * v['latency_change_median']:+.0f}%): "
                   f"{v['detected']}/{v['of']} failed on latency")
    if "accuracy_drop" in payload:
        d = payload["accuracy_drop"]
        msg.append(f"accuracy drop ({100 * (d['zeroshot_top1_drop'] or 0):.1f} pt): "
                   f"{d['detected']}/{d['of']} failed on accuracy")
    print("; ".join(msg) + f" -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
