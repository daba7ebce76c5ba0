#!/usr/bin/env bash
# Replace the CPU onnxruntime by onnxruntime-gpu, then check that the CUDA provider runs.
#
#   bash scripts/install_ort_gpu.sh            # needs an NVIDIA GPU, CUDA 12 and cuDNN 9
#
# Why a script and not an extra: onnxruntime (a core dependency) and onnxruntime-gpu both
# install the module `onnxruntime`; installed together the CPU build shadows the GPU one and
# only CPUExecutionProvider remains. Afterwards `pip check` reports that vlcompress requires
# onnxruntime: onnxruntime-gpu provides that module. Re-run this script after any
# `pip install` that brings onnxruntime back (the check below names the clash).
set -euo pipefail
PY=${PYTHON:-python}
SPEC=${ORT_GPU_SPEC:-onnxruntime-gpu>=1.18}
"$PY" -m pip uninstall -y onnxruntime onnxruntime-gpu
"$PY" -m pip install "$SPEC"
exec "$PY" -c "from vlcompress.optional_deps import check_onnxruntime_gpu as c; print(c())"
