#!/usr/bin/env bash
# The generative GPU check (issue 28, item 6): one command, bounded (VLC_CHECK_BUDGET_S,
# default 420 s), on one H100/H200 with what that machine has (PyTorch CUDA, transformers,
# onnx, onnxruntime -- CPU unless onnxruntime-gpu is installed; no network).
#
#   bash scripts/gpu_generative_check.sh             # on the GPU machine, from the repository root
#   bash scripts/gpu_generative_check.sh --dry-run   # anywhere: CPU, tiny-llava (the test suite runs it)
#
# 1. installs the project without touching its dependencies (skipped by --dry-run, which
#    imports the tree in place);
# 2. runs benchmarks/gpu_generative.py: llava-qwen2-0.5b (random weights), dense vs
#    structured 50% decoder, decode at batch 1 per token in the modes eager (DynamicCache),
#    static (StaticCache), graphs (one CUDA graph per step over the static cache, replayed)
#    and compile (torch.compile mode="reduce-overhead"), then ONNX Runtime's CUDA provider with
#    IOBinding on the fp16 export (its fp16 KV cache) where onnxruntime-gpu is installed (else
#    skipped with the reason), into benchmarks/results/gpu_generative.json (and $OUT).
#    In --dry-run the CUDA-only modes are skipped with their reason and ONNX Runtime runs the
#    same IOBinding loop on its CPU provider.
#
# The benchmark starts no cell after its deadline and rewrites its JSON after every cell, so a
# cut-short run keeps what it measured and lists what it did not.
# Where the tree is a copy without .git, name its commit: VLC_COMMIT=<hash> bash scripts/...
# Exit status: 0 all measured; 3 benchmark incomplete (a cell failed or the deadline hit); 2 usage.
HELP_LINES='2,23p' DEFAULT_BUDGET=420
# shellcheck source=scripts/_gpu_common.sh
source "$(dirname "$0")/_gpu_common.sh"

if [ "$DRY" = 1 ]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  RESULT=$LOGS/gpu_generative_dryrun.json
  ARGS=(--dry-run --out "$RESULT")
else
  "$PY" -m pip install --no-deps --no-build-isolation -q -e . || { echo "install failed" >&2; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  RESULT=benchmarks/results/gpu_generative.json
  ARGS=(--out "$RESULT")
fi
"$PY" - <<'PY'
import sys, torch, onnxruntime as ort
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
      f"onnxruntime {ort.__version__} {ort.get_available_providers()}")
PY

LEFT=$(left)
echo "== generative decode benchmark, $LEFT s left"
# the benchmark starts no cell after LEFT-60 s; timeout is the backstop
timeout -k 10 "$LEFT" "$PY" benchmarks/gpu_generative.py "${ARGS[@]}" --deadline-s $((LEFT - 60)) \
  2>&1 | tee "$LOGS/gpu_generative.log"
rc=${PIPESTATUS[0]}
[ "$DRY" = 1 ] || [ ! -f "$RESULT" ] || cp "$RESULT" "$LOGS/" 2>/dev/null || true
status=0
if [ "$rc" != 0 ]; then echo "generative benchmark incomplete or failed (rc $rc)" >&2; status=3; fi
echo "== done in $SECONDS s (budget $BUDGET s), status $status"
exit "$status"
