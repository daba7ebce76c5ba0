"""GPU latency: CLIP vision towers in fp16, dense vs 2:4 vs structured 50%, eager and compiled.

    python benchmarks/gpu_latency.py                      # writes benchmarks/results/gpu_latency.json
    python benchmarks/gpu_latency.py --models clip-vit-b16,clip-vit-l14 --modes eager,compile \
        --runtimes torch --out benchmarks/results/gpu_torch.json      # what scripts/gpu_check.sh runs
    python benchmarks/gpu_latency.py --dry-run --out /tmp/x.json    # CPU, tiny shapes, seconds

Three models of each vision tower (the architecture presets, randomly initialised - latency
does not depend on the weight values):

- ``dense``: as the preset (ViT-B/16: 12 layers x 12 heads, MLP 3072; ViT-L/14: 24 x 16, 4096);
- ``2:4``: every encoder Linear pruned 2:4 by magnitude along its input dimension
  (``prune(..., "magnitude", pattern="2:4", scope="vision")``);
- ``structured50``: every layer sliced by hand to half its heads and half its MLP (uniform 50%).

Each runtime that is installed runs all three, fp16, at every batch size, interleaved
(``vlcompress.runtime.latency.measure``: round robin, order reversed every other iteration),
timed with CUDA events between device synchronisations; inputs are on the GPU before timing
and outputs stay there (no host copies in the timed calls). Runtimes:

- ``torch``: ``TorchCudaRunner`` fp16, in each ``--modes``: ``eager``, ``compile`` (one
  static ``torch.compile`` per batch size, ``dynamic=False``, inductor: the default dynamic
  shapes recompiled symbolically at the second batch size and ran slower than eager), and
  either under CUDA-graph replay (``eager+graphs``, ``compile+graphs``; ``--cuda-graphs`` adds
  them). Each cell first calls every variant once untimed (its batch size's compile and
  graph capture happen there); the row records the compilations that needed (``compiles``)
  and any during the timed loop (``timed_compiles``, flagged in the summary: such a row timed
  a compile). Dynamo's recompile limit is raised and made fatal, so no cell silently runs
  eager. The 2:4 model's Linear layers run on cuSPARSELt with one algorithm search and one
  padded input buffer per shape (``PlannedSparseLinear``; under ``compile`` PyTorch's
  semi-structured tensors, CUTLASS on sm8x only); a 2:4 runner with no swapped layer is an
  error, the swap counts are in the JSON. Each row also records per variant the host issue
  time and whether it is host-bound (``vlcompress.runtime.graphs.host_bound``) and the
  attention implementation that ran;
- ``tensorrt``: engines from the fp16 ONNX (strongly typed), ``SPARSE_WEIGHTS`` for 2:4, one
  optimisation profile per batch size, with the builder's sparse-layer counts;
- ``ort-cuda``: ONNX Runtime CUDA EP on the fp16 ONNX, one IOBinding per feed, timed with
  CUDA events on the session's own compute stream.

The JSON is rewritten after every measured cell (``complete`` false until the end), and
``--deadline-s`` stops starting new cells after that many seconds (each cell not run is
listed in ``not_run`` with the reason), so a run cut short still leaves what it measured.

Targets on an H100/H200 (issue 25): structured 50% >= 1.6x at batch 1 and 8 under CUDA graphs
and >= 1.8x at batch >= 64; 2:4 >= 1.1x at batch >= 64 under graph replay. Without a CUDA
GPU the script says so in one sentence, exits 2 and writes nothing. ``--dry-run`` runs the same
loop on CPU with two tiny CLIP configs, fp32, batch 1 and 2, a few iterations, 2:4 weights kept
dense (semi-structured tensors need CUDA) and ``torch.compile(backend="eager")``: it checks the
plumbing, its numbers mean nothing and its JSON says so.
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
MODES = ("eager", "compile", "eager+graphs", "compile+graphs")
GRAPH_MODES = tuple(m for m in MODES if m.endswith("+graphs"))
NAME = "gpu_latency"
#: the dry run's two tiny CLIP vision configs (a "b16" and an "l14" stand-in)
DRY_MODELS = {"tiny-b16": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8),
              "tiny-l14": dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                               num_attention_heads=6, image_size=28, patch_size=7)}


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
    ap.add_argument("--models", "--model", dest="models", type=lambda s: _csv(s, kind="model"),
                    default=None, help="models for load_model, comma-separated (default: the "
                    "clip-vit-b16 preset; --dry-run: two tiny CLIP configs)")
    ap.add_argument("--batch-sizes", type=_batches, default=None,
                    help="default 1,8,64,256 (--dry-run: 1,2)")
    ap.add_argument("--variants", type=lambda s: _csv(s, VARIANTS, "variant"), default=VARIANTS)
    ap.add_argument("--runtimes", type=lambda s: _csv(s, RUNTIMES, "runtime"), default=None,
                    help="default: every one installed")
    ap.add_argument("--modes", type=lambda s: _csv(s, MODES, "mode"), default=("eager",),
                    help="torch runtime: eager, compile (a static torch.compile per batch "
                    "size), and either under CUDA-graph replay (+graphs); default eager")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also run each --modes entry under CUDA-graph replay (+graphs)")
    ap.add_argument("--warmup", type=int, default=None, help="default 20 (--dry-run: 1)")
    ap.add_argument("--iterations", type=int, default=None, help="default 200 (--dry-run: 2)")
    ap.add_argument("--workspace-gb", type=float, default=8.0)
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no new cell after this many seconds (those left are listed)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes, a few iterations: checks the plumbing, no numbers")
    ap.add_argument("--workdir", default=None, help="where ONNX files and engines go "
                    "(default: a temporary folder)")
    ap.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/"
                    f"{NAME}.json; required with --dry-run)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.models = args.models or (tuple(DRY_MODELS) if dry else ("clip-vit-b16",))
    args.batch_sizes = args.batch_sizes or ((1, 2) if dry else (1, 8, 64, 256))
    args.warmup = (1 if dry else 20) if args.warmup is None else args.warmup
    args.iterations = (2 if dry else 200) if args.iterations is None else args.iterations
    if args.warmup < 0 or args.iterations < 1:
        ap.error("need --warmup >= 0 and --iterations >= 1")
    if args.deadline_s is not None and args.deadline_s <= 0:
        ap.error("need --deadline-s > 0")
    if dry and args.out is None:
        ap.error("--dry-run needs --out (its JSON is no result and must not replace one)")
    if dry and args.runtimes not in (None, ("torch",)):
        ap.error("--dry-run runs the torch runtime only (TensorRT and ORT CUDA need a GPU)")
    if dry:
        unknown = [m for m in args.models if m not in DRY_MODELS]
        if unknown:
            ap.error(f"--dry-run models are {', '.join(DRY_MODELS)}, not {', '.join(unknown)}")
    if args.cuda_graphs:
        args.modes = tuple(dict.fromkeys(args.modes + tuple(
            m if m.endswith("+graphs") else f"{m}+graphs" for m in args.modes)))
    graphs = [m for m in args.modes if m in GRAPH_MODES]
    if graphs and dry:
        ap.error(f"--cuda-graphs / --modes {','.join(graphs)} need a CUDA GPU and the dry run "
                 "is CPU; allowed with --dry-run: --modes eager,compile")
    if graphs and args.runtimes is not None and "torch" not in args.runtimes:
        ap.error(f"--cuda-graphs / --modes {','.join(graphs)} apply to the torch runtime; "
                 f"--runtimes {','.join(args.runtimes)} has none; allowed: add torch")
    if "dense" not in args.variants:
        args.variants = ("dense",) + tuple(args.variants)  # speedups are relative to dense
    return args


def plan_cells(batch_sizes, variants, runtimes, modes=("eager",)) -> list[dict]:
    """One measurement group per (runtime, mode, batch): the variants timed interleaved in
    it. Non-torch runtimes have one mode, ``engine``. Compiled cells run largest batch first
    (the target batches, should a deadline cut the run short)."""
    cells = []
    for r in runtimes:
        for m in (modes if r == "torch" else ("engine",)):
            bs = sorted(batch_sizes, reverse=True) if m.startswith("compile") else \
                list(batch_sizes)
            cells += [{"runtime": r, "mode": m, "batch": int(b), "variants": list(variants)}
                      for b in bs]
    return cells


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
    """``load_model(name)`` (an architecture preset: random weights); a dry-run name
    (:data:`DRY_MODELS`) builds that tiny CLIP from its config."""
    from vlcompress import load_model

    if name not in DRY_MODELS:
        return load_model(name)
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from vlcompress.data.tokenizer import build_shapes_tokenizer
    from vlcompress.models.clip import CLIP

    torch.manual_seed(0)
    tok = build_shapes_tokenizer()
    v = DRY_MODELS[name]
    cfg = CLIPConfig(vision_config=dict(v), projection_dim=16,
                     text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      max_position_embeddings=16, pad_token_id=0,
                                      bos_token_id=2, eos_token_id=3))
    size = v["image_size"]
    img = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size,
                                                                      "width": size})
    return CLIP(CLIPModel(cfg).eval(), tok, img, name=name, source="dry-run config")


# --------------------------------------------------------------------------------------------
# the measurement (GPU; CPU with --dry-run)
# --------------------------------------------------------------------------------------------
def _speedups(stats: dict) -> dict:
    d = stats["dense"]["p50"]
    return {k: d / v["p50"] for k, v in stats.items() if k != "dense" and v["p50"] > 0}


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for p in ("torch", "tensorrt", "onnxruntime-gpu", "onnxruntime", "transformers", "onnx",
              "triton", "nvidia-cusparselt-cu13", "nvidia-cusparselt-cu12"):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    try:
        import torch

        out["cusparselt"] = (torch.backends.cusparselt.version()
                             if torch.backends.cusparselt.is_available() else None)
    except (AttributeError, RuntimeError):
        out["cusparselt"] = None
    return out


def _git_commit() -> str | None:
    import os
    import subprocess

    if os.environ.get("VLC_COMMIT"):  # a copy of the tree without .git (e.g. a GPU machine)
        return os.environ["VLC_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def build_models(name: str, variants) -> dict:
    from vlcompress import prune

    base = load_base(name)
    models = {"dense": base}
    if "2:4" in variants:
        m = copy.deepcopy(base)
        prune(m, "magnitude", None, "2:4", scope="vision")
        models["2:4"] = m
    if "structured50" in variants:
        models["structured50"] = hand_slice(base)
    return models


def _configure_compile() -> None:
    """Raise dynamo's recompile limit (a model is compiled once per batch size) and make
    hitting it fatal: past the limit dynamo would otherwise run the frame eagerly, silently."""
    import torch._dynamo as dynamo

    for key, value in (("recompile_limit", 64), ("cache_size_limit", 64),
                       ("fail_on_recompile_limit_hit", True)):
        if hasattr(dynamo.config, key):
            setattr(dynamo.config, key, value)


def torch_runners(models: dict, mode: str, dry_run: bool) -> dict:
    """Per variant, the torch runner of its vision tower: fp16 on the GPU (2:4 weights on
    cuSPARSELt, one algorithm search per shape; a static compile per batch size in the
    compile modes; CUDA-graph replay in the +graphs modes), or with ``dry_run`` fp32 on the
    CPU (2:4 weights dense, the static compile on the ``eager`` backend, no graphs)."""
    from vlcompress.runtime.latency import tower_input_names

    compile_ = mode.startswith("compile")
    if dry_run:
        from vlcompress.runtime.graphs import StaticCompile, attn_implementation
        from vlcompress.runtime.torch_runner import TorchRunner

        out = {}
        for v, m in models.items():
            mod = copy.deepcopy(m.tower_module("vision")).eval()
            sc = StaticCompile(mod, backend="eager") if compile_ else None
            r = TorchRunner(sc.fn if sc else mod, tower_input_names(m, "vision"),
                            device="cpu", name=f"dry-{v}-{mode}")
            r.static_compile, r.attn_implementation = sc, attn_implementation(mod)
            out[v] = r
        return out
    from vlcompress.runtime.cuda import TorchCudaRunner

    return {v: TorchCudaRunner(m.tower_module("vision"), tower_input_names(m, "vision"),
                               semi_structured=(v == "2:4"), copy_outputs=False,
                               compile=compile_, cuda_graphs=mode.endswith("+graphs"),
                               name=f"torch-{v}-{mode}")
            for v, m in models.items()}


def compiles_of(runner) -> int:
    """Graphs compiled so far by ``runner``'s static compile (0 when it compiles nothing)."""
    sc = getattr(runner, "static_compile", None)
    return sc.compiles if sc is not None else int(getattr(runner, "compiles", 0) or 0)


def cell_facts(runners: dict, before: dict, primed: dict, times: dict, host: dict) -> dict:
    """What a row records beside its times: per variant the compilations its batch size
    needed (``compiles``: during the priming call) and any during the timed loop
    (``timed_compiles``, which must be 0: a row with one measured a compile), the host issue
    time and whether the row is host-bound (GPU only), the attention implementation, and the
    CUDA-graph captures."""
    from vlcompress.runtime.latency import host_facts

    after = {v: compiles_of(r) for v, r in runners.items()}
    facts = {"compiles": {v: primed[v] - before[v] for v in runners},
             "timed_compiles": {v: after[v] - primed[v] for v in runners},
             **host_facts(times, host),
             "attn_implementation": {v: getattr(r, "attn_implementation", None)
                                     for v, r in runners.items()}}
    caps = {v: getattr(r, "graph_captures", None) for v, r in runners.items()}
    if any(c for c in caps.values()):
        facts["graph_captures"] = caps
    return facts


def engine_runners(runtime: str, models: dict, workdir: Path, args, notes: dict) -> dict:
    from vlcompress.data import load_calibration
    from vlcompress.exporters.onnx import export_tower

    example = next(iter(load_calibration("shapes", n=2, batch_size=2, seed=0).batches()))
    runners = {}
    for v, m in models.items():
        onnx_path = workdir / m.name / v.replace(":", "") / "vision.onnx"
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
            size = m.image_processor.crop_size["height"]
            feed = {"pixel_values": np.random.default_rng(1).standard_normal(
                (min(args.batch_sizes), 3, size, size), dtype=np.float32)}
            val = validate_engine(res.engine_path, onnx_path, feed)
            notes.setdefault("tensorrt", {}).setdefault(m.name, {})[v] = {
                "build_seconds": round(res.seconds, 1), "sparsity": res.sparsity.to_dict(),
                "warnings": res.warnings, "validation": val, "trt_version": res.trt_version}
            runners[v] = TrtRunner(res.engine_path, copy_outputs=False)
        elif runtime == "ort-cuda":
            from vlcompress.runtime.ort_runner import OrtRunner

            runners[v] = OrtRunner(onnx_path, providers=("CUDAExecutionProvider",),
                                   io_binding=True, copy_outputs=False, name=f"ort-cuda-{v}")
    return runners


class _Deadline(Exception):
    pass


def _image_size(vlm) -> int:
    return int(vlm.model.config.vision_config.image_size)


def run(args, write=None) -> dict:
    """Measure every cell; ``write(payload)`` is called after each one (and at the end)."""
    import signal

    from vlcompress.runtime.graphs import HOST_BOUND_RATIO
    from vlcompress.runtime.latency import measure, summary

    if args.dry_run:
        import torch

        torch.set_num_threads(1)  # tiny matmuls on a shared CPU: one thread is fastest
        runtimes, device = ["torch"], "cpu"
    else:
        have = installed_runtimes()
        runtimes = list(args.runtimes or have)
        missing = [r for r in runtimes if r not in have]
        if missing:
            raise SystemExit(f"runtime(s) {', '.join(missing)} are not installed here "
                             f"(installed: {', '.join(have)})")
        device = "cuda"
    if any(m.startswith("compile") for m in args.modes) and "torch" in runtimes:
        _configure_compile()
    t0 = time.perf_counter()
    payload = {
        "complete": False, "dry_run": bool(args.dry_run), "command": " ".join(sys.argv),
        "git_commit": _git_commit(), "models": list(args.models), "tower": "vision",
        "precision": "fp32" if args.dry_run else "fp16", "device": device,
        "batch_sizes": list(args.batch_sizes), "modes": list(args.modes),
        "warmup": args.warmup, "iterations": args.iterations,
        "timer": "host clock (dry run)" if args.dry_run else "cuda events",
        "interleaving": "dense and pruned variants round robin, order reversed every other "
                        "iteration, in one process",
        "runtimes": runtimes, "gpu": None, "versions": _versions(), "shapes": {}, "rows": [],
        "notes": {}, "not_run": [], "seconds": None,
        "targets": {"structured50": ">= 1.6x over dense fp16 at batch 1 and 8 under CUDA "
                                    "graphs, >= 1.8x at batch >= 64",
                    "2:4": ">= 1.1x over dense fp16 at batch >= 64 under graph replay"},
        "host_bound_ratio": HOST_BOUND_RATIO,
    }
    if args.dry_run:
        payload["notes"]["dry_run"] = ("CPU fp32, tiny configs, 2:4 weights kept dense (no "
                                       "semi-structured kernels on CPU), torch.compile with "
                                       "backend='eager': checks the plumbing; no number here "
                                       "means anything")
    else:
        from vlcompress.runtime.cuda import gpu_info

        payload["gpu"] = gpu_info()

    def save():
        payload["seconds"] = round(time.perf_counter() - t0, 1)
        if write is not None:
            write(payload)

    def on_term(signum, frame):  # a timeout's SIGTERM: keep what was measured
        raise _Deadline(f"stopped by signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    pending = [(m, c) for m in args.models
               for c in plan_cells(args.batch_sizes, args.variants, runtimes, args.modes)]
    # eager (and engine) groups of every model first, compiled ones after: a slow compile
    # must not cost the eager numbers
    groups = list(dict.fromkeys((m, c["runtime"], c["mode"]) for m, c in pending))
    groups.sort(key=lambda g: g[2].startswith("compile"))
    built: dict[str, tuple[dict, dict]] = {}
    payload["errors"] = []

    def check_deadline():
        if args.deadline_s is not None and time.perf_counter() - t0 > args.deadline_s:
            raise _Deadline(f"deadline of {args.deadline_s:g} s passed")

    def fail(where: dict, exc: Exception, cells: list) -> None:
        msg = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        payload["errors"].append({**where, "error": msg})
        print(f"ERROR {where}: {msg}", file=sys.stderr, flush=True)
        for c in cells:
            pending.remove(c)
            payload["not_run"].append({"model": c[0], "runtime": c[1]["runtime"],
                                       "mode": c[1]["mode"], "batch": c[1]["batch"],
                                       "why": msg})

    try:
        with tempfile.TemporaryDirectory(prefix="vlc-gpu-") as td:
            workdir = Path(args.workdir) if args.workdir else Path(td)
            workdir.mkdir(parents=True, exist_ok=True)
            for model_name, runtime, mode in groups:
                check_deadline()
                cells = [(m, c) for m, c in pending
                         if (m, c["runtime"], c["mode"]) == (model_name, runtime, mode)]
                if model_name not in built:
                    models = build_models(model_name, args.variants)
                    payload["shapes"][model_name] = {v: vision_shape(m)
                                                     for v, m in models.items()}
                    size = _image_size(models["dense"])
                    rng = np.random.default_rng(0)
                    built[model_name] = (models, {
                        b: {"pixel_values": rng.standard_normal((b, 3, size, size),
                                                                dtype=np.float32)}
                        for b in args.batch_sizes})
                models, feeds = built[model_name]
                try:
                    if runtime == "torch":
                        runners = torch_runners(models, mode, args.dry_run)
                    else:
                        runners = engine_runners(runtime, models, workdir, args,
                                                 payload["notes"])
                except Exception as exc:  # noqa: BLE001 - recorded, the other groups run
                    fail({"model": model_name, "runtime": runtime, "mode": mode}, exc, cells)
                    continue
                active = []
                try:
                    for r in runners.values():
                        r.activate()
                        active.append(r)
                    if runtime == "torch" and "2:4" in runners:
                        rep = getattr(runners["2:4"], "semi_structured_report", None)
                        payload["notes"].setdefault("torch_semi_structured", {})[
                            f"{model_name}/{mode}"] = rep.to_dict() if rep else None
                except Exception as exc:  # noqa: BLE001 - e.g. a 2:4 model with no swap
                    for r in active:
                        r.deactivate()
                    fail({"model": model_name, "runtime": runtime, "mode": mode}, exc, cells)
                    continue
                try:
                    for cell in list(cells):
                        check_deadline()
                        b = cell[1]["batch"]
                        c0 = time.perf_counter()
                        host: dict = {}
                        try:
                            before = {v: compiles_of(r) for v, r in runners.items()}
                            for v in cell[1]["variants"]:  # this batch size's compile/capture
                                runners[v].infer(feeds[b])
                            primed = {v: compiles_of(r) for v, r in runners.items()}
                            times = measure({v: (runners[v], feeds[b])
                                             for v in cell[1]["variants"]},
                                            warmup=args.warmup, iterations=args.iterations,
                                            cuda_events=not args.dry_run, host=host)
                        except _Deadline:
                            raise
                        except Exception as exc:  # noqa: BLE001 - recorded, the rest runs
                            fail({"model": model_name, "runtime": runtime, "mode": mode,
                                  "batch": b}, exc, [cell])
                            continue
                        stats = {v: summary(t) for v, t in times.items()}
                        payload["rows"].append({
                            "model": model_name, "runtime": runtime, "mode": mode,
                            "batch": b, "ms": stats, "speedup_p50": _speedups(stats),
                            "provider": runners["dense"].describe().get("provider"),
                            **cell_facts(runners, before, primed, times, host),
                            "cell_seconds": round(time.perf_counter() - c0, 1)})
                        pending.remove(cell)
                        print(f"{model_name:13s} {runtime:8s} {mode:7s} b={b:<4d} " + "  ".join(
                            f"{v} {s['p50']:.3f} ms" for v, s in stats.items()), flush=True)
                        save()
                finally:
                    for r in runners.values():
                        r.deactivate()
                    if mode.startswith("compile"):
                        import torch

                        torch._dynamo.reset()  # free this group's graphs
                    if not args.dry_run:
                        import torch

                        torch.cuda.empty_cache()
    except _Deadline as exc:
        payload["stopped"] = str(exc)
    finally:
        signal.signal(signal.SIGTERM, old)
        payload["not_run"] += [{"model": m, "runtime": c["runtime"], "mode": c["mode"],
                                "batch": c["batch"], "why": payload.get("stopped", "an error")}
                               for m, c in pending]
        payload["complete"] = not payload["not_run"]
        save()
    return payload


def target(variant: str, mode: str, batch: int) -> float | None:
    """The issue-25 speedup target of a cell (None: no target there): structured 50% >= 1.6x at
    batch 1 and 8 under CUDA graphs and >= 1.8x at batch >= 64; 2:4 >= 1.1x at batch >= 64
    under graph replay."""
    graphs = mode.endswith("+graphs")
    if variant == "structured50":
        return 1.8 if batch >= 64 else (1.6 if graphs and batch in (1, 8) else None)
    if variant == "2:4":
        return 1.1 if graphs and batch >= 64 else None
    return None


def summarize(payload: dict) -> str:
    """A Markdown table of the speedups (p50 dense / p50 variant) and the targets, met or not."""
    dry = "DRY RUN (CPU, tiny shapes): no number below means anything. "
    head = (f"{dry if payload.get('dry_run') else ''}"
            f"gpu: {(payload.get('gpu') or {}).get('gpu', 'none')}, "
            f"torch {payload.get('versions', {}).get('torch')}, "
            f"{payload.get('warmup')} warm-up + {payload.get('iterations')} timed iterations, "
            f"{payload.get('timer')}, commit {payload.get('git_commit') or '?'}")
    lines = [head, "", "| model | runtime | mode | batch | dense p50 ms | 2:4 | structured 50% |",
             "|---|---|---|---|---|---|---|"]
    lines[2] = lines[2].rstrip("|") + " host-bound | compiles (timed) |"
    lines[3] += "---|---|"
    misses, flagged = [], []
    for r in sorted(payload.get("rows", []), key=lambda r: (r["model"], r["runtime"],
                                                            r["mode"], r["batch"])):
        sp = r["speedup_p50"]
        cells = []
        for v in ("2:4", "structured50"):
            x = sp.get(v)
            cells.append("-" if x is None else f"{x:.2f}x")
            need = target(v, r["mode"], r["batch"])
            if x is not None and need and x < need and not payload.get("dry_run"):
                misses.append(f"{r['model']} {r['mode']} b{r['batch']} {v} {x:.2f}x < {need}x")
        hb = [v for v, f in (r.get("host_bound") or {}).items() if f]
        timed = {v: n for v, n in (r.get("timed_compiles") or {}).items() if n}
        if timed:
            flagged.append(f"{r['model']} {r['mode']} b{r['batch']} compiled while timed: {timed}")
        comp = r.get("compiles") or {}
        lines.append(f"| {r['model']} | {r['runtime']} | {r['mode']} | {r['batch']} | "
                     f"{r['ms']['dense']['p50']:.3f} | {cells[0]} | {cells[1]} | "
                     f"{','.join(hb) or '-'} | {sum(comp.values())} ({sum(timed.values())}) |")
    lines.append("")
    lines.append("targets: " + "; ".join(f"{k} {v}" for k, v in payload.get("targets", {}).items()))
    if misses:
        lines.append("missed: " + "; ".join(misses))
    for f in flagged:
        lines.append(f"NOT A KERNEL TIME: {f}")
    for name, rep in (payload.get("notes", {}).get("torch_semi_structured") or {}).items():
        if rep:
            lines.append(f"2:4 swaps {name}: {len(rep['swapped'])} layers on {rep['backend']}, "
                         f"{len(rep['skipped'])} skipped")
    for e in payload.get("errors", []):
        lines.append(f"error {e}")
    if not payload.get("complete"):
        lines.append(f"INCOMPLETE: {len(payload.get('not_run', []))} cells not run "
                     f"({payload.get('stopped', 'errors above')})")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--summarize"]:
        import json

        if len(argv) != 2:
            print("usage: gpu_latency.py --summarize RESULT.json", file=sys.stderr)
            return 2
        print(summarize(json.loads(Path(argv[1]).read_text())))
        return 0
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_latency: no CUDA GPU is available (this benchmark needs an NVIDIA GPU and a "
              "CUDA build of PyTorch); nothing was written.", file=sys.stderr)
        return 2
    from _common import write_result

    path = Path(args.out) if args.out else None
    written = []

    def write(payload):
        written.append(write_result(NAME, payload, path))

    payload = run(args, write)
    print(f"wrote {written[-1]}" + ("" if payload["complete"] else
                                    f" (incomplete: {len(payload['not_run'])} cells not run, "
                                    f"{payload.get('stopped', 'an error')})"))
    return 0 if payload["complete"] else 3


if __name__ == "__main__":
    sys.exit(main())
