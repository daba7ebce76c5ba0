"""GPU latency: clip-vit-b16 vision tower, fp16, dense vs 2:4 vs structured 50%.

    python benchmarks/gpu_latency.py                      # writes benchmarks/results/gpu_latency.json
    python benchmarks/gpu_latency.py --batch-sizes 1,8 --iterations 50 --runtimes torch

Three models of the ``clip-vit-b16`` vision tower (ViT-B/16, 224 px; the preset, randomly
initialised - latency does not depend on the weight values):

- ``dense``: 12 layers x 12 heads, MLP 3072;
- ``2:4``: every encoder Linear pruned 2:4 by magnitude along its input dimension
  (``prune(..., "magnitude", pattern="2:4", scope="vision")``);
- ``structured50``: every layer sliced by hand to 6 of 12 heads and MLP 1536 (uniform 50%).

Each runtime that is installed runs all three, fp16, at every batch size, interleaved
(``vlcompress.runtime.latency.measure``: round robin, order reversed every other iteration),
timed with CUDA events between device synchronisations; inputs are on the GPU before timing
and outputs stay there (no host copies in the timed calls). Runtimes:

- ``torch``: ``TorchCudaRunner`` fp16; the 2:4 model's Linear weights become
  ``torch.sparse.to_sparse_semi_structured`` tensors (cuSPARSELt / CUTLASS), layers that
  cannot are listed in the JSON;
- ``tensorrt``: engines from the fp16 ONNX (strongly typed), ``SPARSE_WEIGHTS`` for 2:4, one
  optimisation profile over the batch sizes, with the builder's sparse-layer counts;
- ``ort-cuda``: ONNX Runtime CUDA EP on the fp16 ONNX with io-binding.

Targets on an H100/H200: structured 50% >= 1.8x; 2:4 >= 1.2x at batch >= 64. Without a CUDA
GPU the script says so in one sentence, exits 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("dense", "2:4", "structured50")
RUNTIMES = ("torch", "tensorrt", "ort-cuda")
NAME = "gpu_latency"


# --------------------------------------------------------------------------------------------
# CPU-side parts (tested without a GPU)
# --------------------------------------------------------------------------------------------
def _csv(text: str, allowed: tuple[str, ...] | None = None, kind: str = "value") -> tuple:
    items = tuple(t.strip() for t in str(text).split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"no {kind} given")
    if allowed is not None:
        bad = [i for i in items if i not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad)}; allowed: "
                                             f"{', '.join(allowed)}")
    return items


def _batches(text: str) -> tuple[int, ...]:
    out = []
    for t in _csv(text, kind="batch size"):
        try:
            v = int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"batch size {t!r} is not an integer") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"batch size {v} is not positive")
        out.append(v)
    return tuple(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="clip-vit-b16",
                    help="a model name for load_model (default: the clip-vit-b16 preset)")
    ap.add_argument("--batch-sizes", type=_batches, default=(1, 8, 64, 256))
    ap.add_argument("--variants", type=lambda s: _csv(s, VARIANTS, "variant"), default=VARIANTS)
    ap.add_argument("--runtimes", type=lambda s: _csv(s, RUNTIMES, "runtime"), default=None,
                    help="default: every one installed")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--workspace-gb", type=float, default=8.0)
    ap.add_argument("--workdir", default=None, help="where ONNX files and engines go "
                    "(default: a temporary folder)")
    ap.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/"
                    f"{NAME}.json)")
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.iterations < 1:
        ap.error("need --warmup >= 0 and --iterations >= 1")
    if "dense" not in args.variants:
        args.variants = ("dense",) + tuple(args.variants)  # speedups are relative to dense
    return args


def plan_cells(batch_sizes, variants, runtimes) -> list[dict]:
    """One measurement group per (runtime, batch): the variants timed interleaved in it."""
    return [{"runtime": r, "batch": int(b), "variants": list(variants)}
            for r in runtimes for b in batch_sizes]


def hand_slice(vlm, heads: int | None = None, mlp: int | None = None, modality: str = "vision"):
    """A copy of ``vlm`` whose ``modality`` layers keep their first ``heads`` heads and
    ``mlp`` MLP neurons (default: half of each) - the uniform structured-50% model."""
    import torch

    from vlcompress.models.surgery import STRUCTURED_FLAG, find_blocks, slice_block

    v = copy.deepcopy(vlm)
    blocks = [b for b in find_blocks(v) if b.modality == modality]
    if not blocks:
        raise ValueError(f"{getattr(vlm, 'name', 'model')} has no {modality} blocks to slice")
    for b in blocks:
        h = heads if heads is not None else b.num_heads // 2
        n = mlp if mlp is not None else b.mlp_width // 2
        if not 0 < h <= b.num_heads or not 0 < n <= b.mlp_width:
            raise ValueError(f"cannot keep {h} heads / {n} neurons of {b.num_heads} / "
                             f"{b.mlp_width}")
        slice_block(b, torch.arange(h), torch.arange(n))
    setattr(v.model, STRUCTURED_FLAG, True)
    return v


def vision_shape(vlm) -> dict:
    from vlcompress.models.surgery import find_blocks

    bl = [b for b in find_blocks(vlm) if b.modality == "vision"]
    return {"layers": len(bl), "heads": sorted({b.num_heads for b in bl}),
            "mlp": sorted({b.mlp_width for b in bl})}


def installed_runtimes() -> list[str]:
    """Runtimes usable here (torch needs CUDA; the others also their package)."""
    import torch

    if not torch.cuda.is_available():
        return []
    have = ["torch"]
    try:
        import tensorrt  # noqa: F401

        have.append("tensorrt")
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            have.append("ort-cuda")
    except ImportError:
        pass
    return have


def load_base(name: str):
    """``load_model(name)``; for clip-vit-b16 without the preset, the ViT-B/16 config."""
    from vlcompress import load_model
    from vlcompress.errors import ModelError

    try:
        return load_model(name)
    except ModelError:
        if name != "clip-vit-b16":
            raise
    from transformers import CLIPConfig, CLIPModel

    from vlcompress.models.clip import CLIP

    tiny = load_model("tiny-clip")
    cfg = CLIPConfig(vision_config=dict(hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12,
                                        image_size=224, patch_size=16, hidden_act="quick_gelu"),
                     text_config=dict(hidden_size=512, intermediate_size=2048,
                                      num_hidden_layers=12, num_attention_heads=8,
                                      max_position_embeddings=77), projection_dim=512)
    return CLIP(CLIPModel(cfg).eval(), tiny.tokenizer, tiny.image_processor, name=name)


# --------------------------------------------------------------------------------------------
# GPU part
# --------------------------------------------------------------------------------------------
def _speedups(stats: dict) -> dict:
    d = stats["dense"]["p50"]
    return {k: d / v["p50"] for k, v in stats.items() if k != "dense" and v["p50"] > 0}


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for p in ("torch", "tensorrt", "onnxruntime-gpu", "onnxruntime", "transformers", "onnx"):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def build_models(args) -> dict:
    from vlcompress import prune

    base = load_base(args.model)
    models = {"dense": base}
    if "2:4" in args.variants:
        m = copy.deepcopy(base)
        prune(m, "magnitude", None, "2:4", scope="vision")
        models["2:4"] = m
    if "structured50" in args.variants:
        models["structured50"] = hand_slice(base)
    return models


def make_runners(runtime: str, models: dict, workdir: Path, args, notes: dict) -> dict:
    from vlcompress.exporters.onnx import export_tower
    from vlcompress.runtime.cuda import TorchCudaRunner
    from vlcompress.runtime.latency import tower_input_names

    runners = {}
    if runtime == "torch":
        for v, m in models.items():
            r = TorchCudaRunner(m.tower_module("vision"), tower_input_names(m, "vision"),
                                semi_structured=(v == "2:4"), copy_outputs=False)
            runners[v] = r
        return runners
    from vlcompress.data import load_calibration

    example = next(iter(load_calibration("shapes", n=2, batch_size=2, seed=0).batches()))
    for v, m in models.items():
        onnx_path = workdir / v.replace(":", "") / "vision.onnx"
        if not onnx_path.is_file():
            export_tower(m, "vision", onnx_path, example, fp16=True)
        if runtime == "tensorrt":
            from vlcompress.exporters.tensorrt import build_engine
            from vlcompress.runtime.trt_runner import TrtRunner, validate_engine

            pruned = ([ly.name for ly in m.prunable_layers() if ly.modality == "vision"]
                      if v == "2:4" else None)
            res = build_engine(onnx_path, onnx_path.with_suffix(".engine"), sparse=(v == "2:4"),
                               batch_sizes=args.batch_sizes, timing_cache=workdir / "timing.cache",
                               workspace_gb=args.workspace_gb, pruned=pruned)
            feed = {"pixel_values": np.random.default_rng(1).standard_normal(
                (min(args.batch_sizes), 3, 224, 224), dtype=np.float32)}
            val = validate_engine(res.engine_path, onnx_path, feed)
            notes.setdefault("tensorrt", {})[v] = {
                "build_seconds": round(res.seconds, 1), "sparsity": res.sparsity.to_dict(),
                "warnings": res.warnings, "validation": val, "trt_version": res.trt_version}
            runners[v] = TrtRunner(res.engine_path, copy_outputs=False)
        elif runtime == "ort-cuda":
            from vlcompress.runtime.ort_runner import OrtRunner

            runners[v] = OrtRunner(onnx_path, providers=("CUDAExecutionProvider",),
                                   io_binding=True, copy_outputs=False, name=f"ort-cuda-{v}")
    return runners


def run(args) -> dict:
    from vlcompress.runtime.cuda import gpu_info
    from vlcompress.runtime.latency import measure, summary

    runtimes = list(args.runtimes or installed_runtimes())
    missing = [r for r in runtimes if r not in installed_runtimes()]
    if missing:
        raise SystemExit(f"runtime(s) {', '.join(missing)} are not installed here "
                         f"(installed: {', '.join(installed_runtimes())})")
    models = build_models(args)
    shapes = {v: vision_shape(m) for v, m in models.items()}
    rng = np.random.default_rng(0)
    feeds = {b: {"pixel_values": rng.standard_normal((b, 3, 224, 224), dtype=np.float32)}
             for b in args.batch_sizes}
    results, notes = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlc-gpu-") as td:
        workdir = Path(args.workdir) if args.workdir else Path(td)
        workdir.mkdir(parents=True, exist_ok=True)
        for runtime in runtimes:
            runners = make_runners(runtime, models, workdir, args, notes)
            for r in runners.values():
                r.activate()
            try:
                if runtime == "torch":
                    notes["torch_semi_structured"] = (
                        runners["2:4"].semi_structured_report.to_dict() if "2:4" in runners
                        else None)
                for cell in plan_cells(args.batch_sizes, list(runners), [runtime]):
                    b = cell["batch"]
                    times = measure({v: (runners[v], feeds[b]) for v in cell["variants"]},
                                    warmup=args.warmup, iterations=args.iterations,
                                    cuda_events=True)
                    stats = {v: summary(t) for v, t in times.items()}
                    results.append({"runtime": runtime, "batch": b, "ms": stats,
                                    "speedup_p50": _speedups(stats)})
                    print(f"{runtime:9s} b={b:<4d} " + "  ".join(
                        f"{v} {s['p50']:.3f} ms" for v, s in stats.items()), flush=True)
            finally:
                for r in runners.values():
                    r.deactivate()
    return {"model": args.model, "tower": "vision", "precision": "fp16",
            "variants": {v: shapes[v] for v in models}, "batch_sizes": list(args.batch_sizes),
            "warmup": args.warmup, "iterations": args.iterations, "timer": "cuda events",
            "runtimes": runtimes, "gpu": gpu_info(), "versions": _versions(), "rows": results,
            "notes": notes, "seconds": round(time.perf_counter() - t0, 1),
            "targets": {"structured50": ">= 1.8x", "2:4": ">= 1.2x at batch >= 64"}}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_latency: no CUDA GPU is available (this benchmark needs an NVIDIA GPU and a "
              "CUDA build of PyTorch); nothing was written.", file=sys.stderr)
        return 2
    from _common import write_result

    payload = run(args)
    path = write_result(NAME, payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
