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

from . import __version__
from .errors import VlcError

app = typer.Typer(
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
PatternOpt = Annotated[str, typer.Option("--pattern", "-p", help="unstructured or N:M (2:4, 4:8).")]
CalibOpt = Annotated[str, typer.Option(
    "--calibration", help="'shapes' (bundled) or a folder with images + captions.jsonl.")]
CalibSizeOpt = Annotated[int, typer.Option("--calibration-size", help="Calibration pairs.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (new or empty).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")]
SkipOpt = Annotated[bool, typer.Option(
    "--skip-incompatible", help="Leave layers whose width does not fit N:M dense instead of failing.")]


def _errors(fn):
    """Turn VlcError into one line on stderr and its exit code (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except VlcError as exc:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


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
    model: ModelOpt = "tiny-clip",
    method: MethodOpt = "multiflow",
    sparsity: SparsityOpt = None,
    pattern: PatternOpt = "2:4",
    calibration: CalibOpt = "shapes",
    calibration_size: CalibSizeOpt = 256,
    engine: Annotated[str, typer.Option("--engine", help="onnxruntime, torch or trt.")] = "onnxruntime",
    out_dir: OutOpt = Path("vlcompress-out"),
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Latency batch sizes, e.g. 1,8.")] = "1,8",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    fp16: Annotated[bool, typer.Option("--fp16", help="Export fp16 ONNX.")] = False,
    eval_data: Annotated[str, typer.Option("--eval-data", help="'shapes' or a pairs folder.")] = "shapes",
    eval_size: Annotated[int, typer.Option("--eval-size", help="Evaluation pairs.")] = 720,
    iterations: Annotated[int, typer.Option("--iterations", help="Timed iterations per latency cell.")] = 30,
    force: ForceOpt = False,
    skip_incompatible: SkipOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json instead of tables.")] = False,
):
    """Prune a model, export dense and pruned ONNX, and compare accuracy and latency."""
    from .pipeline import RunConfig, prune_export
    from .report import console_tables

    cfg = RunConfig(model=model, method=method, sparsity=sparsity, pattern=pattern,
                    calibration=calibration, calibration_size=calibration_size, engine=engine,
                    out=str(out_dir), batch_sizes=batch_sizes, device=device, fp16=fp16,
                    eval_data=eval_data, eval_size=eval_size, iterations=iterations, force=force,
                    skip_incompatible=skip_incompatible)
    with _progress() as prog:
        report = prune_export(cfg, progress=prog)
    if as_json:
        out.print_json(json.dumps(report, default=str))
        return
    p = report["prune"]
    out.print(f"[bold]{report['model']['name']}[/]: {p['method']} {p['pattern']}, achieved "
              f"sparsity {100 * p['achieved']:.1f}% "
              + " ".join(f"{k}={100 * v:.1f}%" for k, v in p["per_modality"].items())
              + f", pruned in {p['seconds']:.2f}s", soft_wrap=True)
    for t in console_tables(report):
        out.print(t)
    out.print(f"wrote {out_dir}/report.json, report.md, dense/*.onnx, pruned/*.onnx, pruned/model",
              soft_wrap=True)


@app.command("prune")
@_errors
def prune_cmd(
    model: ModelOpt = "tiny-clip",
    method: MethodOpt = "multiflow",
    sparsity: SparsityOpt = None,
    pattern: PatternOpt = "2:4",
    calibration: CalibOpt = "shapes",
    calibration_size: CalibSizeOpt = 256,
    out_dir: OutOpt = Path("vlcompress-pruned"),
    force: ForceOpt = False,
    skip_incompatible: SkipOpt = False,
):
    """Prune a model and save it (safetensors + config + prune.json)."""
    from .api import prune_and_save

    res = prune_and_save(model, out_dir, method=method, sparsity=sparsity, pattern=pattern,
                         calibration=calibration, calibration_size=calibration_size, force=force,
                         skip_incompatible=skip_incompatible, progress_factory=_progress)
    out.print(f"pruned {model} with {res['method']} {res['pattern']}: achieved "
              f"{100 * res['achieved']:.1f}% sparsity in {res['seconds']:.2f}s -> {out_dir}")


@app.command("export")
@_errors
def export_cmd(
    model: Annotated[str, typer.Argument(help="Model folder (e.g. from `vlcompress prune`) or name.")],
    out_dir: OutOpt = Path("vlcompress-onnx"),
    fp16: Annotated[bool, typer.Option("--fp16", help="Export fp16 ONNX.")] = False,
    force: ForceOpt = False,
):
    """Export each tower of a model to ONNX and validate it against PyTorch."""
    from .api import export

    res = export(model, out_dir, fp16=fp16, force=force, progress_factory=_progress)
    for tower, path in res.paths.items():
        out.print(f"{tower}: {path} (max abs diff vs PyTorch {res.max_abs_diff[tower]:.2e})")


@app.command("models")
@_errors
def models_cmd(
    methods: Annotated[bool, typer.Option("--methods", help="List pruning methods instead.")] = False,
):
    """List bundled models and architecture presets (or pruning methods)."""
    from rich.table import Table

    if methods:
        from .scoring import available_scorers, get_scorer

        t = Table("method", "calibration", "allocation", "description")
        for name in available_scorers():
            s = get_scorer(name)
            t.add_row(name, "yes" if s.needs_calibration else "no", s.allocation, s.description)
        out.print(t)
        return
    from .models import list_models

    t = Table("name", "kind", "family", "description")
    for e in list_models():
        t.add_row(e.name, e.kind, e.family, e.description)
    out.print(t)


def main() -> None:
    try:
        app()
    except SystemExit as exc:  # typer/click exit codes pass through
        sys.exit(exc.code)
