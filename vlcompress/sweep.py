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

``quantize`` (int8 | fp16, :mod:`vlcompress.exporters.quantize`) adds the quantized variants:
each cell's pruned model is exported, quantized (static int8 calibrated on the run's
calibration pairs, or dynamic) and evaluated from the quantized ONNX on ONNX Runtime CPU (a
``<setting> + int8`` row beside the float one), the dense model likewise once (``dense + int8``);
each timed structure is timed as four variants interleaved in one run (dense, dense quantized,
pruned, pruned quantized; :func:`vlcompress.runtime.timing.time_variants`), so the table says
what pruning buys over quantization alone (``over dense int8``).

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
from .config import PruneConfig, check_positive_int, parse_batch_sizes
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


def parse_sweep_method_options(value, methods) -> dict[str, dict]:
    """``--method-option METHOD.KEY=VALUE`` (repeatable; or ``{method: {key: value}}``) ->
    ``{method: {key: value}}``, each method one of ``methods`` (the options themselves are
    cast and checked by the method's declaration, in :func:`plan_cells`)."""
    from .config import parse_method_options

    methods = _split(methods)
    if value is None:
        return {}
    if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
        pairs = [(m, k, v) for m, opts in value.items() for k, v in opts.items()]
    else:
        pairs = []
        for key, v in parse_method_options(value).items():
            method, dot, k = str(key).partition(".")
            if not dot or not k:
                raise ConfigError(f"sweep method option {key}={v} names no method; allowed: "
                                  f"METHOD.KEY=VALUE with METHOD one of {', '.join(methods)}")
            pairs.append((method, k, v))
    out: dict[str, dict] = {}
    for method, k, v in pairs:
        if method not in methods:
            raise ConfigError(f"sweep method option {method}.{k}: method {method!r} is not in "
                              f"--methods; allowed: {', '.join(methods)}")
        out.setdefault(method, {})[k] = v
    return out


def plan_cells(methods, sparsities, patterns, method_options=None) -> list[SweepCell]:
    """The cells of the sweep, validated (unknown method, bad pattern or sparsity, a method
    option the method does not have: ConfigError). ``method_options``: ``{method: {k: v}}``."""
    opts = method_options or {}
    methods, patterns = _split(methods), _split(patterns)
    sparsities = _split(sparsities, float)
    if not methods:
        raise ConfigError("--methods is empty; give e.g. magnitude,wanda,multiflow")
    if not patterns:
        raise ConfigError("--patterns is empty; give e.g. unstructured,2:4")
    cells = []
    for pattern in patterns:
        for method in methods:
            pc = PruneConfig(method=method, sparsity=None, pattern=pattern,
                             method_options=opts.get(method))
            if pc.pattern.is_nm:
                cells.append(SweepCell(method, str(pc.pattern), pc.sparsity))
                continue
            if not sparsities:
                raise ConfigError(f"pattern {pattern!r} needs --sparsities (e.g. 0.3,0.5,0.7)")
            for s in sparsities:
                pc = PruneConfig(method=method, sparsity=s, pattern=pattern,
                                 method_options=opts.get(method))
                cells.append(SweepCell(method, str(pc.pattern), pc.sparsity))
    return cells


def sweep(model: str = "tiny-clip", methods="magnitude,wanda,multiflow", sparsities="0.3,0.5,0.7",
          patterns="unstructured,2:4", *, out: str | Path = "vlcompress-sweep",
          calibration: str = "shapes", calibration_size: int = 256, eval_data: str | None = None,
          eval_size: int = 720, batch_sizes="1,8", runtime: str = "onnxruntime",
          device: str | None = None, precision: str | None = None, warmup: int = 5,
          iterations: int = 30, latency: bool = True,
          metric: str | None = None, force: bool = False, seed: int = 0,
          progress=NULL, quantize: str = "none", quantize_method: str = "static",
          method_options=None) -> dict:
    """Run the sweep, write the folder ``out`` and return ``sweep.json``'s content.

    ``method_options``: per-method options, ``["upop.search_steps=60", ...]`` (the CLI's
    repeatable ``--method-option METHOD.KEY=VALUE``) or ``{"upop": {"search_steps": 60}}``;
    each cell of that method is pruned with them and its row records them."""
    from .data import load_calibration, load_eval
    from .eval import embed_eval, fidelity, metrics_from_embeddings
    from .models import load_model
    from .onnx_eval import onnx_vlm
    from .pipeline import check_output_folder, export_examples
    from .prune import prune

    check_positive_int(eval_size, "--eval-size")
    mopts = parse_sweep_method_options(method_options, methods)
    cells = plan_cells(methods, sparsities, patterns, mopts)
    lc = LatencyConfig(batch_sizes=parse_batch_sizes(batch_sizes), warmup=warmup,
                       iterations=iterations, runtime=runtime, device=device,
                       precision=precision) if latency else None
    if lc is not None:  # a runtime that cannot run the patterns, or not here: fail now
        rt = lc.runtime_entry
        for c in cells:
            rt.check_pattern(c.pattern)
        rt.check()
    q = check_sweep_quantize(quantize, quantize_method, lc)
    out = check_output_folder(out, force)
    t0 = time.perf_counter()
    calib = load_calibration(calibration, n=calibration_size, batch_size=32, seed=seed)
    dense_vlm = load_model(model)
    data = load_eval(calibration if eval_data is None else eval_data, n=eval_size)
    examples = export_examples(calib)  # export and latency inputs: the user's first pairs
    dense_emb = embed_eval(dense_vlm, data)
    dense_fid = fidelity(dense_emb, dense_emb)
    dense = {**metrics_from_embeddings(dense_emb), **{k: 1.0 for k in dense_fid}}
    if q != "none" and onnx_vlm(dense_vlm, {}) is None:
        raise ConfigError(f"--quantize {q}: the quantized files are evaluated on ONNX Runtime "
                          f"from the vision and text towers; {dense_vlm.family} needs more "
                          "(its ITM fusion tower); allowed: --quantize none")
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
        dense_q = None
        if q != "none":
            dense_q = _quantized(dense_vlm, dense_art, calib, q, quantize_method, examples,
                                 Path(td) / "dense")
            dense_q["metrics"] = _quantized_metrics(dense_vlm, dense_q["onnx"], data, dense_emb)
        timed = set()
        for c in cells:
            vlm = load_model(model)
            res = prune(vlm, c.method, c.sparsity, c.pattern, calibration=calib, seed=seed,
                        method_options=mopts.get(c.method))
            pe = embed_eval(vlm, data)
            m = {**metrics_from_embeddings(pe), **fidelity(dense_emb, pe)}
            row = {"method": c.method, "pattern": c.pattern, "target": c.sparsity,
                   "setting": c.setting, "achieved": res.achieved,
                   "per_modality": res.per_modality,
                   "prune_seconds": round(res.seconds, 3), **m}
            if c.method in mopts:
                row["method_options"] = res.details.get("method_options")
            rows.append({**row, "quantize": "none"} if q != "none" else row)
            key = (c.pattern, c.sparsity)
            first = lc is not None and key not in timed  # its model stands for this structure
            art = (_artefacts(lc, vlm, Path(td) / f"pruned{len(timed) + 1}", "pruned", examples)
                   if first else None)
            pq = None
            if q != "none":
                pq = _quantized(vlm, art, calib, q, quantize_method, examples,
                                Path(td) / f"cell{len(rows)}")
                rows.append({**row, "setting": f"{c.setting} + {q}", "quantize": q,
                             **_quantized_metrics(vlm, pq["onnx"], data, dense_emb)})
            task.advance()
            if first:
                timed.add(key)
                for r in _time(lc, dense_art, art, feeds, c.pattern, vlm, Path(td),
                               quantized=(q, dense_q, pq) if q != "none" else None,
                               dense_q_row=len(timed) == 1):
                    sfx = r.pop("setting_suffix", "")
                    lat_rows.append({"pattern": c.pattern, "target": c.sparsity,
                                     "setting": c.setting + sfx, "method": c.method, **r})
                task.advance()
        result = {"model": model, "metric": metric, "method_options": mopts,
                  "eval": {"dataset": data.source, "n": len(data)},
                  "calibration": {"source": calibration, "n": calibration_size},
                  "dense": dense, "rows": rows, "latency": lat_rows,
                  "quantize": {"quantize": q, "method": quantize_method,
                               "dense": dense_q["metrics"], "measured_on": "ONNX Runtime CPU",
                               "files": dense_q["info"]} if q != "none" else None,
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


def check_sweep_quantize(quantize, method: str, lc: LatencyConfig | None) -> str:
    """``--quantize`` for a sweep: the canonical value, or one ConfigError line. The quantized
    files are evaluated on ONNX Runtime CPU (int8, fp16; fp8 needs TensorRT) and, with latency,
    timed on the sweep's runtime, which must run them from an fp32 export."""
    from .exporters.quantize import check_quantize, check_quantize_runtime

    q = check_quantize(quantize, method)
    if q == "fp8":
        raise ConfigError("--quantize fp8 cannot be evaluated by a sweep (ONNX Runtime CPU runs "
                          "no fp8); allowed: none, int8, fp16")
    if q != "none" and lc is not None:
        check_quantize_runtime(q, lc.runtime_entry, method)
        if lc.runtime_entry.name == "tensorrt":  # QDQ engines: prune-export only, for now
            raise ConfigError(f"--quantize {q} with --engine trt runs in prune-export, not in a "
                              "sweep; allowed in a sweep: --engine onnxruntime (or no --quantize)")
        if lc.runtime_entry.precision != "fp32":
            raise ConfigError(f"--quantize {q} quantizes the fp32 export; drop --fp16 (the sweep "
                              "times fp32 and quantized variants side by side)")
    return q


def _quantized(vlm, art, calib, q: str, method: str, examples, folder: Path) -> dict:
    """Quantize ``vlm``'s fp32 ONNX towers (``art``'s when it holds them, else a fresh export
    into ``folder``) into ``folder/v_<q>/``: ``{"onnx": tower -> path, "info": ...}``."""
    from .exporters.onnx import export_model
    from .quantized_variants import quantize_variants

    paths = dict(art.onnx) if art is not None and art.onnx else {}
    if not paths:
        example, check = examples
        paths = dict(export_model(vlm, folder / "fp32", example, check).paths)
    qpaths, info = quantize_variants(vlm, {"v": paths}, calib, q, method, folder)
    return {"onnx": qpaths["v"], "info": info["v"]}


def _quantized_metrics(vlm, paths: dict, data, dense_emb) -> dict:
    """Accuracy and fidelity (to the dense PyTorch model) of the ONNX towers in ``paths``."""
    from .eval import fidelity, metrics_from_embeddings
    from .onnx_eval import onnx_embed_eval

    emb = onnx_embed_eval(vlm, paths, data)
    return {**metrics_from_embeddings(emb), **fidelity(dense_emb, emb)}


def _time(lc: LatencyConfig, dense, pruned, feeds, pattern: str, vlm, td: Path,
          quantized=None, dense_q_row: bool = False) -> list[dict]:
    """One setting's latency rows (:func:`vlcompress.runtime.time_models`), each with its
    in-run speedup's bootstrap interval (:func:`vlcompress.gate.bootstrap_speedup`) in place
    of the raw samples. ``quantized`` = ``(q, dense_q, pruned_q)``: four variants timed
    interleaved instead (:func:`_time_quantized`)."""
    from .gate import bootstrap_speedup
    from .runtime.registry import BuildOptions
    from .runtime.timing import time_models

    first = min(lc.batch_sizes)
    towers = list(dict.fromkeys(t for t, _ in feeds))
    opts = BuildOptions(threads=lc.threads, batch_sizes=lc.batch_sizes, pattern=pattern,
                        seq_len=getattr(vlm, "text_max_length", None),
                        check_feeds={t: feeds[(t, first)] for t in towers},
                        timing_cache=td / "timing.cache")
    if quantized is not None:
        return _time_quantized(lc, dense, pruned, feeds, towers, opts, quantized, dense_q_row)
    rows = time_models(lc.runtime_entry, dense, pruned, feeds, lc, towers=towers, options=opts,
                       check=False)
    for i, r in enumerate(rows):
        d, p = r.pop("dense_samples_ms"), r.pop("pruned_samples_ms")
        _, lo, hi = bootstrap_speedup(d, p, quantile=0.5, seed=i)
        r["speedup_ci"] = [lo, hi]
    return rows


def _time_quantized(lc, dense, pruned, feeds, towers, opts, quantized, dense_q_row) -> list[dict]:
    """dense, dense_<q>, pruned, pruned_<q> timed in one interleaved run per (tower, batch)
    (:func:`vlcompress.runtime.timing.time_variants`). Per row of that run: the float row
    (``quantize`` none, as without quantization), the ``<setting> + <q>`` row (pruned_<q> vs
    dense fp32, and ``gain_over_quantized`` = dense_<q> p50 / pruned_<q> p50: what pruning
    buys over quantization alone) and, when ``dense_q_row``, the ``dense + <q>`` row."""
    from .gate import bootstrap_speedup
    from .runtime.registry import Artefacts, get_runtime
    from .runtime.timing import time_variants

    q, dense_q, pruned_q = quantized
    rt = lc.runtime_entry
    qrt = get_runtime(rt.name, rt.device, "fp16") if q == "fp16" else rt
    variants = {"dense": (rt, dense),
                f"dense_{q}": (qrt, Artefacts(f"dense_{q}", onnx=dense_q["onnx"])),
                "pruned": (rt, pruned),
                f"pruned_{q}": (qrt, Artefacts(f"pruned_{q}", onnx=pruned_q["onnx"]))}
    raw = time_variants(variants, feeds, lc, towers=towers, options=opts, check=False)
    rows = []
    for i, r in enumerate(raw):
        v = r["variants"]
        samples = {k: x.pop("samples_ms") for k, x in v.items()}
        r.pop("dense_samples_ms", None)
        r.pop("pruned_samples_ms", None)

        def ci(label, seed, samples=samples):
            _, lo, hi = bootstrap_speedup(samples["dense"], samples[label], quantile=0.5,
                                          seed=seed)
            return [lo, hi]

        gain = v[f"dense_{q}"]["ms"]["p50"] / v[f"pruned_{q}"]["ms"]["p50"]
        rows.append({**r, "quantize": "none", "speedup_ci": ci("pruned", 3 * i)})
        qrow = {k: r[k] for k in ("runtime", "device", "tower", "batch")}
        pq = v[f"pruned_{q}"]
        rows.append({**qrow, "setting_suffix": f" + {q}", "quantize": q,
                     "dense_ms": v["dense"]["ms"], "pruned_ms": pq["ms"], "speedup": pq["speedup"],
                     "speedup_ci": ci(f"pruned_{q}", 3 * i + 1), "gain_over_quantized": gain,
                     "precision": pq["precision"], "provider": pq["provider"]})
        if dense_q_row:
            dq = v[f"dense_{q}"]
            rows.append({**qrow, "setting": f"dense + {q}", "method": "-", "quantize": q,
                         "dense_ms": v["dense"]["ms"], "pruned_ms": dq["ms"],
                         "speedup": dq["speedup"], "speedup_ci": ci(f"dense_{q}", 3 * i + 2),
                         "precision": dq["precision"], "provider": dq["provider"]})
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
    qd = res.get("quantize")
    if qd:  # the dense model quantized, evaluated from its quantized ONNX files
        lines.append(f"| dense | {qd['quantize']} | 0.0% | "
                     + " | ".join(_fmt(k, qd["dense"][k]) for k in keys) + " | – |")
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['setting']} | {100 * r['achieved']:.1f}% | "
                     + " | ".join(_fmt(k, r[k]) for k in keys) + f" | {r['prune_seconds']:.2f} |")
    lines.append("")
    if qd:
        lines += [f"`+ {qd['quantize']}` rows: {qd['quantize']} ({qd['method']}) ONNX of the row's "
                  f"model, evaluated on {qd['measured_on']}; fidelity is to the dense fp32 "
                  "PyTorch model.", ""]
    if res.get("latency"):
        lc = res["latency_config"]
        lines += [f"Latency p50 (ms), {lc['runtime']} on {lc['device']} "
                  f"({lc.get('precision') or '?'}), dense and pruned interleaved "
                  f"({lc['iterations']} iterations); speedup = dense p50 / pruned p50 of the "
                  "same row, 95% bootstrap interval.", "",
                  "| setting | tower | batch | provider | dense | pruned | speedup | interval |"
                  + (f" over dense {qd['quantize']} |" if qd else ""),
                  "|---|---|---:|---|---:|---:|---:|---|" + ("---:|" if qd else "")]
        for r in res["latency"]:
            ci = r.get("speedup_ci")
            gain = r.get("gain_over_quantized")
            lines.append(f"| {r['setting']} | {r['tower']} | {r['batch']} | "
                         f"{r.get('provider', r['runtime'])} | {r['dense_ms']['p50']:.3f} | "
                         f"{r['pruned_ms']['p50']:.3f} | {r['speedup']:.2f}x | "
                         + (f"{ci[0]:.2f}-{ci[1]:.2f}x |" if ci else "– |")
                         + ((f" {gain:.2f}x |" if gain is not None else " – |") if qd else ""))
        lines.append("")
        if qd:
            q = qd["quantize"]
            lines += [f"With --quantize {q} each structure was timed as four variants interleaved "
                      f"in one run (dense, dense {q}, pruned, pruned {q}); `dense + {q}` is "
                      f"quantization alone (from the first structure's run), `over dense {q}` "
                      f"= dense {q} p50 / pruned {q} p50: what pruning buys over quantization "
                      "alone.", ""]
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
    qd = res.get("quantize")
    if qd:
        ax.axhline(100 * qd["dense"][metric], color="gray", ls=":", lw=1,
                   label=f"dense {qd['quantize']}")
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    patterns = list(dict.fromkeys(r["pattern"] for r in res["rows"]))
    quants = list(dict.fromkeys(r.get("quantize", "none") for r in res["rows"]))
    for m in methods:
        for j, p in enumerate(patterns):
            for qz in quants:  # quantized variants: the same color and marker, dotted, hollow
                pts = sorted((r["achieved"], r[metric]) for r in res["rows"]
                             if r["method"] == m and r["pattern"] == p
                             and r.get("quantize", "none") == qz)
                if not pts:
                    continue
                xs, ys = [100 * x for x, _ in pts], [100 * y for _, y in pts]
                plain = qz == "none"
                ax.plot(xs, ys, marker=markers[j % len(markers)], color=colors[m],
                        ls=("-" if plain else ":") if len(pts) > 1 else "none",
                        mfc=None if plain else "none",
                        label=f"{m} ({p})" if plain else f"{m} ({p} + {qz})")
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
        plain = [s for s in settings if not any(r.get("quantize", "none") != "none"
                                                for r in tr if r["setting"] == s)]
        for s in settings:
            xs, ys, ci = speedup_series(tr, s)
            err = [[max(0.0, y - lo) for y, (lo, _) in zip(ys, ci, strict=True)],
                   [max(0.0, hi - y) for y, (_, hi) in zip(ys, ci, strict=True)]]
            base = next((p for p in plain if s.startswith(p + " + ")), None)
            if s in plain:  # a float setting
                ax.errorbar(xs, ys, yerr=err, marker="s", color=f"C{plain.index(s)}",
                            capsize=3, label=f"pruned {s}")
            else:  # quantized: its float setting's color, dotted; quantization alone in gray
                ax.errorbar(xs, ys, yerr=err, marker="o", mfc="none", ls=":", capsize=3,
                            color=f"C{plain.index(base)}" if base else "gray",
                            label=s if s.startswith("dense") else f"pruned {s}")
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
