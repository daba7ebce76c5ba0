"""The run report: one JSON schema (docs/report.md), a Markdown rendering and a console table."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .atomic import atomic_write_text

SCHEMA_VERSION = 1

METRIC_NAMES = {
    "zeroshot_top1": "zero-shot top-1",
    "i2t_r1": "image→text R@1",
    "i2t_r5": "image→text R@5",
    "t2i_r1": "text→image R@1",
    "t2i_r5": "text→image R@5",
    "cider": "CIDEr",
    "attribute_accuracy": "caption attribute accuracy",
    "vqa_accuracy": "VQA accuracy",
}
#: metrics that are scores, not fractions (printed as numbers; deltas as differences)
RAW_METRICS = ("cider",)
#: the dense model's fidelity to itself where it is not 1 (a divergence)
SELF_FIDELITY = {"token_kl": 0.0}


def _metric(k: str, v: float) -> str:
    return f"{v:.3f}" if k in RAW_METRICS else _pct(v)


def _delta(k: str, v: float) -> str:
    return f"{v:+.3f}" if k in RAW_METRICS else f"{100 * v:+.1f} pt"


def accuracy_section(dataset: str, dense: dict, pruned: dict, fidelity: dict | None) -> dict:
    metrics = {
        k: {"dense": dense[k], "pruned": pruned[k], "delta": pruned[k] - dense[k]}
        for k in dense if k in pruned
    }
    return {"dataset": dataset, "metrics": metrics, "fidelity": fidelity or {}}


def build_report(*, model: dict, prune: dict, export: dict, accuracy: dict | None,
                 latency: list[dict], env: dict, config: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "prune": prune,
        "export": export,
        "accuracy": accuracy,
        "latency": latency,
        "env": env,
        "config": config,
    }


def write_report(report: dict, folder: Path) -> tuple[Path, Path]:
    folder = Path(folder)
    j = folder / "report.json"
    m = folder / "report.md"
    atomic_write_text(j, json.dumps(report, indent=2, default=_json_default) + "\n")
    atomic_write_text(m, to_markdown(report))
    return j, m


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def to_markdown(r: dict) -> str:
    p = r["prune"]
    mdl = r["model"]
    lines = [
        f"# vlcompress report: {mdl['name']}",
        "",
        f"- **method** `{p['method']}`, pattern `{p['pattern']}`, target sparsity "
        f"{_pct(p['target'])}, achieved {_pct(p['achieved'])} ("
        + ", ".join(f"{k} {_pct(v)}" for k, v in p.get("per_modality", {}).items()) + ")",
        f"- **parameters** {mdl['params_total']:,} total, {mdl['params_nonzero']:,} nonzero "
        f"after pruning",
        f"- **pruning time** {p['seconds']:.2f} s",
    ]
    rec = p.get("reconstruct")
    if rec is not None:
        lines.append(f"- **reconstruction** {rec['why']}" + (
            f": survivors fitted to the dense layer outputs in {rec['seconds']:.2f} s, layer "
            f"output error {rec['error_ratio']:.2f}x that of plain masking"
            if rec.get("enabled") and rec.get("error_ratio") is not None else ""))
    auto = (p.get("details") or {}).get("winner")
    if auto:
        d = p["details"]
        lines.append(f"- **auto** chose `{auto}` (fidelity {d['winner_score']:.3f}"
                     + (f", +{d['margin']:.3f} over `{d['runner_up']}`" if d.get("runner_up") else "")
                     + ", on held-out calibration pairs)")
    data = r.get("data") or {}
    if data:
        used = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in data.items()
                         if k != "notes" and v)
        lines.append(f"- **data** {used}")
        lines += [f"- **note** {n}" for n in data.get("notes") or []]
    lines.append("")
    towers = mdl.get("towers") or {}
    if towers:
        lines += ["## Size per tower (dense → pruned; FLOPs per input)", "",
                  "| tower | params dense | params pruned | FLOPs dense | FLOPs pruned | layers |",
                  "|---|---:|---:|---:|---:|---:|"]
        for t, v in towers.items():
            lines.append(f"| {t} | {v['params_dense'] / 1e6:.2f} M | {v['params_pruned'] / 1e6:.2f} M "
                         f"({100 * v['params_ratio']:.0f}%) | {v['flops_dense'] / 1e9:.3f} G | "
                         f"{v['flops_pruned'] / 1e9:.3f} G ({100 * v['flops_ratio']:.0f}%) | "
                         f"{v.get('layers_dense')} → {v.get('layers_pruned')} |")
        lines.append("")
    acc = r.get("accuracy")
    if acc:
        lines += [f"## Accuracy ({acc['dataset']})", "", "| metric | dense | pruned | Δ |",
                  "|---|---:|---:|---:|"]
        for k, v in acc["metrics"].items():
            lines.append(f"| {METRIC_NAMES.get(k, k)} | {_metric(k, v['dense'])} | "
                         f"{_metric(k, v['pruned'])} | {_delta(k, v['delta'])} |")
        for k, v in acc.get("fidelity", {}).items():
            lines.append(f"| fidelity: {k.replace('_', ' ')} | {SELF_FIDELITY.get(k, 1.0):.3f} | "
                         f"{v:.3f} | |")
        lines.append("")
    if r.get("latency"):
        lines += ["## Latency (p50, ms; dense and pruned interleaved in one process)", ""]
        if r.get("speedup_expectation"):
            lines += [f"**Expected:** {r['speedup_expectation']['text']}.", ""]
        lines += ["| runtime | device | precision | provider | tower | batch | dense p50 | "
                  "pruned p50 | dense p90 | pruned p90 | speedup |",
                  "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in r["latency"]:
            d, q = row["dense_ms"], row["pruned_ms"]
            lines.append(f"| {row['runtime']} | {row['device']} | {row.get('precision', '?')} | "
                         f"{row.get('provider', '?')} | {_tower(row)} | {row['batch']} | "
                         f"{d['p50']:.3f} | {q['p50']:.3f} | {d['p90']:.3f} | {q['p90']:.3f} | "
                         f"{row['speedup']:.2f}x |")
        lines.append("")
    lines += _quantize_markdown(r)
    lines += _visual_tokens_markdown(r)
    ex = r.get("export") or {}
    if ex.get("max_abs_diff"):
        prec = ex.get("precision") or {}
        lines += ["## Export (ONNX vs PyTorch, max abs diff)", "",
                  "| model | precision | tower | max abs diff |", "|---|---|---|---:|"]
        for variant, diffs in ex["max_abs_diff"].items():
            p_ = prec.get(variant) or ("fp16" if ex.get("fp16") else "fp32")
            for tower, d in diffs.items():
                lines.append(f"| {variant} | {p_} | {tower} | {d:.2e} |")
        lines.append("")
    env = r.get("env", {})
    pk = env.get("packages", {})
    lines.append(f"_{env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores); torch "
                 f"{pk.get('torch')}, onnxruntime {pk.get('onnxruntime')}, transformers "
                 f"{pk.get('transformers')}_")
    return "\n".join(lines) + "\n"


def _tower(row: dict) -> str:
    """A latency row's part, with its unit when not ms per call (a generative decode row is
    ms per generated token)."""
    unit = row.get("unit", "ms")
    return row["tower"] if unit == "ms" else f"{row['tower']} ({unit})"


def _quantize_markdown(r: dict) -> list[str]:
    """The four variants (dense, dense quantized, pruned, pruned quantized) per tower and
    batch, timed interleaved in one run, their accuracy, and what pruning buys over
    quantization alone; the --target-speedup search."""
    lines = []
    rows = [row for row in r.get("latency") or []
            if row.get("variants") and row.get("quantize")]
    quant = r.get("quantize") or {}
    if rows:
        q = rows[0].get("quantize", "?")
        names = list(rows[0]["variants"])
        lines += [f"## Quantization on top of pruning ({q}; p50 ms, speedup over dense; "
                  "all four interleaved in one process)", "",
                  "| tower | batch | " + " | ".join(names) + " | pruning over quantization "
                  "alone |", "|---|---:|" + "---:|" * (len(names) + 1)]
        for row in rows:
            cells = [f"{v['ms']['p50']:.3f} ({v['speedup']:.2f}x)" for v in row["variants"].values()]
            lines.append(f"| {row['tower']} | {row['batch']} | " + " | ".join(cells)
                         + f" | {row.get('gain_over_quantized', float('nan')):.2f}x |")
        lines += ["", f"Pruning buys the last column on top of {q} alone: pruned {q} vs dense {q}, "
                  "same runtime, same run.", ""]
    acc = (quant.get("accuracy") or {}).get("variants")
    if acc:
        metric_names = list(next(iter(acc.values()))["metrics"])
        fid_names = list(next(iter(acc.values()))["fidelity"])
        lines += [f"### Accuracy of the exported files ({quant['accuracy'].get('dataset', '')}, "
                  "ONNX Runtime CPU)", "",
                  "| variant | " + " | ".join([METRIC_NAMES.get(k, k) for k in metric_names]
                                               + [f"fidelity {k.replace('_', ' ')}"
                                                  for k in fid_names]) + " |",
                  "|---|" + "---:|" * (len(metric_names) + len(fid_names))]
        for k, v in acc.items():
            lines.append(f"| {k} | " + " | ".join([_pct(v["metrics"][m]) for m in metric_names]
                                                   + [f"{v['fidelity'].get(f, float('nan')):.4f}"
                                                      for f in fid_names]) + " |")
        lines.append("")
    if quant.get("nm_survives"):
        bad = sum(len(v) for v in quant["nm_survives"].values())
        kept = "kept in every weight" if not bad else f"{bad} weights lost it"
        lines += [f"- N:M pattern after quantization: {kept} (read from the quantized "
                  "initialisers)", ""]
    ts = r.get("target_speedup")
    if ts:
        lines += [f"## --target-speedup {ts['target_speedup']:g}: chose structured sparsity "
                  f"{ts['chosen_sparsity']:g}", "", "| sparsity | speedup (brief) | fidelity |",
                  "|---:|---:|---:|"]
        for c in ts["candidates"]:
            fid = "" if c.get("fidelity") is None else f"{c['fidelity']:.4f}"
            lines.append(f"| {c['sparsity']:g} | {c['speedup']:.2f}x | {fid} |")
        fin = ts.get("final")
        if fin:
            verdict = "reaches the target" if fin["reached"] else (
                "falls short of the target (the search's brief timing was optimistic)")
            lines += ["", f"Full timing of the chosen model ({fin['variant']}, batch "
                      f"{fin['batch']}): {fin['speedup']:.2f}x over dense, {verdict}."]
        lines.append("")
    return lines


def _visual_tokens_markdown(r: dict) -> list[str]:
    """Weights alone, visual tokens alone and both (``--visual-tokens``): each variant's
    metrics, the share of dense it keeps, and its fidelity to dense."""
    acc = r.get("accuracy") or {}
    var, vt = acc.get("variants"), acc.get("visual_tokens")
    if not var or not vt:
        return []
    names = list(next(iter(var.values()))["metrics"])
    fid = list(next(iter(var.values()))["fidelity"])
    lines = [f"## Visual tokens ({vt['kept']} of {vt['of']} per image, {vt['method']}: "
             f"{vt['dominant']} dominant + {vt['contextual']} contextual)", "",
             "| variant | " + " | ".join([f"{METRIC_NAMES.get(k, k)} (retained)" for k in names]
                                        + [f"fidelity {k.replace('_', ' ')}" for k in fid]) + " |",
             "|---|" + "---:|" * (len(names) + len(fid))]
    for name, v in var.items():
        cells = [f"{_metric(k, v['metrics'][k])} ({_pct(v['retained'][k])})" for k in names]
        cells += [f"{v['fidelity'].get(k, float('nan')):.3f}" for k in fid]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    rows = [row for row in r.get("latency") or []
            if row.get("variants") and not row.get("quantize")]
    if rows:  # the same variants timed (runtime.gen_latency), interleaved in one process
        timed = rows[0]["variants"]
        order = list(var) if all(k in timed for k in var) else list(timed)
        lines += ["| runtime | part | batch | " + " | ".join(order) + " |",
                  "|---|---|---:|" + "---:|" * len(order)]
        for row in rows:
            v = row["variants"]
            cells = [f"{v[k]['ms']['p50']:.3f} ({v[k]['speedup']:.2f}x)" if k in v else ""
                     for k in order]
            lines.append(f"| {row['runtime']} | {_tower(row)} | {row['batch']} | "
                         + " | ".join(cells) + " |")
        lines += ["", "p50 ms (speedup over dense); prefill is time to first token."]
        lines.append("")
    return lines


def console_tables(r: dict):
    """Rich tables for the terminal: accuracy and latency, dense vs pruned."""
    from rich.table import Table

    out = []
    acc = r.get("accuracy")
    if acc:
        t = Table(title=f"Accuracy on {acc['dataset']}")
        for c in ("metric", "dense", "pruned", "Δ"):
            t.add_column(c, justify="left" if c == "metric" else "right")
        for k, v in acc["metrics"].items():
            t.add_row(METRIC_NAMES.get(k, k), _metric(k, v["dense"]), _metric(k, v["pruned"]),
                      _delta(k, v["delta"]))
        for k, v in acc.get("fidelity", {}).items():
            t.add_row(f"fidelity ({k.replace('_', ' ')})", f"{SELF_FIDELITY.get(k, 1.0):.3f}",
                      f"{v:.3f}", "")
        out.append(t)
    if r.get("latency") and r.get("speedup_expectation"):
        from rich.text import Text

        out.append(Text(f"Expected: {r['speedup_expectation']['text']}."))
    if r.get("latency"):
        t = Table(title="Latency p50 (ms), dense vs pruned, interleaved")
        for c in ("runtime", "tower", "batch", "dense", "pruned", "speedup"):
            t.add_column(c, justify="right" if c in ("batch", "dense", "pruned", "speedup") else "left")
        for row in r["latency"]:
            prec = f", {row['precision']}" if row.get("precision") else ""
            t.add_row(f"{row['runtime']} ({row['device']}{prec})", _tower(row), str(row["batch"]),
                      f"{row['dense_ms']['p50']:.3f}", f"{row['pruned_ms']['p50']:.3f}",
                      f"{row['speedup']:.2f}x")
        out.append(t)
    return out
