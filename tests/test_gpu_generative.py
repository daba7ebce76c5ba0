"""scripts/gpu_generative_check.sh --dry-run (issue 28 item 6): the generative GPU check's
driver (benchmarks/gpu_generative.py) on CPU with tiny-llava: torch eager and StaticCache decode
dense vs pruned, the CUDA-only modes skipped with their reason, ONNX Runtime's IOBinding loop
on the CPU provider; and its argument checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_generative_check_dry_run(tmp_path):
    committed = ROOT / "benchmarks" / "results" / "gpu_generative.json"
    before = committed.stat().st_mtime if committed.exists() else None
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_generative_check.sh"),
                           "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_generative_dryrun.json").read_text())
    assert res["dry_run"] and res["complete"] and res["device"] == "cpu" and not res["errors"]
    cells = {(r["runtime"], r["mode"], r["variant"]) for r in res["rows"]}
    assert cells == {(rt, m, v) for rt, m in [("torch", "eager"), ("torch", "static"),
                                              ("onnxruntime", "iobinding-CPUExecutionProvider")]
                     for v in ("dense", "pruned")}
    assert {(s["mode"], "needs CUDA" in s["reason"]) for s in res["skipped"]} == {
        ("graphs", True), ("compile", True)}
    rows = {(r["runtime"], r["mode"], r["variant"]): r for r in res["rows"]}
    # the static cache decodes the eager tokens; ONNX Runtime (fp32 export on CPU) too
    assert rows[("torch", "static", "pruned")]["tokens_equal_to_eager"] is True
    ort = rows[("onnxruntime", "iobinding-CPUExecutionProvider", "pruned")]
    assert ort["tokens_equal_to_torch_eager"] is True and ort["precision"] == "fp32"
    assert len(ort["tokens"]) == res["new_tokens"] + 1
    assert all(r["decode_ms_per_token"]["p50"] > 0 and r["speedup_over_dense"] > 0
               for r in res["rows"])
    assert res["prune"]["achieved"] > 0.2 and "provenance" in res
    after = committed.stat().st_mtime if committed.exists() else None
    assert after == before  # a dry run never replaces a result


@pytest.mark.parametrize("args,msg", [(["--modes", "fast"], "unknown mode 'fast'"),
                                      (["--runtimes", "trt"], "unknown runtime 'trt'"),
                                      (["--device", "tpu"], "unknown device 'tpu'")])
def test_gpu_generative_bad_arguments(args, msg):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_generative.py"), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and msg in proc.stderr
