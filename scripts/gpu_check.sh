#!/usr/bin/env bash
# The ready GPU check: one command, under 9 minutes on one H100/H200 (a 10-minute device
# slot with the machine's start), with only what that machine
# has (PyTorch CUDA with cuSPARSELt, transformers, onnx, onnxruntime CPU, typer, rich,
# matplotlib; no TensorRT, no onnxruntime-gpu, no network).
#
#   bash scripts/gpu_check.sh              # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run    # anywhere: CPU, tiny shapes (the fast suite runs it)
#
# 1. installs the project without touching its dependencies (pip --no-deps
#    --no-build-isolation -e .; skipped by --dry-run, which imports the tree in place);
# 2. runs the GPU tests (pytest -m gpu): they run where a GPU is and skip, each with its
#    reason, where not (TensorRT and ORT-CUDA tests skip on that machine: not installed);
# 3. prunes clip-vit-b16 and clip-vit-l14 (sparsegpt 2:4, 128 pairs) with the model resident on
#    the GPU and with the model on the CPU and one block at a time on the GPU (the blockwise
#    engine's `device` option): times, peak GPU memory, mask agreement
#    (benchmarks/prune_offload.py), into benchmarks/results/prune_offload_gpu.json (and $OUT);
# 4. isolates the cost of one 2:4 linear (eager, cuSPARSELt direct, the planned layer the
#    runner uses, each also under CUDA-graph replay) on the ViT-B/16 shapes
#    (benchmarks/gpu_semi_structured.py) into benchmarks/results/gpu_semi_structured.json
#    (and $OUT), with a profiler table: the per-layer kernel times behind the 2:4 verdict;
# 5. times the clip-vit-b16 and clip-vit-l14 vision towers, fp16, dense vs 2:4 (cuSPARSELt,
#    one plan per shape) vs structured 50%, batch 1/8/64/256, interleaved, CUDA events, in
#    the modes eager+graphs (CUDA-graph replay: the issue-25 targets), eager, then
#    compile+graphs (one static torch.compile per batch size) as time allows; every row
#    records its compiles, host-bound flags and attention implementation
#    (benchmarks/gpu_latency.py), into benchmarks/results/gpu_torch.json (and $OUT).
#
# A deadline (VLC_CHECK_BUDGET_S, default 480 s) bounds the whole: each step gets what is
# left, the benchmark starts no cell after its own deadline and rewrites its JSON after every
# cell, so a cut-short run still leaves what it measured and lists what it did not.
# Where the tree is a copy without .git, name its commit: VLC_COMMIT=<hash> bash scripts/...
# (the results JSON records it). Logs, the JSON and a Markdown summary also go to $OUT if set.
# Exit status: 0 all passed and measured; 1 tests failed; 3 benchmark incomplete; 2 usage.
HELP_LINES='2,32p' DEFAULT_BUDGET=480
# shellcheck source=scripts/_gpu_common.sh
source "$(dirname "$0")/_gpu_common.sh"
status=0

if [ "$DRY" = 1 ]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  RESULT=$LOGS/gpu_torch_dryrun.json
  BENCH=(--dry-run --modes eager,compile --out "$RESULT")
  OFFLOAD_RESULT=$LOGS/prune_offload_dryrun.json
  OFFLOAD=(--models tiny-clip --n 8 --batch-size 4 --device cpu --out "$OFFLOAD_RESULT")
  TESTS=(tests/test_gpu_runtime.py tests/test_runtime_graphs.py)
else
  "$PY" -m pip install --no-deps --no-build-isolation -q -e . || { echo "install failed" >&2; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  RESULT=benchmarks/results/gpu_torch.json
  BENCH=(--models clip-vit-b16,clip-vit-l14 --modes eager+graphs,eager,compile+graphs
         --runtimes torch --batch-sizes 1,8,64,256 --warmup 10 --iterations 50
         --out "$RESULT")
  OFFLOAD_RESULT=benchmarks/results/prune_offload_gpu.json
  OFFLOAD=(--models clip-vit-b16,clip-vit-l14 --n 128 --batch-size 32 --device cuda
           --out "$OFFLOAD_RESULT")
  TESTS=(tests/test_gpu_runtime.py tests/test_runtime_graphs.py tests/test_tensorrt.py
         tests/test_runtime.py tests/test_blockwise.py)
fi
"$PY" - <<'PY'
import torch, sys
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
PY

echo "== GPU tests (pytest -m gpu), $(left) s left"
timeout "$(( $(left) > 150 ? 150 : $(left) ))" "$PY" -m pytest -m gpu "${TESTS[@]}" -q -rs \
  -p no:cacheprovider 2>&1 | tee "$LOGS/gpu_tests.log"
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then echo "GPU tests failed (rc $rc)" >&2; status=1; fi

echo "== pruning with blocks offloaded, $(left) s left"
timeout -k 10 "$(( $(left) > 200 ? 150 : $(left) / 3 ))" "$PY" benchmarks/prune_offload.py \
  "${OFFLOAD[@]}" 2>&1 | tee "$LOGS/prune_offload.log"
orc=${PIPESTATUS[0]}
[ "$DRY" = 1 ] || [ ! -f "$OFFLOAD_RESULT" ] || cp "$OFFLOAD_RESULT" "$LOGS/" 2>/dev/null || true
if [ "$orc" != 0 ]; then echo "offload benchmark failed (rc $orc)" >&2; [ "$status" = 0 ] && status=3; fi

if [ "$DRY" != 1 ]; then
  echo "== one 2:4 linear, $(left) s left"
  timeout -k 5 "$(( $(left) > 180 ? 60 : $(left) / 4 ))" "$PY" benchmarks/gpu_semi_structured.py \
    --out benchmarks/results/gpu_semi_structured.json --profile "$LOGS/gpu_semi_structured_profile.txt" \
    || { echo "2:4 linear benchmark failed" >&2; [ "$status" = 0 ] && status=3; }
  cp benchmarks/results/gpu_semi_structured.json "$LOGS/" 2>/dev/null || true
fi

LEFT=$(left)
echo "== latency benchmark, $LEFT s left"
if [ "$LEFT" -lt 30 ]; then
  echo "no time left for the benchmark" >&2; exit 3
fi
# the benchmark starts no cell after LEFT-40 s; timeout is the backstop (SIGTERM: it saves)
timeout -k 10 "$LEFT" "$PY" benchmarks/gpu_latency.py "${BENCH[@]}" --deadline-s $((LEFT - 40)) \
  2>&1 | tee "$LOGS/gpu_latency.log"
brc=${PIPESTATUS[0]}
if [ -f "$RESULT" ]; then
  [ "$DRY" = 1 ] || cp "$RESULT" "$LOGS/" 2>/dev/null || true
  "$PY" benchmarks/gpu_latency.py --summarize "$RESULT" | tee "$LOGS/gpu_summary.md"
fi
if [ "$brc" != 0 ]; then echo "benchmark incomplete or failed (rc $brc)" >&2; [ "$status" = 0 ] && status=3; fi
echo "== done in $SECONDS s (budget $BUDGET s), status $status"
exit "$status"
