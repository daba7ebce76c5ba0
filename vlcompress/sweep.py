"""``sweep``: every method x pattern x sparsity on one model: a table and two plots.

    res = sweep("tiny-clip", methods=["magnitude", "wanda", "multiflow"],
                sparsities=[0.3, 0.5, 0.7], patterns=["unstructured", "2:4"], out="sweep")

For each cell the model is loaded fresh, pruned with :func:`vlcompress.prune` and evaluated
with :func:`vlcompress.evaluate` on the same eval data (the dense model is evaluated once).
N:M patterns imply their sparsity, so they give one cell per method whatever
``sparsities`` says. Latency does not depend on the method for a given pattern and
sparsity (the kept weights differ, the shapes and the number of zeros do not), so it is
measured once per (pattern, sparsity): the first method's pruned model is exported to ONNX
(or run in PyTorch, or built into TensorRT engines: any runtime of the registry, through
:func:`vlcompress.runtime.time_models`) and timed against the dense one, interleaved, at
each batch size, every tower of the model.

A one-tower model (e.g. a BERT text encoder) has no zero-shot or retrieval metric: it sweeps
on fidelity to the dense model (``text_cosine`` / ``image_cosine``, dense = 1.0).

The output folder (published atomically) holds ``sweep.json``, ``sweep.md`` (the table),
``accuracy_vs_sparsity.png`` (one line per method and pattern, dense as a reference line)
and ``latency_vs_batch.png`` (per tower, the in-run speedup dense p50 / pruned p50 of each
setting vs batch size, with a bootstrap interval from the paired per-iteration samples).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_dir
from .config import PruneConfig, parse_batch_sizes
from .errors import ConfigError
from .progress import NULL
from .runtime.registry import ENGINE, MODEL, LatencyConfig

FIDELITY_METRICS = ("text_cosine", "image_cosine")
PLOT_ACCURACY = "accuracy_vs_sparsity.png"
PLOT_LATENCY = "latency_vs_batch.png"


@dataclass(frozen=True)
class SweepCell:
    method: str
    pattern: str
    sparsity: float  # target (implied for N:M)

    @property
    def setting(self) -> str:
        return self.pattern if ":" in self.pattern else f"{self.pattern} {100 * self.sparsity:.0f}%"


def _split(v, cast=str) -> list:
    if v is None:
        return []
    items = v.split(",") if isinstance(v, str) else list(v)
    out = []
    for it in items:
        if isinstance(it, str):
            it = it.strip()
            if not it:
                continue
        try:
            out.append(cast(it))
        except ValueError:
            raise ConfigError(f"{it!r} is not a valid value here; allowed: a comma-separated list "
                              f"of {cast.__name__}") from None
    return list(dict.fromkeys(out))


def plan_cells(methods, sparsities, patterns) -> list[SweepCell]:
    """The cells of the sweep, validated (unknown method, bad pattern or sparsity: ConfigError)."""
    methods, patterns = _split(methods), _split(patterns)
    sparsities = _split(sparsities, float)
    if not methods:
        raise ConfigError("--methods is empty; give e.g. magnitude,wanda,multiflow")
    if not patterns:
        raise ConfigError("--patterns is empty; give e.g. unstructured,2:4")
    cells = []
    for pattern in patterns:
        for method in methods:
            pc = PruneConfig(method=method, sparsity=None, pattern=pattern)
            if pc.pattern.is_nm:
                cells.append(SweepCell(method, str(pc.pattern), pc.sparsity))
                continue
            if not sparsities:
                raise ConfigError(f"pattern {pattern!r} needs --sparsities (e.g. 0.3,0.5,0.7)")
            for s in sparsities:
                pc = PruneConfig(method=method, sparsity=s, pattern=pattern)
                cells.append(SweepCell(method, str(pc.pattern), pc.sparsity))
    return cells


def sweep(model: str = "tiny-clip", methods="magnitude,wanda,multiflow", sparsities="0.3,0.5,0.7",
          patterns="unstructured,2:4", *, out: str | Path = "vlcompress-sweep",
          calibration: str = "shapes", calibration_size: int = 256, eval_data: str | None = None,
          eval_size: int = 720, batch_sizes="1,8", runtime: str = "onnxruntime",
          device: str | None = None, precision: str | None = None, warmup: int = 5,
          iterations: int = 30, latency: bool = True,
          metric: str | None = None, force: bool = False, seed: int = 0,
          progress=NULL) -> dict:
    """Run the sweep, write the folder ``out`` and return ``sweep.json``'s content."""
    from .data import load_calibration, load_eval
    from .eval import embed_eval, fidelity, metrics_from_embeddings
    from .models import load_model
    from .pipeline import check_output_folder, export_examples
    from .prune import prune

    cells = plan_cells(methods, sparsities, patterns)
    lc = LatencyConfig(batch_sizes=parse_batch_sizes(batch_sizes), warmup=warmup,
                       iterations=iterations, runtime=runtime, device=device,
                       precision=precision) if latency else None
    if lc is not None:  # a runtime that cannot run the patterns, or not here: fail now
        rt = lc.runtime_entry
        for c in cells:
            rt.check_pattern(c.pattern)
        rt.check()
    out = check_output_folder(out, force)
    t0 = time.perf_counter()
    calib = load_calibration(calibration, n=calibration_size, batch_size=32, seed=seed)
    dense_vlm = load_model(model)
    data = load_eval(calibration if eval_data is None else eval_data, n=eval_size)
    examples = export_examples(calib)  # export and latency inputs: the user's first pairs
    dense_emb = embed_eval(dense_vlm, data)
    dense_fid = fidelity(dense_emb, dense_emb)
    dense = {**metrics_from_embeddings(dense_emb), **{k: 1.0 for k in dense_fid}}
    metric = metric or next((k for k in ("zeroshot_top1", "i2t_r1", *FIDELITY_METRICS)
                             if k in dense), "i2t_r1")
    if metric not in dense:
        raise ConfigError(f"metric {metric!r} is not measured on {data.source}; allowed: "
                          f"{', '.join(dense) or '(none: the model embeds nothing)'}")
    structures = list(dict.fromkeys((c.pattern, c.sparsity) for c in cells)) if lc else []
    rows, lat_rows = [], []
    with atomic_dir(out, overwrite=force) as tmp, \
            tempfile.TemporaryDirectory(prefix="vlc-sweep-") as td, \
            progress.task("sweep", total=len(cells) + len(structures)) as task:
        dense_art = _artefacts(lc, dense_vlm, Path(td) / "dense", "dense", examples) if lc else None
        feeds = _feeds(dense_vlm, lc, examples[0]) if lc else None
        timed = set()
        for c in cells:
            vlm = load_model(model)
            res = prune(vlm, c.method, c.sparsity, c.pattern, calibration=calib, seed=seed)
            pe = embed_eval(vlm, data)
            m = {**metrics_from_embeddings(pe), **fidelity(dense_emb, pe)}
            rows.append({"method": c.method, "pattern": c.pattern, "target": c.sparsity,
                         "setting": c.setting, "achieved": res.achieved,
                         "per_modality": res.per_modality,
                         "prune_seconds": round(res.seconds, 3), **m})
            task.advance()
            key = (c.pattern, c.sparsity)
            if lc and key not in timed:  # the first method's model stands for this structure
                timed.add(key)
                art = _artefacts(lc, vlm, Path(td) / f"pruned{len(timed)}", "pruned", examples)
                for r in _time(lc, dense_art, art, feeds, c.pattern, vlm, Path(td)):
                    lat_rows.append({"pattern": c.pattern, "target": c.sparsity,
                                     "setting": c.setting, "method": c.method, **r})
                task.advance()
        result = {"model": model, "metric": metric, "eval": {"dataset": data.source, "n": len(data)},
                  "calibration": {"source": calibration, "n": calibration_size},
                  "dense": dense, "rows": rows, "latency": lat_rows,
                  "latency_config": {"runtime": lc.runtime, "device": lc.device,
                                     "precision": lc.precision,
                                     "batch_sizes": list(lc.batch_sizes),
                                     "iterations": iterations} if lc else None,
                  "seconds_total": round(time.perf_counter() - t0, 2)}
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "sweep.md").write_text(sweep_markdown(result))
        plot_accuracy(result, tmp / PLOT_ACCURACY)
        if lat_rows:
            plot_latency(result, tmp / PLOT_LATENCY)
    return result


def _artefacts(lc: LatencyConfig, vlm, folder: Path, variant: str, examples):
    """What ``lc``'s runtime consumes of ``vlm``: the model itself, or its ONNX (fp16 for an
    fp16 ONNX runtime and for TensorRT, whose engines are then built in ``folder``)."""
    from .runtime.registry import Artefacts

    rt = lc.runtime_entry
    layers = [ly.name for ly in vlm.prunable_layers() if bool((ly.module.weight == 0).any())]
    if rt.consumes == MODEL:
        return Artefacts(variant, vlm=vlm, folder=folder, pruned_layers=layers)
    from .exporters.onnx import export_model

    example, check = examples
    res = export_model(vlm, folder, example, check,
                       fp16=rt.precision == "fp16" or rt.consumes == ENGINE)
    return Artefacts(variant, onnx=dict(res.paths), folder=folder, pruned_layers=layers)


def _time(lc: LatencyConfig, dense, pruned, feeds, pattern: str, vlm, td: Path) -> list[dict]:
    """One setting's latency rows (:func:`vlcompress.runtime.time_models`), each with its
    in-run speedup's bootstrap interval (:func:`vlcompress.gate.bootstrap_speedup`) in place
    of the raw samples."""
    from .gate import bootstrap_speedup
    from .runtime.registry import BuildOptions
    from .runtime.timing import time_models

    first = min(lc.batch_sizes)
    towers = list(dict.fromkeys(t for t, _ in feeds))
    opts = BuildOptions(threads=lc.threads, batch_sizes=lc.batch_sizes, pattern=pattern,
                        seq_len=getattr(vlm, "text_max_length", None),
                        check_feeds={t: feeds[(t, first)] for t in towers},
                        timing_cache=td / "timing.cache")
    rows = time_models(lc.runtime_entry, dense, pruned, feeds, lc, towers=towers, options=opts,
                       check=False)
    for i, r in enumerate(rows):
        d, p = r.pop("dense_samples_ms"), r.pop("pruned_samples_ms")
        _, lo, hi = bootstrap_speedup(d, p, quantile=0.5, seed=i)
        r["speedup_ci"] = [lo, hi]
    return rows


def _feeds(vlm, lc: LatencyConfig, example):
    from .runtime.latency import make_feeds

    return make_feeds(vlm, [t for t in vlm.towers if lc.towers is None or t in lc.towers],
                      lc.batch_sizes, example)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _fmt(key: str, x: float) -> str:
    return f"{x:.3f}" if key in FIDELITY_METRICS else _pct(x)


def sweep_markdown(res: dict) -> str:
    """The accuracy table (rows: method x setting) and, when measured, the latency table."""
    from .report import METRIC_NAMES

    keys = [k for k in ("zeroshot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5",
                        *FIDELITY_METRICS) if k in res["dense"]]
    d = res["dense"]
    lines = [f"# vlcompress sweep: {res['model']}", "",
             f"Accuracy (%) on {res['eval']['dataset']} ({res['eval']['n']} pairs); calibration "
             f"{res['calibration']['source']} ({res['calibration']['n']} pairs).", "",
             "| method | setting | achieved | " + " | ".join(METRIC_NAMES.get(k, k) for k in keys)
             + " | prune s |", "|---|---|---:|" + "---:|" * len(keys) + "---:|",
             "| dense | – | 0.0% | " + " | ".join(_fmt(k, d[k]) for k in keys) + " | – |"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['setting']} | {100 * r['achieved']:.1f}% | "
                     + " | ".join(_fmt(k, r[k]) for k in keys) + f" | {r['prune_seconds']:.2f} |")
    lines.append("")
    if res.get("latency"):
        lc = res["latency_config"]
        lines += [f"Latency p50 (ms), {lc['runtime']} on {lc['device']} "
                  f"({lc.get('precision') or '?'}), dense and pruned interleaved "
                  f"({lc['iterations']} iterations); speedup = dense p50 / pruned p50 of the "
                  "same row, 95% bootstrap interval.", "",
                  "| setting | tower | batch | provider | dense | pruned | speedup | interval |",
                  "|---|---|---:|---|---:|---:|---:|---|"]
        for r in res["latency"]:
            ci = r.get("speedup_ci")
            lines.append(f"| {r['setting']} | {r['tower']} | {r['batch']} | "
                         f"{r.get('provider', r['runtime'])} | {r['dense_ms']['p50']:.3f} | "
                         f"{r['pruned_ms']['p50']:.3f} | {r['speedup']:.2f}x | "
                         + (f"{ci[0]:.2f}-{ci[1]:.2f}x |" if ci else "– |"))
        lines.append("")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(res: dict, path: Path) -> Path:
    """Accuracy vs achieved sparsity: one line per (method, unstructured pattern), N:M cells as
    markers, the dense model as a dashed line."""
    from .report import METRIC_NAMES

    plt = _pyplot()
    metric = res["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.axhline(100 * res["dense"][metric], color="black", ls="--", lw=1, label="dense")
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    patterns = list(dict.fromkeys(r["pattern"] for r in res["rows"]))
    for m in methods:
        for j, p in enumerate(patterns):
            pts = sorted((r["achieved"], r[metric]) for r in res["rows"]
                         if r["method"] == m and r["pattern"] == p)
            if not pts:
                continue
            xs, ys = [100 * x for x, _ in pts], [100 * y for _, y in pts]
            ax.plot(xs, ys, marker=markers[j % len(markers)], color=colors[m],
                    ls="-" if len(pts) > 1 else "none", label=f"{m} ({p})")
    ax.set_xlabel("achieved sparsity (%)")
    ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} (%)")
    ax.set_title(f"{res['model']}: accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_latency(res: dict, path: Path) -> Path:
    """In-run speedup (dense p50 / pruned p50 of the same row: each setting against the dense
    model timed beside it) vs batch size, one panel per tower, one line per setting, with the
    bootstrap interval of each point as an error bar; 1x (no gain) as a dashed line."""
    plt = _pyplot()
    rows = res["latency"]
    towers = list(dict.fromkeys(r["tower"] for r in rows))
    fig, axes = plt.subplots(1, len(towers), figsize=(5.2 * len(towers), 4.0), dpi=110, squeeze=False)
    for ax, tower in zip(axes[0], towers, strict=True):
        tr = [r for r in rows if r["tower"] == tower]
        settings = list(dict.fromkeys(r["setting"] for r in tr))
        bs = sorted({r["batch"] for r in tr})
        ax.axhline(1.0, color="black", ls="--", lw=1, label="dense (1x)")
        for i, s in enumerate(settings):
            xs, ys, ci = speedup_series(tr, s)
            err = [[max(0.0, y - lo) for y, (lo, _) in zip(ys, ci, strict=True)],
                   [max(0.0, hi - y) for y, (_, hi) in zip(ys, ci, strict=True)]]
            ax.errorbar(xs, ys, yerr=err, marker="s", color=f"C{i}", capsize=3,
                        label=f"pruned {s}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup (dense p50 / pruned p50)")
        ax.set_title(f"{tower} tower")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    lc = res.get("latency_config") or {}
    fig.suptitle(f"{res['model']}: in-run speedup vs batch size ({lc.get('runtime')}, "
                 f"{lc.get('device')}, {lc.get('precision')})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def speedup_series(rows: list[dict], setting: str):
    """``(batches, speedups, intervals)`` of one setting's rows of one tower, by batch: each
    speedup is the row's own dense p50 / pruned p50 (what :func:`plot_latency` draws)."""
    pts = sorted((r["batch"], r["speedup"], tuple(r.get("speedup_ci") or (r["speedup"],) * 2))
                 for r in rows if r["setting"] == setting)
    return [b for b, _, _ in pts], [v for _, v, _ in pts], [c for _, _, c in pts]


__all__ = ["sweep", "plan_cells", "SweepCell", "sweep_markdown", "plot_accuracy", "plot_latency"]
