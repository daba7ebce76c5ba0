"""Peak memory of the generative ONNX export, per graph, before and after a change.

    OMP_NUM_THREADS=1 python benchmarks/export_memory.py --before-ref main

Exports a LLaVA preset (``--model``, default ``llava-qwen2-0.5b``; ``--vision-layers`` /
``--text-layers`` cut its depth so a run fits a few minutes: every other shape stays, the
151,936-row embedding table and LM head included) with
:func:`vlcompress.exporters.generative.export_generative` (no validation: this measures the
export), once per code tree, each in a fresh process: the working tree (``after``) and, with
``--before-ref REF``, that git revision unpacked into a temporary folder (``before``). Per
phase, the peak resident memory of the process (``VmHWM``, reset at the phase's start through
``/proc/self/clear_refs``, so the peak is exact, not sampled): loading the model, and each ONNX
file's export, split into torch's TorchScript exporter (``torch.onnx.export``) and what
vlcompress does around it (reading the traced file, naming the initializers, writing the
file). ``over_model_mb`` = peak - the resident memory at the phase's start. The written
files' SHA-256 are recorded for both trees: equal digests mean the change wrote the same bytes.

Writes ``benchmarks/results/export_memory.json`` (or ``--out``) with the command, commit,
machine and load average (the machine is shared; memory figures are this process's own).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    return float("nan")


class Phases:
    """Exact per-phase peak RSS: ``VmHWM`` reset at each phase's start (``clear_refs`` 5);
    a nested phase closes its parent's segment first, so the parent's peak is the max of its
    segments and its children's."""

    def __init__(self):
        self.rows: list[dict] = []
        self._stack: list[dict] = []
        self.process_peak = 0.0

    @staticmethod
    def _reset():
        Path("/proc/self/clear_refs").write_text("5")

    def _fold(self):
        hwm = _status("VmHWM")
        self.process_peak = max(self.process_peak, hwm)
        for row in self._stack:
            row["_peak"] = max(row["_peak"], hwm)
            if row["_tail"] is not None:
                row["_tail"] = max(row["_tail"], hwm)

    def phase(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def cm():
            gc.collect()
            self._fold()
            row = {"phase": name, "depth": len(self._stack), "rss_start_mb": round(_status("VmRSS"))}
            row["_peak"], row["_tail"] = row["rss_start_mb"], None
            self._stack.append(row)
            self._reset()
            t = time.perf_counter()
            try:
                yield row
            finally:
                self._fold()
                self._stack.pop()
                if self._stack:  # the parent's segment after its last child starts here
                    self._stack[-1]["_tail"] = 0.0
                peak, tail = row.pop("_peak"), row.pop("_tail")
                row |= {"rss_peak_mb": round(peak), "over_model_mb": round(peak - row["rss_start_mb"]),
                        "rss_end_mb": round(_status("VmRSS")),
                        "seconds": round(time.perf_counter() - t, 1)}
                if tail is not None:  # after the last child: vlcompress's own steps
                    row |= {"after_torch_peak_mb": round(tail),
                            "after_torch_over_model_mb": round(tail - row["rss_start_mb"])}
                self.rows.append(row)
                self._reset()
        return cm()


def child(args) -> None:
    """One export in this process, with the code of ``args.tree`` first on the path."""
    sys.path[:0] = [str(Path(args.tree).resolve())]
    import torch

    import vlcompress
    import vlcompress.models as M
    from vlcompress.exporters import generative as G
    from vlcompress.models import registry

    ph = Phases()
    entry = next((e for e in registry.presets() if e.name == args.model), None)
    if entry is None:
        raise SystemExit(f"--model: {args.model!r} is no preset")
    preset_config = M._preset_config

    def config(e):
        c = preset_config(e)
        if args.vision_layers:
            c.vision_config.num_hidden_layers = args.vision_layers
        if args.text_layers:
            c.text_config.num_hidden_layers = args.text_layers
        return c

    M._preset_config = config
    with ph.phase("load model"):
        torch.manual_seed(0)  # random weights: the same in both trees
        vlm = M._load_preset(entry)
    M._preset_config = preset_config
    weights = {
        "vision": sum(p.numel() * p.element_size() for m in (vlm.model.model.vision_tower,
                      vlm.model.model.multi_modal_projector) for p in m.parameters()),
        "language_model": sum(p.numel() * p.element_size()
                              for p in vlm.model.model.language_model.parameters()),
    }
    export_one, torch_export = G._export, torch.onnx.export

    def traced(module, a, path, *rest, **kw):
        with ph.phase(f"export {path.name}"):
            return export_one(module, a, path, *rest, **kw)

    def torch_traced(*a, **kw):
        with ph.phase("  torch.onnx.export"):
            return torch_export(*a, **kw)

    G._export, torch.onnx.export = traced, torch_traced
    work = Path(tempfile.mkdtemp(prefix="export-memory-", dir=args.tmp))
    try:
        t = time.perf_counter()
        G.export_generative(vlm, work / "dense", images=[], validate=False)
        seconds = time.perf_counter() - t
    finally:
        G._export, torch.onnx.export = export_one, torch_export
    files = {}
    for f in sorted((work / "dense").iterdir()):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        files[f.name] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
        f.unlink()
    (work / "dense").rmdir()
    work.rmdir()
    Path(args.child_out).write_text(json.dumps({
        "vlcompress": str(Path(vlcompress.__file__).parent), "phases": ph.rows,
        "process_peak_mb": round(ph.process_peak), "export_seconds": round(seconds, 1),
        "weights_bytes": weights, "files": files}))


def _run_child(args, tree: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--tree", str(tree),
           "--child-out", str(out), "--model", args.model]
    for k in ("vision_layers", "text_layers"):
        if getattr(args, k):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.tmp:
        cmd += ["--tmp", args.tmp]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(cmd, check=True, env=env)
    res = json.loads(out.read_text())
    out.unlink()
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llava-qwen2-0.5b")
    ap.add_argument("--vision-layers", type=int, default=None, help="cut the tower to N layers")
    ap.add_argument("--text-layers", type=int, default=None, help="cut the decoder to N layers")
    ap.add_argument("--before-ref", default=None, help="git revision measured as 'before'")
    ap.add_argument("--tmp", default=None, help="folder for the exports (deleted after)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    from _common import write_result

    load = [os.getloadavg()]
    runs = {}
    if args.before_ref:
        commit = subprocess.run(["git", "rev-parse", args.before_ref], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.strip()
        with tempfile.TemporaryDirectory(prefix="export-memory-before-", dir=args.tmp) as d:
            archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", d], input=archive, check=True)
            runs["before"] = {"ref": args.before_ref, "commit": commit, **_run_child(args, Path(d))}
        load.append(os.getloadavg())
    runs["after"] = {"ref": "working tree", **_run_child(args, ROOT)}
    load.append(os.getloadavg())
    payload = {"model": args.model, "vision_layers": args.vision_layers,
               "text_layers": args.text_layers, "runs": runs, "load_average": load,
               "note": "peak RSS per phase from VmHWM reset at the phase's start (exact); "
                       "the host is shared: timings are indicative, memory is this process's"}
    if "before" in runs:
        b, a = runs["before"], runs["after"]
        payload["same_files"] = {k: b["files"].get(k, {}).get("sha256") == v["sha256"]
                                 for k, v in a["files"].items()}
        peaks = {}
        for name in ("vision.onnx", "embed.onnx", "decoder.onnx"):
            rb = next(r for r in b["phases"] if r["phase"] == f"export {name}")
            ra = next(r for r in a["phases"] if r["phase"] == f"export {name}")
            peaks[name] = {"before_over_model_mb": rb["over_model_mb"],
                           "after_over_model_mb": ra["over_model_mb"],
                           "torch_exporter_over_model_mb": {
                               k: next(r for r in run["phases"][run["phases"].index(row) - 1:]
                                       if r["phase"].strip() == "torch.onnx.export")["over_model_mb"]
                               for k, run, row in (("before", b, rb), ("after", a, ra))},
                           "vlcompress_steps_over_model_mb": {
                               "before": rb.get("after_torch_over_model_mb"),
                               "after": ra.get("after_torch_over_model_mb")},
                           "file_mb": round(a["files"][name]["bytes"] / 2**20)}
        payload["summary"] = {"per_file": peaks, "process_peak_mb": {
            "before": b["process_peak_mb"], "after": a["process_peak_mb"]}}
    path = write_result("export_memory", payload, args.out)
    print(json.dumps(payload.get("summary", runs["after"]["phases"]), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
