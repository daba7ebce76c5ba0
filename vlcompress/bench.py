"""``benchmark``: re-measure a ``prune-export`` output folder, optionally gate it on a baseline.

    res = benchmark("build/run", baseline="baseline/report.json")
    res.report            # a fresh report (same schema as report.json, plus a "bench" section)
    res.gate.exit_code    # 0 all thresholds hold, 1 some broken (None gate: no baseline)

What is re-measured, from the folder alone:

- accuracy of dense and pruned on the eval data of the run (``config.eval_data`` and
  ``eval_size`` of its report unless overridden): the dense model is loaded by the name in
  the report's ``model`` section (its ``source`` as a fallback), the pruned one from
  ``pruned/model``;
- latency of dense vs pruned on the runtime the run was made with (its latency rows, else its
  config: ``(runtime, device, precision)`` of :mod:`vlcompress.runtime.registry`) or the one
  given (``runtime=``/``device=``/``precision=``, checked against the registry): the ONNX
  files (``export.paths``), the TensorRT engines ``dense|pruned/<tower>.engine`` (rebuilt
  from the fp16 ONNX when absent) or the two PyTorch models, every tower the run exported,
  interleaved in this process, at the batch sizes of the baseline (else of the run), with
  raw per-iteration samples kept for the gate (:func:`vlcompress.runtime.time_models`).

A runtime that cannot run here (no GPU, no TensorRT) stops the bench with one sentence before
anything is measured.

The baseline is read and checked before anything is measured, so unusable input fails in
well under a second (:class:`~vlcompress.errors.BaselineError`, exit code 2).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_write_text
from .config import check_positive_int, parse_batch_sizes
from .errors import ConfigError, ModelError
from .gate import GateConfig, GateResult, check_compatible, compare_reports, load_report
from .progress import NULL
from .runtime.registry import ONNX, LatencyConfig, canonical, get_runtime

REPORT_NAME = "bench-report.json"


@dataclass(frozen=True)
class BenchConfig:
    """Options of ``vlcompress bench``; ``None`` means "as in the run (or the baseline)"."""

    run_dir: str = "vlcompress-out"
    baseline: str | None = None
    report: str | None = None  # default: RUN_DIR/bench-report.json (+ .md beside it)
    runtime: str | None = None  # a registry name (onnxruntime, torch, torch-2:4, trt, ...)
    device: str | None = None
    precision: str | None = None  # fp32 | fp16
    batch_sizes: tuple[int, ...] | str | None = None
    warmup: int = 10
    iterations: int = 100
    threads: int | None = None
    eval_data: str | None = None
    eval_size: int | None = None
    accuracy: bool = True
    latency: bool = True
    seed: int = 0
    cuda_graphs: bool = False  # torch on CUDA: time under CUDA-graph replay
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self):
        if self.batch_sizes is not None:
            object.__setattr__(self, "batch_sizes", parse_batch_sizes(self.batch_sizes))
        if self.runtime is not None or self.device is not None or self.precision is not None:
            get_runtime(self.runtime or "onnxruntime", self.device, self.precision)  # ConfigError
        if self.iterations < 1 or self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup}, iterations={self.iterations}; need "
                              "warmup >= 0, iterations >= 1")
        if self.threads is not None:
            check_positive_int(self.threads, "--threads")
        if self.eval_size is not None and self.eval_size < 1:
            raise ConfigError(f"eval size {self.eval_size!r} is not valid; allowed: a positive integer")
        if not (self.accuracy or self.latency):
            raise ConfigError("nothing to measure: both accuracy and latency are switched off")

    @property
    def report_path(self) -> Path:
        return Path(self.report) if self.report else Path(self.run_dir) / REPORT_NAME


@dataclass
class BenchResult:
    report: dict
    report_path: Path
    markdown_path: Path
    gate: GateResult | None = None

    @property
    def exit_code(self) -> int:
        return self.gate.exit_code if self.gate else 0

    def summary_markdown(self) -> str:
        """The gate section (when gated), then the fresh report's tables."""
        from .report import to_markdown

        parts = [self.gate.markdown()] if self.gate else []
        return "\n".join(parts + [to_markdown(self.report)])


def read_run(run_dir: str | Path) -> dict:
    """The ``report.json`` of a ``prune-export`` folder, checked for what bench needs."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ConfigError(f"run folder {str(d)!r} does not exist; give a `vlcompress "
                          "prune-export --out` folder")
    rp = d / "report.json"
    if not rp.is_file():
        raise ConfigError(f"run folder {str(d)!r} has no report.json (not a prune-export folder)")
    try:
        run = json.loads(rp.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{str(rp)!r} is not valid JSON: {exc}") from None
    for key in ("model", "prune", "export"):
        if not isinstance(run.get(key), dict):
            raise ConfigError(f"{str(rp)!r} has no {key!r} section")
    return run


def _load_dense(model: dict):
    from .models import load_model

    tried = []
    for cand in (model.get("name"), model.get("source")):
        if not cand or cand in tried or str(cand).startswith("preset:"):
            continue
        tried.append(cand)
        try:
            return load_model(cand)
        except ModelError:
            continue
    if str(model.get("source", "")).startswith("preset:"):
        return load_model(model["name"])
    raise ModelError(f"cannot load the dense model of the run (tried {', '.join(map(repr, tried))} "
                     "from report.json's 'model' section)")


def export_precision(run: dict, variant: str = "pruned") -> str:
    """``fp16``/``fp32`` of a run's ONNX files (``export.precision``, else the old ``fp16``)."""
    ex = run.get("export") or {}
    prec = (ex.get("precision") or {}).get(variant)
    return prec or ("fp16" if ex.get("fp16") else "fp32")


def run_runtime_key(run: dict) -> tuple[str, str | None, str | None]:
    """The ``(runtime, device, precision)`` a run was timed on: its first latency row, else its
    config (``engine``/``device``/``precision``); a missing precision of an ONNX runtime is the
    precision of the run's ONNX files."""
    rows = run.get("latency") or []
    rc = run.get("config") or {}
    if rows:
        name, device, prec = rows[0]["runtime"], rows[0].get("device"), rows[0].get("precision")
    else:
        name, device, prec = rc.get("engine", "onnxruntime"), rc.get("device"), rc.get("precision")
    name = canonical(name)
    if prec is None and get_runtime(name, device).consumes == ONNX:
        prec = export_precision(run)
    return name, device, prec


def _resolve(name: str, device: str | None, precision: str | None, run: dict):
    """An override: the run's ONNX precision when the user gave none and the runtime has it."""
    if precision is None and get_runtime(name, device).consumes == ONNX:
        try:
            return get_runtime(name, device, export_precision(run))
        except ConfigError:
            pass
    return get_runtime(name, device, precision)


def _plan(cfg: BenchConfig, run: dict, baseline: dict | None) -> LatencyConfig:
    rc = run.get("config") or {}
    base_rows = (baseline or {}).get("latency") or []
    if cfg.runtime is not None or cfg.device is not None or cfg.precision is not None:
        name = cfg.runtime or run_runtime_key(run)[0]
        rt = _resolve(name, cfg.device, cfg.precision, run)
    elif base_rows:
        b = base_rows[0]
        rt = _resolve(canonical(b["runtime"]), b.get("device"), b.get("precision"), run)
    else:
        rt = get_runtime(*run_runtime_key(run))
    rt.check_pattern((run.get("prune") or {}).get("pattern"))
    if cfg.threads is not None and rt.name not in ("onnxruntime", "onnxruntime-trt"):
        raise ConfigError(f"--threads {cfg.threads} sets onnxruntime's intra-op threads; the "
                          f"runtime here is {rt.name}; allowed: --threads with onnxruntime")
    if cfg.batch_sizes:
        bs = cfg.batch_sizes
    elif base_rows:
        bs = tuple(sorted({int(r["batch"]) for r in base_rows}))
    else:
        bs = parse_batch_sizes(rc.get("batch_sizes", (1, 8)))
    paths = (run["export"].get("paths") or {}).get("pruned") or {}
    towers = tuple(t for t in paths if t != "model") or None
    return LatencyConfig(batch_sizes=bs, warmup=cfg.warmup, iterations=cfg.iterations,
                         runtime=rt.name, device=rt.device, precision=rt.precision,
                         threads=cfg.threads, towers=towers, cuda_graphs=cfg.cuda_graphs)


def _check_gated_metrics(metrics, baseline: dict) -> None:
    """``--metrics`` names metrics the baseline holds: checked before the model is loaded, so
    a typo is one line, not a refusal after the whole measurement."""
    if not metrics:
        return
    have = ((baseline.get("accuracy") or {}).get("metrics") or {})
    unknown = [m for m in metrics if m not in have]
    if unknown:
        raise ConfigError(f"--metrics {','.join(unknown)}: not in the baseline's accuracy metrics; "
                          f"allowed: {', '.join(have) or 'none (the baseline measured no accuracy)'}")


def benchmark(config: BenchConfig | str | Path | None = None, progress=NULL, **kw) -> BenchResult:
    """Re-measure accuracy and latency of a run folder; gate on ``baseline`` when given.

    ``benchmark("run")`` or ``benchmark(run_dir="run", baseline="old.json", iterations=200)``
    or ``benchmark(BenchConfig(...))``. Writes the report JSON and Markdown; returns them
    with the gate result.
    """
    from .envinfo import env_info
    from .report import build_report, to_markdown

    if isinstance(config, (str, Path)):
        cfg = BenchConfig(run_dir=str(config), **kw)
    else:
        cfg = config or BenchConfig(**kw)
    t0 = time.perf_counter()
    baseline = None
    if cfg.baseline:
        baseline = load_report(cfg.baseline, "baseline")
        check_compatible(baseline, "baseline")
    run_dir = Path(cfg.run_dir)
    run = read_run(run_dir)
    rp = cfg.report_path
    if rp.is_dir():
        raise ConfigError(f"--report {str(rp)!r} is a folder; allowed: a .json file path")
    generative = bool(run["model"].get("generative"))  # generation metrics, gen_latency rows
    if generative and cfg.gate.metrics:  # a caption metric of questions-only data: refused now
        from .eval.generative import check_caption_metric

        for m in cfg.gate.metrics:
            check_caption_metric(m, (run.get("accuracy") or {}).get("dataset", ""))
    if baseline is not None:
        _check_gated_metrics(cfg.gate.metrics, baseline)
    lc = _plan(cfg, run, baseline) if cfg.latency and not generative else None
    if lc is not None:  # no GPU, no TensorRT: one sentence, before anything is measured
        lc.runtime_entry.check()
    glc = _plan_generative(cfg, run, baseline) if cfg.latency and generative else None
    rc = run.get("config") or {}

    from .models import load_model

    model_dir = run_dir / ((run["export"].get("paths") or {}).get("model") or "pruned/model")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"run folder {str(run_dir)!r} has no saved pruned model at {str(model_dir)!r}")
    pruned = load_model(model_dir)
    dense = None
    accuracy = None
    if cfg.accuracy and run.get("accuracy") is not None and generative:
        accuracy, dense = _generative_accuracy(cfg, run, pruned, baseline, progress)
    elif cfg.accuracy and run.get("accuracy") is not None:
        from .data import load_eval

        data = load_eval(cfg.eval_data or rc.get("eval_data", "shapes"),
                         n=cfg.eval_size or rc.get("eval_size", 720))
        _precheck(baseline, data, lc)
        accuracy, dense = _accuracy(data, run, pruned, progress)
    else:
        _precheck(baseline, None, lc)
    latency = []
    if lc is not None:
        latency = _latency(lc, run_dir, run, pruned, dense, cfg.seed, progress)
    elif glc is not None:
        latency = _generative_latency(glc, cfg, run_dir, run, pruned, dense, progress)
        lc = glc
    report = build_report(
        model=run["model"], prune=run["prune"], export=run["export"], accuracy=accuracy,
        latency=latency, env=env_info(),
        config={"run": rc, "latency": asdict(lc) if lc else None,
                "seconds_total": round(time.perf_counter() - t0, 2)},
    )
    report["bench"] = {"run_dir": str(run_dir), "run_created": run.get("created"),
                       "baseline": str(cfg.baseline) if cfg.baseline else None}
    gate = None
    if baseline is not None:
        gate = compare_reports(report, baseline, cfg.gate, baseline_name=str(cfg.baseline),
                               latency=cfg.latency, accuracy=cfg.accuracy)
        report["gate"] = gate.to_dict()
    md = to_markdown(report) + ("\n" + gate.markdown() if gate else "")
    atomic_write_text(rp, json.dumps(report, indent=2, default=str) + "\n")
    mp = rp.with_suffix(".md")
    atomic_write_text(mp, md)
    return BenchResult(report, rp, mp, gate)


def _precheck(baseline: dict | None, data, lc: LatencyConfig | None) -> None:
    """Fail before measuring when the baseline cannot be compared with what will be measured."""
    from .errors import BaselineError

    if baseline is None:
        return
    ba = baseline.get("accuracy")
    if data is not None and ba:
        if ba.get("dataset") != data.source:
            raise BaselineError(f"field 'accuracy.dataset' differs: baseline {ba.get('dataset')!r}, "
                                f"this run evaluates on {data.source!r} (--eval-data)")
        if "n" in ba and ba["n"] != len(data):
            raise BaselineError(f"field 'accuracy.n' differs: baseline {ba['n']}, this run "
                                f"{len(data)} evaluation pairs (--eval-size)")
    if lc is not None:
        for i, row in enumerate(baseline.get("latency") or []):
            cell = (canonical(row["runtime"]), row["device"], row["tower"], int(row["batch"]))
            if (cell[0], cell[1]) != (lc.runtime, lc.device) \
                    or (lc.towers is not None and cell[2] not in lc.towers) \
                    or cell[3] not in lc.batch_sizes:
                raise BaselineError(
                    f"baseline field 'latency[{i}]' is {cell[0]}/{cell[1]} {cell[2]}@{cell[3]}, "
                    f"which this run does not measure ({lc.runtime}/{lc.device}, batch sizes "
                    f"{','.join(map(str, lc.batch_sizes))}); match --runtime and --batch-sizes")


def _plan_generative(cfg: BenchConfig, run: dict, baseline: dict | None) -> LatencyConfig:
    """How a generative run is re-timed: ONNX Runtime CPU (every exported variant) with PyTorch
    eager beside it, vision / prefill / decode, at ``--batch-sizes``, else the baseline's, else
    the run's; what cannot apply is refused, and the baseline's cells are checked, before
    anything is measured."""
    from .errors import BaselineError
    from .runtime.gen_latency import PARTS

    given = [f"--{k.replace('_', '-')} {v}" for k, v in (
        ("runtime", cfg.runtime), ("device", cfg.device), ("precision", cfg.precision),
        ("cuda_graphs", cfg.cuda_graphs or None)) if v is not None]
    if given:
        raise ConfigError(f"{given[0]} does not apply to a generative run: its exported graphs "
                          "are timed on onnxruntime (CPU) with PyTorch eager beside it; allowed: "
                          "--batch-sizes, --iterations, --warmup, --threads")
    base_rows = (baseline or {}).get("latency") or []
    if cfg.batch_sizes:
        bs = cfg.batch_sizes
    elif base_rows:
        bs = tuple(sorted({int(r["batch"]) for r in base_rows}))
    else:
        bs = parse_batch_sizes((run.get("config") or {}).get("batch_sizes", (1, 8)))
    for i, row in enumerate(base_rows):
        cell = (canonical(row["runtime"]), row["device"], row["tower"], int(row["batch"]))
        if cell[0] not in ("onnxruntime", "torch") or cell[1] != "cpu" or cell[2] not in PARTS \
                or cell[3] not in bs:
            raise BaselineError(
                f"baseline field 'latency[{i}]' is {cell[0]}/{cell[1]} {cell[2]}@{cell[3]}, "
                "which a generative run does not measure (onnxruntime and torch on cpu: "
                f"{', '.join(PARTS)}, batch sizes {','.join(map(str, bs))}); match --batch-sizes")
    return LatencyConfig(batch_sizes=bs, warmup=cfg.warmup, iterations=cfg.iterations,
                         threads=cfg.threads, towers=PARTS)


def _generative_latency(lc: LatencyConfig, cfg: BenchConfig, run_dir: Path, run: dict, pruned,
                        dense, progress) -> list[dict]:
    """Vision / prefill / decode of every exported variant of the run folder on ONNX Runtime
    and of the dense and pruned models in PyTorch eager, interleaved
    (:func:`vlcompress.runtime.gen_latency.generative_latency`), on the first prompt of the
    run's evaluation data (or ``--eval-data``), as prune-export timed them."""
    from .data import generative_eval_data
    from .runtime.gen_latency import generative_latency, latency_inputs, variant_folders

    rc = run.get("config") or {}
    names = tuple((run["export"].get("generative") or {}) or ("dense", "pruned"))
    for n in names:
        if not (run_dir / n / "generation.json").is_file():
            raise ConfigError(f"run folder {str(run_dir)!r} lacks the {n} generative export "
                              f"({n}/generation.json)")
    evals = generative_eval_data(cfg.eval_data or rc.get("eval_data", "shapes"), n=1,
                                 questions=getattr(pruned, "answers_questions", True))
    inputs = latency_inputs(pruned, evals, lc.batch_sizes)
    dense = dense or _load_dense(run["model"])
    return generative_latency(variant_folders(run_dir, names), dense, pruned, inputs, lc,
                              progress=progress)


def _generative_accuracy(cfg: BenchConfig, run: dict, pruned, baseline, progress):
    """Generation metrics and fidelity of a generative run, dense vs pruned, on the run's
    evaluation data (or ``--eval-data``), checked against the baseline's dataset first."""
    from .data import generative_eval_data
    from .errors import BaselineError
    from .eval.generative import dataset_name, generative_accuracy, run_all

    rc = run.get("config") or {}
    preset = str(run["model"].get("source", "")).startswith("preset:")
    n = cfg.eval_size or rc.get("eval_size", 720)
    evals = generative_eval_data(cfg.eval_data or rc.get("eval_data", "shapes"),
                                 n=min(32, n) if preset else n,
                                 questions=getattr(pruned, "answers_questions", True))
    name = dataset_name(evals, random_weights=preset)
    ba = (baseline or {}).get("accuracy")
    if ba and ba.get("dataset") != name:
        raise BaselineError(f"field 'accuracy.dataset' differs: baseline {ba.get('dataset')!r}, "
                            f"this run evaluates on {name!r} (--eval-data)")
    mnt = int(rc.get("max_new_tokens", 24))
    dense = _load_dense(run["model"])
    acc = generative_accuracy(evals, run_all(dense, evals, max_new_tokens=mnt, progress=progress),
                              run_all(pruned, evals, max_new_tokens=mnt, progress=progress),
                              random_weights=preset)
    return acc, dense


def _accuracy(data, run: dict, pruned, progress):
    from .eval import embed_eval, fidelity, metrics_from_embeddings
    from .report import accuracy_section

    dense = _load_dense(run["model"])
    de = embed_eval(dense, data, progress)
    pe = embed_eval(pruned, data, progress)
    acc = accuracy_section(data.source, metrics_from_embeddings(de), metrics_from_embeddings(pe),
                           fidelity(de, pe))
    acc["n"] = len(data)
    return acc, dense


def run_artefacts(run_dir: Path, run: dict, variant: str, vlm=None, *, need_onnx: bool):
    """One variant of a run folder as :class:`~vlcompress.runtime.registry.Artefacts`: its
    ONNX files (``export.paths``), its engines ``<variant>/<tower>.engine`` where present."""
    from .runtime.registry import Artefacts

    files = ((run["export"].get("paths") or {}).get(variant)) or {}
    onnx = {t: run_dir / f for t, f in files.items()}
    if need_onnx:
        if not onnx:
            raise ConfigError(f"report.json of {str(run_dir)!r} lists no {variant} ONNX files "
                              f"(field 'export.paths.{variant}')")
        for f in onnx.values():
            if not f.is_file():
                raise ConfigError(f"run folder {str(run_dir)!r} lacks {variant} ONNX file {str(f)!r}")
    folder = run_dir / variant
    engines = {p.name[: -len(".engine")]: p for p in sorted(folder.glob("*.engine"))} \
        if folder.is_dir() else {}
    layers = None
    if vlm is not None and variant == "pruned":
        layers = [ly.name for ly in vlm.prunable_layers() if bool((ly.module.weight == 0).any())]
    return Artefacts(variant, vlm=vlm, onnx=onnx, engines=engines, folder=folder,
                     pruned_layers=layers)


def _latency(lc: LatencyConfig, run_dir: Path, run: dict, pruned, dense, seed: int, progress):
    from .data import load_calibration
    from .pipeline import export_examples
    from .runtime.latency import make_feeds
    from .runtime.registry import MODEL, BuildOptions
    from .runtime.timing import time_models

    rt = lc.runtime_entry
    towers = [t for t in (lc.towers or pruned.towers) if t in pruned.towers]
    # The same example pairs as prune-export's latency inputs: the run's first calibration pairs.
    rc = run.get("config") or {}
    example = export_examples(load_calibration(rc.get("calibration", "shapes"), n=5,
                                               batch_size=5, seed=int(rc.get("seed", 0))))[0]
    feeds = make_feeds(pruned, towers, lc.batch_sizes, example)
    if rt.consumes == MODEL:
        dense = dense or _load_dense(run["model"])
    need_onnx = rt.consumes == ONNX
    d = run_artefacts(run_dir, run, "dense", dense if rt.consumes == MODEL else None,
                      need_onnx=need_onnx)
    p = run_artefacts(run_dir, run, "pruned", pruned, need_onnx=need_onnx)
    if rt.consumes != MODEL:
        d.vlm = p.vlm = None
    first = min(lc.batch_sizes)
    opts = BuildOptions(threads=lc.threads, batch_sizes=lc.batch_sizes,
                        pattern=(run.get("prune") or {}).get("pattern"),
                        seq_len=getattr(pruned, "text_max_length", None),
                        check_feeds={t: feeds[(t, first)] for t in towers},
                        timing_cache=run_dir / "timing.cache", cuda_graphs=lc.cuda_graphs)
    return time_models(rt, d, p, feeds, lc, towers=towers, options=opts, progress=progress)
