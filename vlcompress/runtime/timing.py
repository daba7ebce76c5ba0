"""The one timing entry point of ``prune-export``, ``bench`` and ``sweep``.

    rows = time_models("onnxruntime", Artefacts("dense", onnx=d), Artefacts("pruned", onnx=p),
                       feeds, LatencyConfig(batch_sizes=(1, 8)))

It resolves the runtime in the registry, checks it can run here (one sentence when not),
builds the dense and pruned runners of every tower both variants have, times them with the
interleaved harness (:func:`~vlcompress.runtime.latency.compare_latency`) and records in each
row what actually ran: ``runtime``, ``device``, ``precision``, ``provider`` (e.g. the
onnxruntime session's first provider, ``TensorRT 10.x``), plus what the runtime knows about
the tower (TensorRT's sparse-layer counts, the semi-structured swap counts).
"""

from __future__ import annotations

import dataclasses

from ..progress import NULL
from .registry import ENGINE, MODEL, Artefacts, BuildOptions, LatencyConfig, Runtime, get_runtime

Feed = dict


def _options(options: BuildOptions | None, config: LatencyConfig) -> BuildOptions:
    """The build options, with the measurement's choices (CUDA graphs) carried in."""
    opts = options or BuildOptions(threads=config.threads, batch_sizes=config.batch_sizes)
    return dataclasses.replace(opts, cuda_graphs=config.cuda_graphs)


def artefact_towers(rt: Runtime, art: Artefacts) -> list[str]:
    """The towers of ``art`` that ``rt`` can run (model towers, ONNX files or engines)."""
    if rt.consumes == MODEL:
        return list(getattr(art.vlm, "towers", ()) or ())
    towers = list(art.onnx)
    if rt.consumes == ENGINE:
        towers += [t for t in art.engines if t not in towers]
    return towers


def resolve(runtime, config: LatencyConfig | None = None) -> Runtime:
    if isinstance(runtime, Runtime):
        return runtime
    if isinstance(runtime, tuple):
        return get_runtime(*runtime)
    if runtime is None and config is not None:
        return config.runtime_entry
    return get_runtime(runtime)


def time_models(runtime: Runtime | str | tuple | None, dense: Artefacts, pruned: Artefacts,
                feeds: dict[tuple[str, int], Feed], config: LatencyConfig, *,
                towers=None, options: BuildOptions | None = None, progress=NULL,
                check: bool = True) -> list[dict]:
    """Dense vs pruned latency rows on ``runtime`` (a registry entry, a name or a
    ``(name, device, precision)`` key; None: ``config``'s), one per tower and batch size.

    ``towers`` None: every tower both variants have (vision, text and fusion for BLIP; the
    one tower of a single-tower model), in the pruned variant's order. ``check`` runs the
    runtime's availability check first (MissingDependencyError, one sentence)."""
    rt = resolve(runtime, config)
    if check:
        rt.check()
    if towers is None:
        have = set(artefact_towers(rt, dense))
        towers = [t for t in artefact_towers(rt, pruned) if t in have]
    towers = list(towers)
    opts = _options(options, config)
    d = rt.build(dense, towers, opts)
    p = rt.build(pruned, towers, opts)
    lc = dataclasses.replace(config, runtime=rt.name, device=rt.device, precision=rt.precision,
                             towers=tuple(towers))
    from .latency import compare_latency

    rows = compare_latency(d.runners, p.runners, feeds, lc, progress=progress)
    for row in rows:
        t = row["tower"]
        dd, pd = d.runners[t].describe(), p.runners[t].describe()
        row.update({"runtime": rt.name, "device": rt.device,
                    "precision": pd.get("precision") or rt.precision,
                    "provider": pd.get("provider")})
        if dd.get("provider") != pd.get("provider") or dd.get("precision") != pd.get("precision"):
            row["dense_provider"] = dd.get("provider")
            row["dense_precision"] = dd.get("precision")
        row.update({k: v for k, v in pd.items() if k not in ("provider", "precision")})
        row.update(p.info.get(t, {}))
    return rows


def onnx_quantize(path) -> str:
    """``vlcompress.quantize`` of an ONNX file's metadata (int8, fp16, fp8), else ``none``."""
    if path is None:
        return "none"
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable: the runner has already said why
        return "none"
    return {p.key: p.value for p in proto.metadata_props}.get("vlcompress.quantize", "none")


def time_variants(variants: dict[str, tuple[Runtime, Artefacts]], feeds: dict[tuple[str, int], Feed],
                  config: LatencyConfig, *, towers, options: BuildOptions | None = None,
                  progress=NULL, check: bool = True) -> list[dict]:
    """Several variants (e.g. ``dense``, ``dense_int8``, ``pruned``, ``pruned_int8``) of every
    tower timed in ONE interleaved measurement per (tower, batch), each on its own registry
    entry (an fp16-quantized variant runs on the runtime's fp16 entry). The first variant is
    the reference. One row per (tower, batch), shaped like :func:`time_models`' rows for the
    first two variants (``dense_ms``, ``pruned_ms``, ``speedup``, samples) when they are named
    ``dense`` and ``pruned``, plus ``variants``: label -> ``{"ms": summary, "speedup": ref p50
    / p50, "precision", "quantize", "provider", "samples_ms"}``."""
    from contextlib import ExitStack

    from .latency import _use_cuda_events, host_facts, measure, summary

    labels = list(variants)
    built = {}
    for label, (rt, art) in variants.items():
        if check:
            rt.check()
        opts = _options(options, config)
        built[label] = rt.build(art, list(towers), opts)
    rows = []
    ref = labels[0]
    with progress.task("latency", total=len(towers) * len(config.batch_sizes)) as task:
        for tower in towers:
            runners = {k: built[k].runners[tower] for k in labels}
            with ExitStack() as stack:
                for r in runners.values():
                    if not r.is_active:
                        stack.enter_context(r)
                for b in config.batch_sizes:
                    feed = feeds[(tower, b)]
                    host: dict[str, list[float]] = {}
                    times = measure({k: (runners[k], feed) for k in labels},
                                    warmup=config.warmup, iterations=config.iterations,
                                    cuda_events=_use_cuda_events(*runners.values()), host=host)
                    sm = {k: summary(times[k]) for k in labels}
                    rt0 = variants[ref][0]
                    row = {"runtime": rt0.name, "device": rt0.device, "tower": tower, "batch": b,
                           "variants": {}, **host_facts(times, host)}
                    for k in labels:
                        desc = runners[k].describe()
                        art = variants[k][1]
                        row["variants"][k] = {
                            "ms": sm[k],
                            "speedup": sm[ref]["p50"] / sm[k]["p50"] if sm[k]["p50"] > 0
                            else float("nan"),
                            "precision": desc.get("precision") or variants[k][0].precision,
                            "quantize": onnx_quantize(art.onnx.get(tower)),
                            "provider": desc.get("provider"),
                            "samples_ms": [round(t, 4) for t in times[k]]}
                    if "dense" in sm and "pruned" in sm:
                        row.update({"dense_ms": sm["dense"], "pruned_ms": sm["pruned"],
                                    "speedup": sm["dense"]["p50"] / sm["pruned"]["p50"],
                                    "precision": row["variants"]["pruned"]["precision"],
                                    "provider": row["variants"]["pruned"]["provider"],
                                    "dense_samples_ms": row["variants"]["dense"]["samples_ms"],
                                    "pruned_samples_ms": row["variants"]["pruned"]["samples_ms"]})
                    rows.append(row)
                    task.advance()
    return rows


__all__ = ["time_models", "time_variants", "artefact_towers", "resolve"]
