"""The runtime registry (Polygraphy's backend shape): a runtime is ``(name, device, precision)``.

    rt = get_runtime("trt")                      # -> tensorrt/cuda/fp16
    rt.check()                                   # MissingDependencyError: one sentence
    built = rt.build(Artefacts("pruned", onnx={"vision": p}), ["vision"], BuildOptions())
    built.runners["vision"]                      # a Runner, not yet active

Each runtime file of this package registers its own entries with :func:`register` when it is
imported (the package imports every module in it, so a new runtime is one new file). An entry
declares what it consumes (:data:`ONNX` files, the PyTorch :data:`MODEL`, TensorRT
:data:`ENGINE` files), the patterns it requires (None: any), an availability check (the lazy
imports of :mod:`vlcompress.optional_deps`) and a factory building one variant's runners per tower.

A leaf: imports nothing above :mod:`vlcompress.errors` and :mod:`vlcompress.config`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

ONNX, MODEL, ENGINE = "onnx", "model", "engine"
DEVICES = ("cpu", "cuda")
#: precisions a runtime entry runs, in the order ``get_runtime`` prefers them when none is
#: given (int8 / fp8: TensorRT engines built from explicit QDQ ONNX)
PRECISIONS = ("fp32", "fp16", "int8", "fp8")

#: Other names a user (or an older report) may give a runtime.
ALIASES = {"trt": "tensorrt", "ort": "onnxruntime", "torch-24": "torch-2:4",
           "ort-trt": "onnxruntime-trt"}


@dataclass
class Artefacts:
    """What one variant (``dense`` or ``pruned``) is made of; a runtime uses what it consumes.

    ``vlm``: the in-memory model (torch runtimes); ``onnx``/``engines``: tower -> file;
    ``folder``: where this variant's files live (engines are built there when missing);
    ``pruned_layers``: names of the layers that hold zeros (TensorRT's 2:4 check)."""

    variant: str
    vlm: object | None = None
    onnx: dict[str, Path] = field(default_factory=dict)
    engines: dict[str, Path] = field(default_factory=dict)
    folder: Path | None = None
    pruned_layers: list[str] | None = None


@dataclass
class BuildOptions:
    """Everything a factory may need beyond the artefacts (each runtime reads what it uses)."""

    threads: int | None = None
    batch_sizes: tuple[int, ...] = (1,)
    pattern: str | None = None  # the run's sparsity pattern (2:4 enables sparse engines)
    seq_len: int | None = None
    check_feeds: dict | None = None  # tower -> feed, to validate freshly built engines
    timing_cache: Path | None = None
    cuda_graphs: bool = False  # torch on CUDA: capture each shape once, replay it


@dataclass
class Built:
    """A variant's runners per tower, and per-tower facts to record in the latency rows."""

    runners: dict
    info: dict[str, dict] = field(default_factory=dict)


def _always() -> None:
    return None


@dataclass(frozen=True)
class Runtime:
    name: str
    device: str
    precision: str
    consumes: str
    factory: Callable[[Artefacts, Sequence[str], BuildOptions], Built]
    check: Callable[[], object] = _always
    patterns: tuple[str, ...] | None = None
    description: str = ""
    #: the patterns whose zeros this runtime turns into speed: ``structured`` (smaller dense
    #: matrices: every runtime) and, where its kernels use them, ``2:4`` (sparse tensor cores)
    accelerates: tuple[str, ...] = ("structured",)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.name, self.device, self.precision)

    @property
    def label(self) -> str:
        return "/".join(self.key)

    def check_pattern(self, pattern) -> None:
        """ConfigError when this runtime cannot run models pruned with ``pattern``."""
        if self.patterns is not None and str(pattern) not in self.patterns:
            raise ConfigError(f"runtime {self.label} needs pattern {' or '.join(self.patterns)}, "
                              f"not {pattern}")

    def available(self) -> bool:
        from ..errors import MissingDependencyError

        try:
            self.check()
        except MissingDependencyError:
            return False
        return True

    def build(self, artefacts: Artefacts, towers: Sequence[str],
              options: BuildOptions | None = None) -> Built:
        """This variant's runners (inactive) for ``towers``; checks what it consumes is there."""
        if self.consumes == MODEL and artefacts.vlm is None:
            raise ConfigError(f"runtime {self.label} runs the PyTorch model; the "
                              f"{artefacts.variant} model was not given")
        if self.consumes == ONNX:
            missing = [t for t in towers if t not in artefacts.onnx]
            if missing:
                raise ConfigError(f"runtime {self.label} needs {artefacts.variant} ONNX files; "
                                  f"missing for tower(s) {', '.join(missing)}")
        return self.factory(artefacts, list(towers), options or BuildOptions())


_REGISTRY: dict[tuple[str, str, str], Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    """Add ``runtime`` (a later entry with the same key replaces the earlier one)."""
    if runtime.device not in DEVICES or runtime.precision not in PRECISIONS:
        raise ValueError(f"bad runtime key {runtime.key}")
    _REGISTRY[runtime.key] = runtime
    return runtime


def runtimes() -> list[Runtime]:
    """Every registered runtime, in registration order."""
    return list(_REGISTRY.values())


def runtime_names() -> list[str]:
    return list(dict.fromkeys(r.name for r in _REGISTRY.values()))


def allowed() -> str:
    return ", ".join(r.label for r in _REGISTRY.values())


def expected_speedup(runtime: Runtime, pattern) -> dict:
    """What ``pattern`` can bring on ``runtime``, from the entries' ``accelerates``
    declarations: ``{"accelerated": bool, "by": ["name/device" of the entries that accelerate
    it], "text": one sentence}`` (the report puts it before the latency table)."""
    p = str(pattern)
    by = list(dict.fromkeys(f"{r.name}/{r.device}" for r in _REGISTRY.values()
                            if p in r.accelerates))
    every = {r.name for r in _REGISTRY.values()}
    structured = [r.name for r in _REGISTRY.values() if "structured" in r.accelerates]
    s_by = "every runtime" if set(structured) == every else ", ".join(dict.fromkeys(structured))
    if p in runtime.accelerates:
        what = ("smaller dense matrices" if p == "structured" else "sparse kernels")
        text = (f"{p} is accelerated by {runtime.label} ({what}): expect a speedup where the "
                "pruned matmuls dominate the time (measured below)")
    else:
        where = f"{p} is accelerated by {', '.join(by)}" if by else \
            f"no registered runtime accelerates {p}"
        text = (f"{p} runs dense on {runtime.label}: expect 1.0x; {where}; structured pruning "
                f"speeds up {s_by}")
    return {"accelerated": p in runtime.accelerates, "by": by, "text": text}


def canonical(name: str) -> str:
    n = str(name).strip().lower()
    return ALIASES.get(n, n)


def get_runtime(name: str, device: str | None = None, precision: str | None = None) -> Runtime:
    """The runtime ``(name, device, precision)``; ``None`` device/precision: the first one
    registered for the name, cpu before cuda, fp32 before fp16 before int8 / fp8 (``trt`` ->
    tensorrt/cuda/fp16,
    ``torch`` -> torch/cpu/fp32, ``torch --device cuda`` -> torch/cuda/fp32).

    A combination that does not exist raises one-line :class:`ConfigError` naming the value
    and every allowed combination. Availability is :meth:`Runtime.check`'s job."""
    n = canonical(name)
    dev = None if device is None else str(device).strip().lower()
    prec = None if precision is None else str(precision).strip().lower()
    hits = [rt for rt in _REGISTRY.values()
            if rt.name == n and dev in (None, rt.device) and prec in (None, rt.precision)]
    if hits:  # unspecified: cpu before cuda, then PRECISIONS order (fp32, fp16, int8, fp8)
        return min(hits, key=lambda rt: (rt.device != "cpu", PRECISIONS.index(rt.precision)))
    asked = "/".join([name, dev or "*", prec or "*"])
    raise ConfigError(f"runtime {asked} is not a valid combination; allowed: {allowed()}")


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured: batch sizes, warm-up and timed iterations, and the runtime
    ``(runtime, device, precision)``, resolved against the registry on construction (``None``
    device/precision: the runtime's first entry). ``towers`` None: every tower the model has."""

    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 5
    iterations: int = 30
    runtime: str = "onnxruntime"
    device: str | None = None
    threads: int | None = None
    towers: tuple[str, ...] | None = None
    precision: str | None = None
    cuda_graphs: bool = False  # torch / torch-2:4 on cuda only: CUDA-graph replay

    def __post_init__(self):
        bs = tuple(self.batch_sizes)
        if not bs or any((not isinstance(b, int)) or isinstance(b, bool) or b < 1 for b in bs):
            raise ConfigError(f"batch sizes {bs!r} are not valid; allowed: positive integers")
        object.__setattr__(self, "batch_sizes", bs)
        if self.warmup < 0 or self.iterations < 1:
            raise ConfigError(f"warmup={self.warmup}, iterations={self.iterations}; need "
                              "warmup >= 0, iterations >= 1")
        if self.device is not None and str(self.device).lower() not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; allowed: {', '.join(DEVICES)}")
        if self.precision is not None and str(self.precision).lower() not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; allowed: "
                              f"{', '.join(PRECISIONS)}")
        rt = get_runtime(self.runtime, self.device, self.precision)
        object.__setattr__(self, "runtime", rt.name)
        object.__setattr__(self, "device", rt.device)
        object.__setattr__(self, "precision", rt.precision)
        if self.cuda_graphs and not (rt.consumes == MODEL and rt.device == "cuda"):
            raise ConfigError(f"--cuda-graphs replays PyTorch on a CUDA GPU; the runtime here "
                              f"is {rt.name} on {rt.device}; allowed: --cuda-graphs with "
                              "--engine torch or torch-2:4 and --device cuda")
        if self.towers is not None:
            object.__setattr__(self, "towers", tuple(self.towers))

    @property
    def runtime_entry(self) -> Runtime:
        return get_runtime(self.runtime, self.device, self.precision)


__all__ = ["Runtime", "LatencyConfig", "Artefacts", "BuildOptions", "Built", "register", "runtimes",
           "runtime_names", "get_runtime", "canonical", "allowed", "expected_speedup", "ONNX", "MODEL",
           "ENGINE"]
