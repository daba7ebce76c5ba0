"""The one latency harness: warm-up, many timed iterations, runners interleaved.

    times = measure({"dense": (dense_runner, feed), "pruned": (pruned_runner, feed)})
    summary(times["dense"])  # {"p50", "p90", "p99", "mean", "n"} in milliseconds

Runners are interleaved round-robin, one call each per iteration, the order reversed every
other iteration (A B, B A, A B, ...), so drift (thermal, background load, frequency scaling)
hits both alike. Each call is timed alone, between device synchronisations on GPU.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..data.pairs import PairBatch
from ..errors import ConfigError
from ..progress import NULL, Progress
from .base import Runner
from .registry import Artefacts, BuildOptions, LatencyConfig, get_runtime
from .torch_runner import tower_input_names  # noqa: F401 - re-exported

Feed = dict[str, np.ndarray]


def interleaved_order(names: list[str], iteration: int) -> list[str]:
    """The call order in ``iteration``: as given on even iterations, reversed on odd ones."""
    return list(names) if iteration % 2 == 0 else list(reversed(names))


def measure(runners: dict[str, tuple[Runner, Feed]], warmup: int = 5, iterations: int = 30,
            sync: Callable[[], None] | None = None, trace: list | None = None,
            cuda_events: bool = False, host: dict[str, list[float]] | None = None
            ) -> dict[str, list[float]]:
    """Time every runner on its feed; return label -> milliseconds per iteration.

    ``warmup`` untimed rounds, then ``iterations`` timed rounds, interleaved (see the module
    doc; the alternation runs on from warm-up into the timed rounds). ``sync`` is called
    once after warm-up and right before and after each timed call; by default each
    runner's own ``synchronize`` (``torch.cuda.synchronize`` on CUDA, nothing on CPU).
    Runners that are not active are activated for the measurement and deactivated after.
    ``trace``, if given, receives ``(phase, iteration, label)`` for every call, in order.
    ``cuda_events`` times each call with a pair of CUDA events (recorded on the runner's
    ``stream`` if it has one, else torch's current stream) instead of the host clock; the
    synchronisations around each call stay. The CPU path is unchanged. ``host``, with
    ``cuda_events``, receives label -> host issue time per timed call (ms): the wall time of
    the call that enqueues the work, before the end event waits for it (see
    :func:`~vlcompress.runtime.graphs.host_bound`).
    """
    if iterations < 1 or warmup < 0:
        raise ConfigError(f"warmup={warmup}, iterations={iterations}; need warmup >= 0, "
                          "iterations >= 1")
    if not runners:
        return {}
    labels = list(runners)
    times: dict[str, list[float]] = {k: [] for k in labels}
    with ExitStack() as stack:
        for runner, _ in runners.values():
            if not runner.is_active:
                stack.enter_context(runner)
        syncs = {k: (sync or runners[k][0].synchronize) for k in labels}
        timers = {}
        if cuda_events:
            from .cuda import CudaEventTimer

            timers = {k: CudaEventTimer(getattr(runners[k][0], "stream", None)) for k in labels}
        for it in range(warmup):
            for k in interleaved_order(labels, it):
                runner, feed = runners[k]
                runner.infer(feed)
                if trace is not None:
                    trace.append(("warmup", it, k))
        for f in dict.fromkeys(syncs.values()):  # each distinct sync once
            f()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # no collector pauses inside a timed call
        try:
            for it in range(iterations):
                for k in interleaved_order(labels, warmup + it):  # alternate across phases
                    runner, feed = runners[k]
                    s = syncs[k]
                    s()
                    if timers:
                        with timers[k].time():
                            h0 = time.perf_counter_ns()
                            runner.infer(feed)
                            h1 = time.perf_counter_ns()
                        s()
                        if host is not None:
                            host.setdefault(k, []).append((h1 - h0) / 1e6)
                        times[k].append(timers[k].last_ms)
                    else:
                        t0 = time.perf_counter_ns()
                        runner.infer(feed)
                        s()
                        times[k].append((time.perf_counter_ns() - t0) / 1e6)
                    if trace is not None:
                        trace.append(("timed", it, k))
        finally:
            if gc_was_enabled:
                gc.enable()
    return times


def host_facts(times: dict[str, list[float]], host: dict[str, list[float]]) -> dict:
    """``host_ms`` (label -> p50 host issue time) and ``host_bound`` (label -> whether that
    is at least :data:`~vlcompress.runtime.graphs.HOST_BOUND_RATIO` of the p50 GPU time) for
    a measurement; both None where no host time was taken (the CPU: the host runs the
    kernels, the question does not arise)."""
    from .graphs import host_bound

    if not host:
        return {"host_ms": None, "host_bound": None}
    p50 = {k: float(np.median(v)) for k, v in host.items()}
    return {"host_ms": {k: round(v, 4) for k, v in p50.items()},
            "host_bound": {k: host_bound(p50[k], float(np.median(times[k]))) for k in p50}}


def _use_cuda_events(*runners: Runner) -> bool:
    """CUDA-event timing when every runner is on a GPU and torch can see it."""
    if not all(str(getattr(r, "device", "cpu")).startswith("cuda") for r in runners):
        return False
    import torch

    return bool(torch.cuda.is_available())


def summary(times: Iterable[float]) -> dict:
    """``{"p50", "p90", "p99", "mean", "n"}`` of a list of milliseconds."""
    arr = np.asarray(list(times), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no timings to summarise")
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(arr.mean()),
            "n": int(arr.size)}


def compare_latency(dense: dict[str, Runner], pruned: dict[str, Runner],
                    feeds: dict[tuple[str, int], Feed], config: LatencyConfig,
                    progress: Progress = NULL) -> list[dict]:
    """Dense vs pruned latency, per tower and batch size, interleaved in this process.

    Towers of ``config.towers`` (None: every tower of ``dense``) that neither dict has are
    skipped. Each tower's two runners
    are activated once for all its batch sizes. Returns one row per (tower, batch):
    ``{"runtime", "device", "tower", "batch", "dense_ms", "pruned_ms", "speedup"}`` with
    ``dense_ms``/``pruned_ms`` as :func:`summary` dicts and ``speedup`` = dense p50 /
    pruned p50, plus ``dense_samples_ms``/``pruned_samples_ms``: the raw per-iteration times,
    index i of both timed back to back in iteration i (what the CI gate bootstraps).
    """
    towers = []
    for t in (config.towers if config.towers is not None else list(dense)):
        if (t in dense) != (t in pruned):
            have = "dense" if t in dense else "pruned"
            raise ConfigError(f"tower {t!r} has a {have} runner but no "
                              f"{'pruned' if have == 'dense' else 'dense'} one")
        if t in dense:
            towers.append(t)
    if not towers:
        raise ConfigError(f"no runners for the towers to time ({', '.join(config.towers or [])})")
    missing = [f"{t}@{b}" for t in towers for b in config.batch_sizes if (t, b) not in feeds]
    if missing:
        raise ConfigError(f"no input feed for {', '.join(missing)}")
    rows = []
    with progress.task("latency", total=len(towers) * len(config.batch_sizes)) as task:
        for tower in towers:
            d, p = dense[tower], pruned[tower]
            with ExitStack() as stack:
                for r in (d, p):
                    if not r.is_active:
                        stack.enter_context(r)
                for b in config.batch_sizes:
                    feed = feeds[(tower, b)]
                    host: dict[str, list[float]] = {}
                    times = measure({"dense": (d, feed), "pruned": (p, feed)},
                                    warmup=config.warmup, iterations=config.iterations,
                                    cuda_events=_use_cuda_events(d, p), host=host)
                    ds, ps = summary(times["dense"]), summary(times["pruned"])
                    rows.append({
                        "runtime": getattr(d, "runtime", config.runtime),
                        "device": getattr(d, "device", config.device),
                        "tower": tower,
                        "batch": b,
                        "dense_ms": ds,
                        "pruned_ms": ps,
                        "speedup": ds["p50"] / ps["p50"] if ps["p50"] > 0 else float("nan"),
                        # Raw per-iteration times, paired by iteration (interleaved), for the
                        # gate's bootstrap (vlcompress.gate); 0.1 us resolution.
                        "dense_samples_ms": [round(t, 4) for t in times["dense"]],
                        "pruned_samples_ms": [round(t, 4) for t in times["pruned"]],
                        **host_facts(times, host),
                    })
                    task.advance()
    return rows


def resize_batch(batch: PairBatch, size: int) -> PairBatch:
    """``batch`` repeated (cyclically) or trimmed to ``size`` pairs."""
    if len(batch) == 0:
        raise ConfigError("cannot build latency inputs from an empty batch")
    idx = [i % len(batch) for i in range(size)]
    labels = None if batch.labels is None else [batch.labels[i] for i in idx]
    images = None if batch.images is None else [batch.images[i] for i in idx]  # text-only data
    return PairBatch(images, [batch.captions[i] for i in idx], labels)


def make_feeds(vlm, towers: Iterable[str], batch_sizes: Iterable[int], batch: PairBatch
               ) -> dict[tuple[str, int], Feed]:
    """Numpy feeds ``{(tower, batch size): {input name: array}}`` from ``vlm.tower_inputs``,
    the batch's pairs repeated or trimmed to each size."""
    feeds = {}
    for b in batch_sizes:
        if not isinstance(b, int) or b < 1:
            raise ConfigError(f"batch size {b!r} is not a positive integer")
        pb = resize_batch(batch, b)
        for tower in towers:
            inputs = vlm.tower_inputs(tower, pb)
            feeds[(tower, b)] = {k: np.ascontiguousarray(v.detach().cpu().numpy())
                                 for k, v in inputs.items()}
    return feeds


def build_runners(config: LatencyConfig, *, onnx_paths: dict[str, str | Path] | None = None,
                  vlm=None, towers: Iterable[str] | None = None, variant: str = "pruned",
                  options: BuildOptions | None = None) -> dict[str, Runner]:
    """One runner per tower for the runtime of ``config`` (see the registry): ``onnx_paths``
    (tower -> file) for ONNX runtimes, ``vlm`` for torch ones. Towers the artefacts lack are
    skipped."""
    rt = get_runtime(config.runtime, config.device, config.precision)
    art = Artefacts(variant, vlm=vlm, onnx={t: Path(p) for t, p in (onnx_paths or {}).items()})
    want = list(towers) if towers is not None else list(config.towers or ())
    if not want:
        want = list(art.onnx) or list(getattr(vlm, "towers", ()))
    have = set(art.onnx) if rt.consumes != "model" else set(getattr(vlm, "towers", ()))
    opts = options or BuildOptions(threads=config.threads, batch_sizes=config.batch_sizes)
    # no artefacts at all: build() says what this runtime needs (ConfigError)
    return rt.build(art, [t for t in want if t in have] or want, opts).runners
