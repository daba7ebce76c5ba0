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
    opts = options or BuildOptions(threads=config.threads, batch_sizes=config.batch_sizes)
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


__all__ = ["time_models", "artefact_towers", "resolve"]
