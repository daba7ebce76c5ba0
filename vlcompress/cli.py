"""The ``vlcompress`` command line: parses, calls the Python API, renders. Nothing more.

Every :class:`~vlcompress.errors.VlcError` becomes one line on stderr and a non-zero exit
code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from . import __version__
from .config import parse_method_options
from .errors import VlcError

try:  # typer >= 0.20 vendors click; its parse errors are typer._click's classes
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - typer on top of click
    from click import exceptions as _cx


class _OneLineErrors(TyperGroup):
    """Parse errors (``--calibration-size many``, an unknown option or command) as one line
    on stderr naming the value and what is allowed, exit 2; not Typer's multi-line usage box.
    ``--help`` and a bare ``vlcompress`` still print the help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _cx.NoArgsIsHelpError as exc:
            _cx.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        except _cx.UsageError as exc:
            err.print(f"[bold red]error:[/] {escape(_usage_line(exc))}", markup=True, soft_wrap=True)
            sys.exit(2)
        except _cx.ClickException as exc:
            err.print(f"[bold red]error:[/] {escape(exc.format_message())}", markup=True,
                      soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("interrupted; nothing was written")
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _usage_line(exc) -> str:
    """One line: the command, the option, the value given and what is allowed."""
    cmd = exc.ctx.command_path if exc.ctx is not None else "vlcompress"
    param = getattr(exc, "param", None)
    cause = exc.__cause__
    if isinstance(exc, _cx.BadParameter) and param is not None and hasattr(cause, "errors"):
        try:  # pydantic's ValidationError knows the value given and the type wanted
            e0 = cause.errors()[0]
            value, kind = e0.get("input"), str(e0.get("type", "")).split("_")[0]
        except Exception:  # noqa: BLE001 - fall back to the message as it is
            value = kind = None
        if value is not None:
            name = "/".join(getattr(param, "opts", None) or [param.name or "?"])
            allowed = _KINDS.get(kind, kind or "another value")
            return f"{cmd}: {name} {value!r} is not valid; allowed: {allowed}"
    msg = " ".join(exc.format_message().split())
    return f"{cmd}: {msg} (see {cmd} --help)"


app = typer.Typer(
    cls=_OneLineErrors,
    name="vlcompress",
    help="Prune, export and benchmark sparse vision-language models.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

# Shared options (values that need our own validation are taken as strings).
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Bundled name, preset, HF id or folder.")]
MethodOpt = Annotated[str, typer.Option("--method", help="Scorer: see `vlcompress models --methods`.")]
SparsityOpt = Annotated[str | None, typer.Option(
    "--sparsity", "-s", help="Fraction of weights to remove, 0 <= s < 1 (implied by N:M).")]
PatternOpt = Annotated[str, typer.Option("--pattern", "-p", help="unstructured, structured or N:M.")]
CalibOpt = Annotated[str, typer.Option(
    "--calibration", help="'shapes' (bundled), a folder with images + captions.jsonl, or (text "
    "encoders) a captions.jsonl without images or a .txt file, one sentence a line.")]
TrainDataOpt = Annotated[str | None, typer.Option(
    "--train-data", help="Pairs for recovery / retraining (default: the --calibration source).")]
TrainSizeOpt = Annotated[int, typer.Option("--train-size", help="Training pairs (at most).")]
CalibSizeOpt = Annotated[int, typer.Option("--calibration-size", help="Calibration pairs.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (new or empty).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")]
TowerOpt = Annotated[str | None, typer.Option(
    "--tower", help="Prune and export one tower only: vision or text (LLaVA: vision exports the "
    "vision tower alone; bridge or language prunes that part of the whole model).")]
SkipOpt = Annotated[bool, typer.Option(
    "--skip-incompatible", help="Leave layers whose width does not fit N:M dense instead of failing.")]
UnitsOpt = Annotated[str, typer.Option(
    "--units", help="Pattern structured: groups to remove, heads, neurons or heads,neurons.")]
RoundToOpt = Annotated[str, typer.Option(
    "--round-to", help="Pattern structured: kept widths are multiples of this (positive integer).")]
DepthOpt = Annotated[str, typer.Option(
    "--depth", help="Pattern structured, method mope: whole layers to remove per tower.")]
MethodOptionOpt = Annotated[list[str] | None, typer.Option(
    "--method-option", help="The method's own option KEY=VALUE (repeatable; "
    "`vlcompress models --methods` lists them), e.g. retrain_steps=400.")]
ReconstructOpt = Annotated[bool | None, typer.Option(
    "--reconstruct/--no-reconstruct", help="After a scorer's mask, fit the surviving weights to "
    "the dense layer outputs on the calibration data, block by block (SparseGPT's update with "
    "the mask fixed). Default: on for scoring methods at unstructured and N:M.")]
HoldoutOpt = Annotated[float, typer.Option(
    "--holdout-fraction", help="Recovery: hold out this share of the training data (never "
    "trained on), measure fidelity to the dense model on it every --holdout-every steps and "
    "keep the best state (0: off).")]
HoldoutEveryOpt = Annotated[int, typer.Option(
    "--holdout-every", help="Recovery: steps between held-out evaluations.")]
# The runtime (vlcompress.runtime.registry): a name, a device and a precision.
_RUNTIMES = "onnxruntime, onnxruntime-trt, torch, torch-2:4 or trt (tensorrt)"
EngineOpt = Annotated[str, typer.Option("--engine", "--runtime", help=f"Runtime: {_RUNTIMES}.")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="cpu or cuda (default: the runtime's first; cuda for trt and torch-2:4).")]
Fp16Opt = Annotated[bool, typer.Option(
    "--fp16", help="fp16 ONNX and runtime precision (trt and torch-2:4 always run fp16).")]
# quantization on top of sparsity (vlcompress.exporters.quantize)
QuantizeOpt = Annotated[str, typer.Option(
    "--quantize", help="Also quantize: none, int8, fp16 or fp8 (fp8: trt, onnxruntime-trt; "
    "with --engine trt: int8/fp8 engines from explicit QDQ ONNX).")]
CudaGraphsOpt = Annotated[bool, typer.Option(
    "--cuda-graphs", help="Time under CUDA-graph replay: each batch size captured once, then "
    "replayed (torch and torch-2:4 runtimes on cuda only).")]
QuantMethodOpt = Annotated[str, typer.Option(
    "--quantize-method", help="int8: static (QDQ, calibrated on --calibration) or dynamic.")]


def _method_trains(method: str) -> bool:
    """Whether ``method`` retrains on the training pairs (unknown: True; the config says why)."""
    from .errors import VlcError
    from .methods.registry import get_method

    try:
        return get_method(method).retrain is not None
    except VlcError:
        return True


def _refuse_pattern_options(ctx: typer.Context, pattern: str) -> None:
    """``--units``/``--round-to`` only shape a structured pattern, ``--skip-incompatible`` only
    an N:M one (an unknown pattern: the config's own refusal comes first)."""
    from .config import Pattern
    from .errors import VlcError

    try:
        pat = Pattern.parse(pattern)
    except VlcError:
        return
    _refuse_meaningless(ctx, [
        ("units", pat.is_structured, f"applies to --pattern structured only, not {pat}"),
        ("round_to", pat.is_structured, f"applies to --pattern structured only, not {pat}"),
        ("skip_incompatible", pat.is_nm,
         f"applies to N:M patterns only (layers N:M cannot fit), not {pat}"),
    ])


def _errors(fn):
    """Turn VlcError into one line on stderr and its exit code (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*a, **k):
        from .atomic import Interrupted, signals_interrupt

        try:
            with signals_interrupt():  # SIGTERM/SIGHUP unwind like Ctrl-C: temporaries removed
                return fn(*a, **k)
        except Interrupted as exc:
            err.print(f"interrupted ({exc}); nothing was written")
            raise typer.Exit(128 + exc.signum) from None
        except VlcError as exc:
            if _state["debug"]:
                raise
            # the message is the user's text (paths, values): printed literally, never as markup
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or from the environment),
    rather than leaving its default."""
    src = ctx.get_parameter_source(name)
    return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")


def _refuse_meaningless(ctx: typer.Context, rules) -> None:
    """Before any work: one line for the first option the user gave that another choice makes
    meaningless. ``rules``: ``(parameter name, whether it means anything, why not)``."""
    from .errors import ConfigError

    for name, applies, why in rules:
        if not applies and _given(ctx, name):
            param = next(p for p in ctx.command.params if p.name == name)
            flag = max(param.opts, key=len)
            value = ctx.params.get(name)
            shown = flag if isinstance(value, bool) else f"{flag} {value}"
            raise ConfigError(f"{shown} {why}")


def _version(value: bool):
    if value:
        out.print(f"vlcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
):
    """Prune, export and benchmark sparse vision-language models."""
    _state["debug"] = debug


def _progress():
    from .progress import RichProgress

    return RichProgress(err)


@app.command("prune-export")
@_errors
def prune_export_cmd(
    ctx: typer.Context,
    model: ModelOpt = "tiny-clip",
    method: MethodOpt = "multiflow",
    sparsity: SparsityOpt = None,
    pattern: PatternOpt = "2:4",
    calibration: CalibOpt = "shapes",
    calibration_size: CalibSizeOpt = 256,
    engine: EngineOpt = "onnxruntime",
    out_dir: OutOpt = Path("vlcompress-out"),
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Latency batch sizes, e.g. 1,8.")] = "1,8",
    device: DeviceOpt = None,
    fp16: Fp16Opt = False,
    eval_data: Annotated[str | None, typer.Option(
        "--eval-data", help="Evaluation data (default: the --calibration source).")] = None,
    eval_size: Annotated[int, typer.Option("--eval-size", help="Evaluation pairs.")] = 720,
    train_data: TrainDataOpt = None,
    train_size: TrainSizeOpt = 4096,
    iterations: Annotated[int, typer.Option("--iterations", help="Timed iterations per latency cell.")] = 30,
    force: ForceOpt = False,
    skip_incompatible: SkipOpt = False,
    tower: TowerOpt = None,
    units: UnitsOpt = "heads,neurons",
    round_to: RoundToOpt = "8",
    depth: DepthOpt = "0",
    method_option: MethodOptionOpt = None,
    recover_steps: Annotated[int, typer.Option(
        "--recover-steps", help="Distil the dense model into the pruned one for N steps "
        "(learning rate and loss weights: the model's recovery recipe, else `recover`'s "
        "defaults; the report says which).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json instead of tables.")] = False,
    quantize: QuantizeOpt = "none",
    quantize_method: QuantMethodOpt = "static",
    target_speedup: Annotated[str | None, typer.Option(
        "--target-speedup", help="Prune to the lowest structured sparsity that reaches this "
        "speedup over dense (measured).")] = None,
    triton: Annotated[str | None, typer.Option(
        "--triton", help="Also write OUT/triton, a Triton model repository with this backend: "
        "onnxruntime, tensorrt (needs --engine trt) or python.")] = None,
    reconstruct: ReconstructOpt = None,
    holdout_fraction: HoldoutOpt = 0.0,
    holdout_every: HoldoutEveryOpt = 25,
    parts: Annotated[str | None, typer.Option(
        "--parts", help="Generative models (llava): the parts to prune, vision,bridge,language "
        "(default all), each optionally =SPARSITY, e.g. vision=0.3,language.")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", help="Generative models: greedy tokens generated per caption or "
        "answer in the evaluation.")] = 24,
    visual_tokens: Annotated[int | None, typer.Option(
        "--visual-tokens", help="Generative models: keep K of the vision tower's tokens per "
        "image (VisionZip: dominant tokens by attention, the rest merged); adds the "
        "dense_tokens and pruned_tokens variants.")] = None,
    cuda_graphs: CudaGraphsOpt = False,
    offload: Annotated[str, typer.Option(
        "--offload", help="none, or disk: a generative model folder bigger than memory, pruned "
        "block by block from its shards and evaluated with its blocks on disk (no ONNX "
        "export).")] = "none",
):
    """Prune a model, export dense and pruned ONNX, and compare accuracy and latency."""
    from .pipeline import RunConfig, prune_export
    from .report import console_tables

    _refuse_pattern_options(ctx, pattern)
    trains = recover_steps > 0 or _method_trains(method)
    _refuse_meaningless(ctx, [
        (name, trains, f"{what}: it needs --recover-steps > 0 or a method that retrains "
         f"(upop, efficientvlm), not --method {method} alone")
        for name, what in (("train_data", "is the training data"),
                           ("train_size", "sizes the training data"))])

    cfg = RunConfig(model=model, method=method, sparsity=sparsity, pattern=pattern,
                    calibration=calibration, calibration_size=calibration_size, engine=engine,
                    out=str(out_dir), batch_sizes=batch_sizes, device=device, fp16=fp16,
                    eval_data=eval_data, eval_size=eval_size, train_data=train_data,
                    train_size=train_size, iterations=iterations, force=force,
                    skip_incompatible=skip_incompatible, units=units, round_to=round_to, depth=depth,
                    tower=tower, recover_steps=recover_steps, quantize=quantize,
                    quantize_method=quantize_method, target_speedup=target_speedup, triton=triton,
                    method_options=parse_method_options(method_option), parts=parts,
                    max_new_tokens=max_new_tokens, cuda_graphs=cuda_graphs,
                    visual_tokens=visual_tokens, reconstruct=reconstruct,
                    holdout_fraction=holdout_fraction, holdout_every=holdout_every,
                    offload=offload)
    with _progress() as prog:
        report = prune_export(cfg, progress=prog)
    if as_json:
        out.print_json(json.dumps(report, default=str))
        return _target_verdict(report, lines=False)
    p = report["prune"]
    out.print(f"[bold]{report['model']['name']}[/]: {p['method']} {p['pattern']}, achieved "
              f"sparsity {100 * p['achieved']:.1f}% "
              + " ".join(f"{k}={100 * v:.1f}%" for k, v in p["per_modality"].items())
              + f", pruned in {p['seconds']:.2f}s"
              + (f", reconstructed ({(p.get('reconstruct') or {}).get('seconds', 0):.2f}s)"
                 if (p.get("reconstruct") or {}).get("enabled") else ""), soft_wrap=True)
    for t in console_tables(report):
        out.print(t)
    if report["model"].get("generative"):
        exports = (report.get("export") or {}).get("generative") or {}
        files = exports.get("pruned", {})
        names = ", ".join(v.rsplit("/", 1)[-1] for v in (files.get("paths") or {}).values())
        folders = " ".join(f"{v}/" for v in exports)
        more = ("; every variant's accuracy and latency: report.md"
                if len(exports) > 2 else "")
        out.print(f"wrote {out_dir}/report.json, report.md, {folders} ({names}, validated), "
                  f"pruned/model{more}", soft_wrap=True)
        return
    out.print(f"wrote {out_dir}/report.json, report.md, dense/*.onnx, pruned/*.onnx, pruned/model"
              + (f", triton/ ({triton} backend)" if triton else ""), soft_wrap=True)
    _target_verdict(report, lines=True)


def _target_verdict(report: dict, lines: bool) -> None:
    """--target-speedup: the search and its verdict on the terminal; a miss in the run's full
    timing exits 1, like a broken gate (the run is written: it is what was measured)."""
    if not report.get("target_speedup"):
        return
    from .speedup_search import search_lines, target_missed

    for line in search_lines(report["target_speedup"]) if lines else ():
        out.print(line, soft_wrap=True, highlight=False, markup=False)
    if target_missed(report):
        err.print(f"--target-speedup {report['target_speedup']['target_speedup']:g} missed in "
                  "the run's full timing (the run is written)", soft_wrap=True)
        raise typer.Exit(1)


@app.command("prune")
@_errors
def prune_cmd(
    ctx: typer.Context,
    model: ModelOpt = "tiny-clip",
    method: MethodOpt = "multiflow",
    sparsity: SparsityOpt = None,
    pattern: PatternOpt = "2:4",
    calibration: CalibOpt = "shapes",
    calibration_size: CalibSizeOpt = 256,
    out_dir: OutOpt = Path("vlcompress-pruned"),
    force: ForceOpt = False,
    skip_incompatible: SkipOpt = False,
    units: UnitsOpt = "heads,neurons",
    round_to: RoundToOpt = "8",
    depth: DepthOpt = "0",
    method_option: MethodOptionOpt = None,
    reconstruct: ReconstructOpt = None,
    offload: Annotated[str, typer.Option(
        "--offload", help="none, or disk: prune a model folder of safetensors shards bigger "
        "than memory, block by block (its decoder read from the shards for each block's turn, "
        "the pruned blocks written to OUT shard by shard); methods wanda, wanda-seq, sparsegpt.")] = "none",
):
    """Prune a model and save it (safetensors + config + prune.json)."""
    from .api import prune_and_save

    _refuse_pattern_options(ctx, pattern)
    res = prune_and_save(model, out_dir, method=method, sparsity=sparsity, pattern=pattern,
                         calibration=calibration, calibration_size=calibration_size, force=force,
                         skip_incompatible=skip_incompatible, progress_factory=_progress,
                         units=units, round_to=round_to, depth=depth,
                         method_options=parse_method_options(method_option), offload=offload,
                         reconstruct=reconstruct)
    out.print(f"pruned {model} with {res['method']} {res['pattern']}: achieved "
              f"{100 * res['achieved']:.1f}% sparsity in {res['seconds']:.2f}s -> {out_dir}")


@app.command("export")
@_errors
def export_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model folder (e.g. from `vlcompress prune`) or name.")],
    out_dir: OutOpt = Path("vlcompress-onnx"),
    fp16: Annotated[bool, typer.Option("--fp16", help="Export fp16 ONNX.")] = False,
    calibration: CalibOpt = "shapes",
    force: ForceOpt = False,
    quantize: QuantizeOpt = "none",
    quantize_method: QuantMethodOpt = "static",
    quantize_target: Annotated[str, typer.Option(
        "--quantize-target", help="Who runs the quantized ONNX: onnxruntime, or tensorrt "
        "(explicit symmetric QDQ; fp8 needs it).")] = "onnxruntime",
):
    """Export each tower of a model to ONNX and validate it against PyTorch."""
    from .api import export

    _refuse_meaningless(ctx, [(name, quantize != "none", "sets how --quantize quantizes; "
                               "drop it or give --quantize int8|fp16|fp8")
                              for name in ("quantize_method", "quantize_target")])

    res = export(model, out_dir, fp16=fp16, force=force, calibration=calibration,
                 progress_factory=_progress, quantize=quantize, quantize_method=quantize_method,
                 quantize_target=quantize_target)
    for tower, path in res.paths.items():
        out.print(f"{tower}: {path} (max abs diff vs PyTorch {res.max_abs_diff[tower]:.2e})")
    for tower, q in res.quantized.items():  # --quantize: the file written beside the fp32 one
        vs = q.get("vs_pytorch")
        out.print(f"{tower} {q['quantize']} ({q['method']}, {q['target']}): {q['path']}"
                  + (f" (min cosine vs PyTorch {vs['min_cosine']:.4f})" if vs else ""),
                  soft_wrap=True)


@app.command("generate")
@_errors
def generate_cmd(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="A prune-export run folder of a generative "
                                                 "model.")],
    image: Annotated[Path, typer.Option("--image", help="The image to ask about.")],
    prompt: Annotated[str, typer.Option("--prompt", help="The question or instruction.")],
    dense: Annotated[bool, typer.Option("--dense", help="Answer with the dense export "
                                                        "(default: the pruned one).")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens",
                                                help="Most tokens to generate.")] = 24,
    sample: Annotated[bool, typer.Option("--sample", help="Sample the tokens (seeded) instead "
                                                          "of the greedy arg-max.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="With --sample: the generator's seed.")] = 0,
    temperature: Annotated[float, typer.Option(
        "--temperature", help="With --sample: divides the logits (> 0).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="With --sample: keep the k most likely "
                                                       "tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="With --sample: keep the most likely "
                                                         "tokens up to this mass (1: all).")] = 1.0,
    reduced_tokens: Annotated[bool, typer.Option(
        "--reduced-tokens", help="Answer with the run's token-reduced export (dense_tokens / "
        "pruned_tokens: a run made with --visual-tokens K).")] = False,
    runtime: Annotated[str, typer.Option(
        "--runtime", help="onnxruntime (vlcompress's generation loop) or genai (ONNX Runtime "
        "GenAI, the [genai] extra).")] = "onnxruntime",
):
    """Answer a prompt about an image with a run's exported ONNX graphs (ONNX Runtime, or ONNX
    Runtime GenAI with --runtime genai; greedy, or seeded sampling with --sample)."""
    from .api import generate
    from .runtime.ort_generate import Sampling

    _refuse_meaningless(ctx, [
        *((name, sample, "applies to sampling; add --sample")
          for name in ("seed", "temperature", "top_k", "top_p"))])
    sampling = Sampling(temperature, top_k, top_p, seed) if sample else None
    out.print(generate(run_dir, image, prompt, dense=dense, max_new_tokens=max_new_tokens,
                       sampling=sampling, reduced_tokens=reduced_tokens, runtime=runtime),
              soft_wrap=True, highlight=False, markup=False)


@app.command("models")
@_errors
def models_cmd(
    methods: Annotated[bool, typer.Option("--methods", help="List pruning methods instead.")] = False,
):
    """List bundled models and architecture presets (or pruning methods)."""
    from rich.table import Table

    if methods:
        from .methods import methods as all_methods

        t = Table("method", "kind", "patterns", "needs", "families", "description")
        for m in all_methods():
            t.add_row(m.name, m.kind, m.pattern_names, ", ".join(m.needs) or "-",
                      ", ".join(m.families) if m.families else "any", m.description)
        out.print(t)
        opts = Table("method", "--method-option", "help", title="method options (defaults)")
        for m in all_methods():
            for o in m.options:
                opts.add_row(m.name, o.describe(), o.help)
        from .methods.registry import NM_OPTIONS

        for o in NM_OPTIONS:  # every method that supports N:M takes these
            opts.add_row("(any, N:M)", o.describe(), o.help)
        if opts.row_count:
            out.print(opts)
        return
    from .models import list_models

    t = Table("name", "kind", "family", "description")
    for e in list_models():
        t.add_row(e.name, e.kind, e.family, e.description)
    out.print(t)


@app.command("bench")
@_errors
def bench_cmd(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="A `vlcompress prune-export --out` folder.")],
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="Report JSON to gate against (report.json or an earlier bench report).")] = None,
    max_latency_regression: Annotated[float, typer.Option(
        "--max-latency-regression", help="Allowed relative slowdown of the pruned model.")] = 0.10,
    max_accuracy_drop: Annotated[float, typer.Option(
        "--max-accuracy-drop", help="Allowed absolute drop of each metric (0.01 = 1 pt).")] = 0.01,
    report: Annotated[Path | None, typer.Option(
        "--report", help="Where to write the fresh report (default RUN_DIR/bench-report.json).")] = None,
    summary: Annotated[Path | None, typer.Option(
        "--summary", help="Write the Markdown summary here (also appended to $GITHUB_STEP_SUMMARY).")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML (needs --baseline).")] = None,
    runtime: Annotated[str | None, typer.Option(
        "--runtime", "--engine",
        help=f"Re-measure on another runtime ({_RUNTIMES}); default: the run's.")] = None,
    device: DeviceOpt = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="fp32 or fp16 (default: the run's).")] = None,
    batch_sizes: Annotated[str | None, typer.Option(
        "--batch-sizes", help="Latency batch sizes (default: the baseline's, else the run's).")] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="Timed iterations per latency cell.")] = 100,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed warm-up iterations per cell.")] = 10,
    threads: Annotated[int | None, typer.Option("--threads", help="onnxruntime intra-op threads.")] = None,
    eval_size: Annotated[int | None, typer.Option("--eval-size", help="Evaluation pairs.")] = None,
    latency_basis: Annotated[str, typer.Option(
        "--latency-basis", help="relative (pruned/dense, in-run), absolute or both.")] = "relative",
    latency_quantile: Annotated[float, typer.Option(
        "--latency-quantile", help="Quantile of per-iteration times compared (0.5 = median).")] = 0.25,
    confidence: Annotated[float, typer.Option("--confidence", help="Bootstrap confidence level.")] = 0.95,
    metrics: Annotated[str | None, typer.Option(
        "--metrics", help="Accuracy metrics to gate, e.g. zeroshot_top1,i2t_r1 (default: all).")] = None,
    no_accuracy: Annotated[bool, typer.Option("--no-accuracy", help="Skip accuracy.")] = False,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip latency.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report JSON instead of tables.")] = False,
    cuda_graphs: CudaGraphsOpt = False,
):
    """Re-measure a prune-export folder; with --baseline, gate it (exit 1: a threshold broken)."""
    import os

    from .atomic import atomic_write_text
    from .bench import BenchConfig, benchmark
    from .errors import ConfigError
    from .gate import GateConfig
    from .report import console_tables

    if junit is not None and baseline is None:
        raise ConfigError("--junit needs --baseline (the JUnit test cases are the gate's checks)")
    gate_cfg = GateConfig(max_latency_regression=max_latency_regression,
                          max_accuracy_drop=max_accuracy_drop, basis=latency_basis,
                          quantile=latency_quantile, confidence=confidence, metrics=metrics)
    cfg = BenchConfig(run_dir=str(run_dir), baseline=str(baseline) if baseline else None,
                      report=str(report) if report else None, runtime=runtime, device=device,
                      precision=precision, batch_sizes=batch_sizes, iterations=iterations,
                      warmup=warmup, threads=threads,
                      eval_size=eval_size, accuracy=not no_accuracy, latency=not no_latency,
                      cuda_graphs=cuda_graphs,
                      gate=gate_cfg)  # values checked first, then what they mean together
    _refuse_meaningless(ctx, [
        *((name, not no_latency, "sets how latency is measured; drop it or --no-latency")
          for name in ("runtime", "device", "precision", "batch_sizes", "iterations", "warmup",
                       "threads", "cuda_graphs")),
        *((name, not no_accuracy, "concerns accuracy; drop it or --no-accuracy")
          for name in ("eval_size", "metrics")),
        *((name, baseline is not None, "is a gate threshold: it needs --baseline")
          for name in ("max_latency_regression", "max_accuracy_drop", "latency_basis",
                       "latency_quantile", "confidence", "metrics")),
    ])
    from .atomic import check_output_file

    for opt, path in (("--summary", summary), ("--junit", junit), ("--report", report)):
        if path is not None:  # checked before any work: nothing measured is lost at the end
            check_output_file(path, opt)
    with _progress() as prog:
        res = benchmark(cfg, progress=prog)
    md = res.summary_markdown()
    if summary is not None:
        atomic_write_text(summary, md)
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    if step:
        with open(step, "a", encoding="utf-8") as f:
            f.write(md + "\n")
    if junit is not None and res.gate is not None:
        atomic_write_text(junit, res.gate.junit_xml())
    if as_json:
        out.print_json(json.dumps(res.report, default=str))
    else:
        for t in console_tables(res.report):
            out.print(t)
        out.print(f"wrote {res.report_path} and {res.markdown_path}", soft_wrap=True)
    g = res.gate
    if g is None:
        return
    for c in g.checks:
        mark = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        (out if c.passed else err).print(f"{mark} {c.message}", markup=True, soft_wrap=True,
                                         highlight=False)
    for note in g.notes:
        out.print(f"note: {note}", soft_wrap=True)
    if g.passed:
        out.print(f"gate passed: {len(g.checks)} checks hold against {baseline}", soft_wrap=True)
        return
    err.print(f"gate failed: {len(g.failures)} of {len(g.checks)} thresholds broken against "
              f"{baseline}", soft_wrap=True)
    raise typer.Exit(1)


@app.command("sweep")
@_errors
def sweep_cmd(
    ctx: typer.Context,
    model: ModelOpt = "tiny-clip",
    methods: Annotated[str, typer.Option("--methods", help="Scorers, comma-separated.")] = \
        "magnitude,wanda,multiflow",
    sparsities: Annotated[str, typer.Option(
        "--sparsities", help="Comma-separated sparsities for unstructured patterns.")] = "0.3,0.5,0.7",
    patterns: Annotated[str, typer.Option("--patterns", help="Patterns, comma-separated.")] = \
        "unstructured,2:4",
    calibration: CalibOpt = "shapes",
    calibration_size: CalibSizeOpt = 256,
    eval_data: Annotated[str | None, typer.Option(
        "--eval-data", help="Evaluation data (default: the --calibration source).")] = None,
    eval_size: Annotated[int, typer.Option("--eval-size", help="Evaluation pairs.")] = 720,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Latency batch sizes, e.g. 1,8.")] = "1,8",
    runtime: EngineOpt = "onnxruntime",
    device: DeviceOpt = None,
    fp16: Fp16Opt = False,
    metric: Annotated[str | None, typer.Option(
        "--metric", help="Metric plotted (default zeroshot_top1, i2t_r1, else text/image_cosine).")] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="Timed iterations per latency cell.")] = 30,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Accuracy only.")] = False,
    out_dir: OutOpt = Path("vlcompress-sweep"),
    force: ForceOpt = False,
    quantize: QuantizeOpt = "none",
    quantize_method: QuantMethodOpt = "static",
    method_option: Annotated[list[str] | None, typer.Option(
        "--method-option", help="A method's own option METHOD.KEY=VALUE (repeatable; "
        "`vlcompress models --methods` lists them), e.g. ecoflap.estimator=block-spsa.")] = None,
):
    """Prune one model with every method x pattern x sparsity: a table and PNG plots."""
    from rich.table import Table

    from .config import Pattern
    from .report import METRIC_NAMES
    from .sweep import sweep

    _refuse_meaningless(ctx, [
        *((name, not no_latency, "sets how latency is measured; drop it or --no-latency")
          for name in ("batch_sizes", "runtime", "device", "fp16", "iterations")),
        ("sparsities", any(not Pattern.parse(p).is_nm for p in patterns.split(",") if p.strip()),
         f"does not apply to --patterns {patterns} (N:M fixes the sparsity)"),
    ])

    with _progress() as prog:
        res = sweep(model, methods, sparsities, patterns, out=out_dir, calibration=calibration,
                    calibration_size=calibration_size, eval_data=eval_data, eval_size=eval_size,
                    batch_sizes=batch_sizes, runtime=runtime, device=device,
                    precision="fp16" if fp16 else None, metric=metric, iterations=iterations,
                    latency=not no_latency, force=force, progress=prog, quantize=quantize,
                    quantize_method=quantize_method, method_options=method_option)
    fid = ("text_cosine", "image_cosine")
    keys = [k for k in ("zeroshot_top1", "i2t_r1", "t2i_r1", *fid) if k in res["dense"]]
    t = Table("method", "setting", "achieved", *[METRIC_NAMES.get(k, k) for k in keys],
              title=f"{res['model']} on {res['eval']['dataset']}")

    def fmt(k, v):
        return f"{v:.3f}" if k in fid else f"{100 * v:.1f}%"

    t.add_row("dense", "-", "0.0%", *[fmt(k, res["dense"][k]) for k in keys])
    if res.get("quantize"):  # --quantize: the dense model quantized
        qd = res["quantize"]
        t.add_row("dense", qd["quantize"], "0.0%", *[fmt(k, qd["dense"][k]) for k in keys])
    for r in res["rows"]:
        t.add_row(r["method"], r["setting"], f"{100 * r['achieved']:.1f}%",
                  *[fmt(k, r[k]) for k in keys])
    out.print(t)
    out.print(f"wrote {out_dir}/sweep.json, sweep.md, accuracy_vs_sparsity.png"
              + (", latency_vs_batch.png" if res["latency"] else ""), soft_wrap=True)


@app.command("recover")
@_errors
def recover_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A prune-export output folder.")],
    steps: Annotated[int, typer.Option("--steps", help="Distillation steps (positive).")] = 200,
    lr: Annotated[float | None, typer.Option(
        "--lr", help="Learning rate (AdamW). Default: the dense model's recovery recipe (its "
        "vlcompress.json; tiny-clip's is 1e-3), else 5e-5 (for pretrained checkpoints).")] = None,
    schedule: Annotated[str, typer.Option(
        "--schedule", help="Learning-rate schedule: cosine (linear warm-up over 5% of the "
        "steps, then decay to 0) or constant.")] = "cosine",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per step.")] = 32,
    data: Annotated[str | None, typer.Option(
        "--data", help="Training data: 'shapes' (bundled train split), a pairs folder, or for a "
        "text encoder a .txt / image-less captions.jsonl. Default: the run's calibration "
        "data.")] = None,
    size: Annotated[int, typer.Option("--size", help="Training pairs.")] = 256,
    eval_data: Annotated[str | None, typer.Option(
        "--eval-data", help="Evaluation data (as --data). Default: the run's eval data.")] = None,
    eval_size: Annotated[int, typer.Option("--eval-size", help="Evaluation pairs.")] = 720,
    resume: Annotated[bool, typer.Option("--resume/--no-resume",
                                         help="Continue from RUN_DIR/recover/last.pt.")] = True,
    distill_weight: Annotated[list[str] | None, typer.Option(
        "--distill-weight", help="A loss weight KEY=VALUE (repeatable): w_contrastive, w_embed, "
        "w_logits, temperature, w_relation (relation distillation over the batch; default 0, "
        "or the dense model's recovery recipe), e.g. w_relation=1.")] = None,
    holdout_fraction: HoldoutOpt = 0.0,
    holdout_every: HoldoutEveryOpt = 25,
    patience: Annotated[int, typer.Option(
        "--patience", help="With --holdout-fraction: stop after this many held-out evaluations "
        "without improvement (0: run every step).")] = 0,
):
    """Distil the dense model into the pruned one (pattern preserved), then re-evaluate."""
    from .distill import check_schedule, check_weights
    from .recover import describe_recipe, recover

    weights = check_weights(distill_weight)
    check_schedule(schedule)
    try:
        with _progress() as prog:
            res = recover(run_dir, steps=steps, lr=lr, batch_size=batch_size, data=data, n=size,
                          eval_data=eval_data, eval_size=eval_size, resume=resume, progress=prog,
                          weights=weights, schedule=schedule, holdout_fraction=holdout_fraction,
                          holdout_every=holdout_every, patience=patience)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (atomic.Interrupted): 128+signal
        err.print(f"interrupted; the last checkpoint is in {run_dir}/recover/ (run again to resume)",
                  markup=False, soft_wrap=True)
        raise typer.Exit(128 + getattr(exc, "signum", 2)) from None
    m = res.metrics
    for k in ("zeroshot_top1", "i2t_r1", "t2i_r1", "attribute_accuracy", "vqa_accuracy"):
        if k in m.get("dense", {}):
            out.print(f"{k}: dense {100 * m['dense'][k]:.1f}%, pruned {100 * m['pruned'][k]:.1f}%, "
                      f"recovered {100 * m['recovered'][k]:.1f}%")
    for side, fid in (m.get("fidelity") or {}).get("recovered", {}).items():
        out.print(f"{side} fidelity to dense: pruned {m['fidelity']['pruned'][side]:.4f}, "
                  f"recovered {fid:.4f}")
    out.print(f"trained on {res.data['source']} ({res.data['kind']}, n={res.data['n']})",
              soft_wrap=True)
    if res.holdout:
        h = res.holdout
        out.print(f"held out {h['n']} pairs: best fidelity {h['best_score']:.4f} at step "
                  f"{h['best_step']} (kept), evaluated every {h['every']} steps"
                  + (f", stopped at {h['stopped_at']}" if h.get("stopped_at") else ""),
                  soft_wrap=True)
    if res.recipe:
        out.print(describe_recipe(res.recipe) + "; --lr / --distill-weight override it",
                  soft_wrap=True)
    out.print(f"recovered {res.steps - res.start_step} steps"
              + (f" (resumed at {res.start_step})" if res.start_step else "")
              + f" in {res.seconds:.1f}s -> {run_dir}/recovered/model, recover.json", soft_wrap=True)


# Serving: a Triton model repository from a run, checked on the real tritonserver.
TritonBackendOpt = Annotated[str | None, typer.Option(
    "--backend", help="onnxruntime (CPU or GPU), tensorrt (the run's engines) or python "
    "(onnxruntime inside Triton's Python backend: runs on any Triton). Default: onnxruntime; "
    "python for a generative run (its generation loop runs there).")]


@app.command("export-triton")
@_errors
def export_triton_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A `vlcompress prune-export --out` folder.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Repository folder (new or empty).")],
    backend: TritonBackendOpt = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="cpu or gpu instances (default: the run's device; gpu for tensorrt).")] = None,
    variants: Annotated[str | None, typer.Option(
        "--variants", help="Comma-separated variants to serve (default: every one the run holds: "
        "dense, pruned, and dense_Q, pruned_Q of a --quantize Q run; a generative run also "
        "dense_fp16/_int8, dense_tokens, pruned_tokens and their _fp16/_int8 twins).")] = None,
    force: ForceOpt = False,
):
    """Write a Triton model repository (one model per variant and tower) from a run."""
    from .exporters.triton import export_triton

    repo = export_triton(run_dir, out_dir, backend=backend, device=device, variants=variants,
                         force=force)
    for m in repo.models:
        out.print(f"{m.name}: max_batch_size {m.max_batch_size}, preferred "
                  f"{m.preferred_batch_size or '-'}, queue delay {m.max_queue_delay_microseconds} us",
                  soft_wrap=True)
    out.print(f"wrote {out_dir} ({repo.backend} backend, {repo.device}): config.pbtxt per model, "
              "README.md with the tritonclient calls", soft_wrap=True)


@app.command("serve-check")
@_errors
def serve_check_cmd(
    repo: Annotated[Path, typer.Argument(help="An `export-triton --out` folder.")],
    port: Annotated[int | None, typer.Option(
        "--port", help="HTTP port on 127.0.0.1 (default: a free one; if taken, another is used).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for readiness.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Start tritonserver on REPO (loopback); send each model a batch and concurrent single
    requests; compare every answer with the run's PyTorch model."""
    from .serve import serve_check

    res = serve_check(repo, port=port, ready_timeout=timeout)
    if as_json:
        out.print_json(json.dumps(res.to_dict()))
    else:
        out.print(f"tritonserver ready on {res.url} in {res.start_seconds:.1f}s", soft_wrap=True)
        for r in res.rows:
            mark = "[green]ok[/]" if r["passed"] else "[bold red]MISMATCH[/]"
            what = (f"batch {r['batch']}" if r["kind"] == "batch" else
                    f"{r['requests']} concurrent single requests"
                    + (f" ({r['executions']} executions)" if "executions" in r else ""))
            if r["kind"] == "refusal":
                text = (f"{r['model']}: {r.get('refused', 0)}/{r.get('bad_requests', 0)} "
                        "malformed requests refused in one line each, then a valid one "
                        f"answered as {r['reference']}")
            elif r.get("generate"):
                text = (f"{r['model']} ({r['precision']}): {what}, {r.get('rows_equal', 0)}/"
                        f"{r.get('rows', 0)} rows token-for-token equal ({r.get('new_tokens', 0)} "
                        f"new tokens) vs {r['reference']}")
            else:
                text = (f"{r['model']} ({r['precision']}): {what}, max abs diff "
                        f"{r['max_abs_diff']:.2e}, min cosine {r['min_cosine']:.5f} vs "
                        f"{r['reference']}")
            text += f": {r['error']}" if r.get("error") else ""
            out.print(f"{mark} {escape(text)}", markup=True, soft_wrap=True)
        for n in res.notes:
            out.print(f"note: {n}", soft_wrap=True)
    if not res.passed:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except SystemExit as exc:  # typer/click exit codes pass through
        sys.exit(exc.code)
