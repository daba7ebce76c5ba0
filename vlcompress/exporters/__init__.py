"""Exporters: ONNX (one graph per tower, fp32 or fp16, validated against PyTorch)."""

from __future__ import annotations

from .onnx import (
    DEFAULT_TOLERANCES,
    FP16_KEEP_FP32_OPS,
    ExportResult,
    check_nm,
    convert_fp16,
    export_model,
    export_tower,
    onnx_sparsity,
    validate_tower,
)

__all__ = ["ExportResult", "export_tower", "export_model", "validate_tower", "convert_fp16",
           "onnx_sparsity", "check_nm", "FP16_KEEP_FP32_OPS", "DEFAULT_TOLERANCES"]
