"""A Triton Inference Server model repository from a ``prune-export`` run folder.

    export_triton("runs/clip-s50", "runs/clip-s50-triton", backend="python")

One model per variant and tower, named ``<variant>_<tower>`` (``dense_vision``,
``pruned_vision``, ``dense_text``, ``pruned_text``, BLIP's ``*_fusion``; a run made with
``--quantize Q`` also has ``dense_Q_<tower>`` and ``pruned_Q_<tower>``, served from the files
its report lists under ``quantize.files``), each with a
``config.pbtxt`` whose inputs and outputs are read from the run's ONNX (names, dtypes, dims;
a symbolic first dimension is the batch axis, so ``max_batch_size`` > 0 and dims leave it
out), a version folder ``1/``, and a ``README.md`` with the ``tritonclient`` call of each model.
``vlcompress_triton.json`` records what was written and why (the batching rule below).

Backends:

- ``onnxruntime`` (default): ``backend: "onnxruntime"``, ``1/model.onnx``; CPU or GPU.
- ``tensorrt``: ``platform: "tensorrt_plan"``, ``1/model.plan`` = the run's
  ``<variant>/<tower>.engine`` (a run made with ``--engine trt``); GPU only.
- ``python``: our own Python-backend model (:mod:`._triton_model`) that runs
  ``1/model.onnx`` with onnxruntime inside Triton, so the repository runs on any Triton,
  including the CPU-only ``tritonserver`` of the ``nvidia-pytriton`` wheel.

Dynamic batching, from the run's measured latency table (``report.json`` ``latency``, rows of
this tower and variant on the run's runtime):

- ``max_batch_size`` = the largest batch size the run measured. Triton's dynamic batcher
  forms any batch from 1 to ``max_batch_size``; the run's TensorRT engines accept exactly that
  range (:func:`.tensorrt.profile_batch_range`: every profile spans 1..the largest batch), so
  for ``tensorrt`` ``max_batch_size`` is the engine profile's maximum and the engine runs
  every batch the batcher may send;
- ``preferred_batch_size`` = each measured batch b > b0 (b0 = the smallest measured) whose
  per-item p50 beats b0's (p50_b / b < p50_b0 / b0): sizes where batching pays on this model;
- ``max_queue_delay_microseconds`` = the p50 of one batch-b0 inference, clamped to
  [50 us, 100 ms]: a request waits at most one service time for company, so at low load
  latency at most doubles, and under load batches form.

A run without a latency table gets ``max_queue_delay_microseconds: 100`` and no preferred
sizes; the manifest says so (``rule``).

Quantized variants (``--quantize int8|fp16|fp8`` runs): the repository serves every variant
the run produced, unless ``variants`` names fewer. The fp8 files are explicit QDQ for TensorRT:
with ``--backend onnxruntime|python`` an fp8 variant is refused in one line naming it (allowed:
``--backend tensorrt``, or ``--variants`` without it). Each model records its ``precision``
(fp32, fp16, int8, fp8) and the PyTorch model it must reproduce (``reference``: the run's
dense or pruned model), which ``serve-check`` compares against with that precision's tolerance.

No ensemble is written: the towers of a two-tower model take disjoint inputs (pixels, token
ids) and return separate embeddings, so an ensemble would only bundle two independent calls;
a BLIP fusion tower needs the vision output plus tokens, which a client composes as easily.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_dir, check_output_folder
from ..errors import ConfigError

__all__ = ["BACKENDS", "TritonModel", "TritonRepo", "export_triton", "check_triton_options",
           "model_config_text", "batching_rule", "run_variants", "run_batch_sizes"]

BACKENDS = ("onnxruntime", "tensorrt", "python")
DEVICES = ("cpu", "gpu")
VARIANTS = ("dense", "pruned")
#: quantized variants only TensorRT serves (explicit QDQ made for it)
TENSORRT_ONLY = ("fp8",)
TOWERS = ("vision", "text", "fusion")
#: the "tower" of a generative run's one model per variant (the whole generation loop)
GENERATE = "generate"
#: queue delay of a generation model: one answer is a prefill plus a decoder call per token
#: (tens of ms even on tiny-llava), so waiting up to 5 ms for company costs little and lets
#: concurrent requests share one batched generate call
GENERATE_DELAY_US = 5000
#: the model file of a generation model, by generation.json "kind" (BLIP: vision + [question]
#: + decoder with cross-attention, run by BlipOrtGenerator; the rest: OrtGenerator)
GENERATE_MODEL_FILES = {"llava": "_triton_generate_model.py",
                        "blip-caption": "_triton_generate_blip_model.py",
                        "blip-vqa": "_triton_generate_blip_model.py"}
#: files of a run's model folder the generation model needs (tokenizer, processor, template)
_PROCESSOR_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
MANIFEST = "vlcompress_triton.json"
MIN_DELAY_US, MAX_DELAY_US, DEFAULT_DELAY_US = 50, 100_000, 100

# ONNX TensorProto elem_type -> (Triton data type, numpy dtype name, KServe datatype)
_DTYPES = {
    1: ("TYPE_FP32", "float32", "FP32"), 10: ("TYPE_FP16", "float16", "FP16"),
    11: ("TYPE_FP64", "float64", "FP64"), 16: ("TYPE_BF16", "bfloat16", "BF16"),
    7: ("TYPE_INT64", "int64", "INT64"), 6: ("TYPE_INT32", "int32", "INT32"),
    5: ("TYPE_INT16", "int16", "INT16"), 3: ("TYPE_INT8", "int8", "INT8"),
    2: ("TYPE_UINT8", "uint8", "UINT8"), 9: ("TYPE_BOOL", "bool", "BOOL"),
}


@dataclass
class Tensor:
    name: str
    data_type: str   # Triton TYPE_*
    numpy: str       # numpy dtype name
    datatype: str    # KServe / tritonclient datatype (FP32, INT64, ...)
    dims: list[int]  # without the batch axis when batched; -1 = dynamic
    optional: bool = False  # a request may leave it out (the generation model's inputs)
    ragged: bool = False    # requests of different lengths may share a batch (allow_ragged_batch)


@dataclass
class TritonModel:
    name: str
    variant: str
    tower: str
    source: str                 # the run file it came from (ONNX or engine), relative to the run
    reference_onnx: str         # the run's ONNX the served model must reproduce, relative to the run
    max_batch_size: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    preferred_batch_size: list[int] = field(default_factory=list)
    max_queue_delay_microseconds: int = DEFAULT_DELAY_US
    rule: str = ""
    vocab_size: int | None = None  # token-id inputs: ids must stay below it
    precision: str = "fp32"        # of the served file: fp32, fp16, int8, fp8
    reference: str = ""            # the run's PyTorch model it must reproduce: dense | pruned
    parameters: dict = field(default_factory=dict)  # extra config.pbtxt parameters (strings)


@dataclass
class TritonRepo:
    path: Path
    run_dir: str  # relative to the repository when the repository lies inside the run
    backend: str
    device: str
    models: list[TritonModel]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "run_dir": self.run_dir, "backend": self.backend,
                "device": self.device, "models": [asdict(m) for m in self.models]}

    @classmethod
    def load(cls, repo: str | Path) -> TritonRepo:
        p = Path(repo)
        f = p / MANIFEST
        if not f.is_file():
            raise ConfigError(f"{str(p)!r} is not a repository written by `vlcompress export-triton` "
                              f"(no {MANIFEST}); allowed: an export-triton --out folder")
        d = json.loads(f.read_text(encoding="utf-8"))
        models = []
        for m in d["models"]:
            m = dict(m)
            m["inputs"] = [Tensor(**t) for t in m["inputs"]]
            m["outputs"] = [Tensor(**t) for t in m["outputs"]]
            models.append(TritonModel(**m))
        return cls(p, d["run_dir"], d["backend"], d["device"], models)


def check_triton_options(backend: str, device: str | None = None) -> tuple[str, str | None]:
    """Normalise and check ``backend`` and ``device`` (one ConfigError line)."""
    if not isinstance(backend, str):
        raise ConfigError(f"Triton backend {backend!r} is not known; allowed: {', '.join(BACKENDS)}")
    b = str(backend).strip().lower()
    if b == "trt":
        b = "tensorrt"
    if b not in BACKENDS:
        raise ConfigError(f"Triton backend {backend!r} is not known; allowed: {', '.join(BACKENDS)}")
    d = None if device is None else str(device).strip().lower()
    if d == "cuda":
        d = "gpu"
    if d is not None and d not in DEVICES:
        raise ConfigError(f"Triton device {device!r} is not known; allowed: {', '.join(DEVICES)}")
    if b == "tensorrt" and d == "cpu":
        raise ConfigError("Triton backend tensorrt runs on GPU only; allowed devices: gpu")
    return b, d


def _tensors(values, batched: bool) -> list[Tensor]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        if tt.elem_type not in _DTYPES:
            raise ConfigError(f"ONNX tensor {v.name!r} has element type {tt.elem_type}, which this "
                              f"exporter does not map; allowed: {sorted(_DTYPES)}")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                for d in tt.shape.dim]
        t, np_name, kserve = _DTYPES[tt.elem_type]
        out.append(Tensor(v.name, t, np_name, kserve, dims[1:] if batched else dims))
    return out


def _onnx_io(path: Path) -> tuple[list, list, bool]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    first = [i.type.tensor_type.shape.dim[0] if i.type.tensor_type.shape.dim else None
             for i in m.graph.input]
    batched = bool(first) and all(d is not None and not (d.HasField("dim_value") and d.dim_value > 0)
                                  for d in first)
    return m.graph.input, m.graph.output, batched


def batching_rule(rows: list[dict], key: str) -> tuple[int | None, list[int], int, str]:
    """(max batch, preferred sizes, queue delay in us, the rule as a sentence) from latency
    rows of one tower (``key`` = ``<variant>_ms``: ``dense_ms``, ``pruned_ms``, or a quantized
    variant's ``pruned_int8_ms``, read from the row's ``variants``). See the module docstring."""
    p50 = {}
    for r in rows:
        ms = r.get(key) or ((r.get("variants") or {}).get(key[: -len("_ms")]) or {}).get("ms")
        if ms and ms.get("p50") is not None:
            p50[int(r["batch"])] = float(ms["p50"])
    if not p50:
        return (None, [], DEFAULT_DELAY_US,
                f"no latency rows in the run: queue delay {DEFAULT_DELAY_US} us, no preferred sizes")
    b0 = min(p50)
    per0 = p50[b0] / b0
    preferred = [b for b in sorted(p50) if b > b0 and p50[b] / b < per0]
    delay = int(round(min(max(p50[b0] * 1000.0, MIN_DELAY_US), MAX_DELAY_US)))
    runtime = rows[0].get("runtime", "?")
    detail = ", ".join(f"b{b}: {p50[b]:.3f} ms" for b in sorted(p50))
    rule = (f"{runtime} p50 ({detail}); preferred = batches whose per-item p50 beats batch {b0}'s; "
            f"queue delay = batch-{b0} p50 clamped to [{MIN_DELAY_US}, {MAX_DELAY_US}] us")
    return max(p50), preferred, delay, rule


def _vocab_size(run: Path, tower: str) -> int | None:
    """The text vocabulary of the run's model (token ids must stay below it)."""
    if tower == "vision":
        return None
    for cfg in (run / "pruned" / "model" / "config.json", run / "dense" / "model" / "config.json"):
        if cfg.is_file():
            c = json.loads(cfg.read_text(encoding="utf-8"))
            for sub in ("text_config", None):
                d = c.get(sub) if sub else c
                if isinstance(d, dict) and isinstance(d.get("vocab_size"), int):
                    return d["vocab_size"]
    return None


def _read_report(run: Path) -> dict:
    if not run.is_dir():
        raise ConfigError(f"run folder {str(run)!r} does not exist; allowed: a `vlcompress "
                          "prune-export --out` folder")
    f = run / "report.json"
    if not f.is_file():
        return {}
    try:
        report = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(f)!r} is not valid JSON ({exc}); allowed: the report.json "
                          "prune-export writes") from None
    return report if isinstance(report, dict) else {}


def run_variants(run: Path, report: dict | None = None) -> dict[str, dict]:
    """Every variant a run folder holds: label -> ``{"folder", "reference", "precision"}``.
    ``dense`` and ``pruned`` (the run's exports, fp32 or fp16), plus ``dense_<q>`` and
    ``pruned_<q>`` of a ``--quantize q`` run, located through its report (``quantize.files``:
    ``variant -> tower -> {"path"}``), not through how the quantizer names its files."""
    report = _read_report(run) if report is None else report
    precisions = ((report.get("export") or {}).get("precision") or {})
    out = {}
    for v in VARIANTS:
        prec = precisions.get(v) or ("fp16" if (report.get("export") or {}).get("fp16") else "fp32")
        out[v] = {"folders": {}, "reference": v, "precision": prec}
    quant = report.get("quantize") or {}
    q = quant.get("quantize")
    for base, towers in (quant.get("files") or {}).items():
        if base not in VARIANTS or not isinstance(towers, dict) or not q:
            continue
        entry = out.setdefault(f"{base}_{q}", {"folders": {}, "reference": base, "precision": q})
        for tower, info in towers.items():
            path = info.get("path") if isinstance(info, dict) else None
            if path:
                entry["folders"][tower] = Path(path).parent.as_posix()
    return out


def check_variants(variants, available: dict, backend: str, run: Path) -> list[str]:
    """``variants`` (None = every variant the run holds; a list or a comma-separated string)
    checked against the run and the backend: one ConfigError line naming the variant."""
    if variants is None:
        chosen = list(available)
    else:
        items = variants.split(",") if isinstance(variants, str) else list(variants)
        chosen = [str(v).strip().lower() for v in items if str(v).strip()]
        if not chosen:
            raise ConfigError(f"--variants {variants!r} names no variant; allowed: "
                              f"{', '.join(available)}")
        bad = [v for v in chosen if v not in available]
        if bad:
            raise ConfigError(f"variant {bad[0]!r} is not in run {str(run)!r}; allowed: "
                              f"{', '.join(available)}")
        chosen = list(dict.fromkeys(chosen))
    if backend != "tensorrt":
        only = [v for v in chosen if available[v]["precision"] in TENSORRT_ONLY]
        if only:
            keep = ",".join(v for v in chosen if v not in only) or "dense,pruned"
            raise ConfigError(
                f"--backend {backend} cannot serve the run's {available[only[0]]['precision']} "
                f"variant(s) {', '.join(only)} (explicit QDQ made for TensorRT); allowed: "
                f"--backend tensorrt, or --variants {keep}")
    return chosen


def run_batch_sizes(report: dict) -> list[int]:
    """The batch sizes the run measured (its config, else its latency rows)."""
    bs = (report.get("config") or {}).get("batch_sizes")
    if isinstance(bs, list) and bs and all(isinstance(b, int) and b > 0 for b in bs):
        return sorted(set(bs))
    return sorted({int(r["batch"]) for r in report.get("latency") or [] if "batch" in r})


def is_generative(report: dict) -> bool:
    """A run of a generative model (llava, blip2, BLIP captioning / VQA): served by one
    generation model per variant."""
    return bool((report.get("model") or {}).get("generative"))


def processor_dir(run: Path, report: dict) -> Path:
    """The run's model folder that holds its processor (tokenizer, image processor, chat
    template): the export's ``paths.model``, else ``pruned/model``."""
    return run / ((report.get("export") or {}).get("paths", {}).get("model") or "pruned/model")


def _plan_generative(run: Path, report: dict, backend: str, device: str | None,
                     variants) -> tuple[list[TritonModel], str]:
    """One Python-backend model per variant that runs the whole generation loop (see
    ``_triton_generate_model.py``): an ensemble cannot express a token loop (Triton ensembles
    are acyclic graphs of single calls; looping needs BLS, i.e. Python code anyway), and one
    model keeps the KV cache in one process instead of shipping it through the server per token.
    The model file follows the export's ``generation.json`` ``"kind"``
    (:data:`GENERATE_MODEL_FILES`: BLIP captioning / VQA run BlipOrtGenerator). Every
    generative export of the run is a variant (:func:`generative_variants`: dense, pruned,
    their ``--fp16`` / ``--quantize int8`` twins, the ``--visual-tokens`` variants and theirs);
    each model's ``reference`` is its own folder, which serve-check runs directly."""
    from ..runtime.gen_inputs import BLIP_KINDS, BlipPromptEncoder, PromptEncoder
    from ..runtime.ort_generate import read_spec

    if backend != "python":
        raise ConfigError(f"--backend {backend} cannot serve the generative run {str(run)!r}: its "
                          "token loop (prefill, then one decoder call per new token with the KV "
                          "cache) runs in a Python-backend model; allowed: --backend python")
    if device == "gpu":
        raise ConfigError("--device gpu is not available for a generative run: its generation "
                          "model runs OrtGenerator on onnxruntime's CPU provider; allowed: "
                          "--device cpu")
    available = generative_variants(run)
    if not available:
        raise ConfigError(f"run folder {str(run)!r} has no generative export (dense/ or pruned/ "
                          "with generation.json); allowed: a prune-export folder of a generative "
                          "model")
    chosen = check_variants(variants, available, backend, run)
    sizes = run_batch_sizes(report)
    max_batch = max(sizes) if sizes else 8
    rule = (f"generation: max_batch_size {max_batch} = the largest batch size the run measured"
            if sizes else f"generation: max_batch_size {max_batch} (the run names no batch sizes)")
    rule += (f"; queue delay {GENERATE_DELAY_US} us (an answer takes a prefill and one decoder "
             "call per token, so a short wait for company is cheap); ")
    batches = {"blip-vqa": "each batch is one generate call per question length (questions "
                           "are never padded: BLIP attends question padding)",
               "blip-caption": "each batch is one generate call, caption starts left-padded"}
    name = (report.get("model") or {}).get("name") or run.name
    max_new = (report.get("config") or {}).get("max_new_tokens") or 24
    models = []
    for variant in chosen:
        spec = read_spec(run / variant)
        generation_files(run, variant, spec)  # every graph in place, inside the run
        kind = str(spec.get("kind", "llava"))
        blip = kind in BLIP_KINDS  # BLIP captioning (prompt: optional caption start) / VQA
        pixels = (BlipPromptEncoder(processor_dir(run, report), name, spec) if blip else
                  PromptEncoder(processor_dir(run, report), name, int(spec["context"]))
                  ).pixel_shape
        # byte strings travel as UINT8 (see _triton_generate_model.py: the wheel's stub
        # misreads Triton's BYTES type under numpy 2)
        # ragged: the scheduler may hand prompts and files of different lengths to one execute
        # (the model pads them itself); without it only same-length requests are batched.
        # A BLIP model's prompt is optional to Triton: captioning falls back to the run's
        # caption prompt, and a VQA request without its question gets the model's own
        # one-line refusal (not Triton's generic "missing required input")
        ins = [Tensor("prompt", "TYPE_UINT8", "uint8", "UINT8", [-1], optional=blip, ragged=True),
               Tensor("image", "TYPE_UINT8", "uint8", "UINT8", [-1], optional=True, ragged=True),
               Tensor("pixel_values", "TYPE_FP32", "float32", "FP32", list(pixels), optional=True),
               Tensor("max_new_tokens", "TYPE_INT32", "int32", "INT32", [1], optional=True)]
        outs = [Tensor("text", "TYPE_UINT8", "uint8", "UINT8", [-1]),
                Tensor("token_ids", "TYPE_INT64", "int64", "INT64", [-1]),
                Tensor("num_tokens", "TYPE_INT32", "int32", "INT32", [1])]
        models.append(TritonModel(
            name=f"{variant}_{GENERATE}", variant=variant, tower=GENERATE, source=variant,
            reference_onnx=posixpath.normpath(f"{variant}/{spec['files']['decoder']}"),
            max_batch_size=max_batch, inputs=ins, outputs=outs,
            vocab_size=int(spec["vocab_size"]),
            rule=rule + batches.get(kind, "each batch is one left-padded generate call"),
            max_queue_delay_microseconds=GENERATE_DELAY_US,
            precision=available[variant]["precision"], reference=variant,
            parameters={"model_name": name, "max_new_tokens": str(max_new), "kind": kind}))
    return models, "cpu"


def generative_variants(run: Path) -> dict[str, dict]:
    """Every generative export a run folder holds: label -> ``{"precision"}``, one per
    folder directly in the run with a ``generation.json`` (``dense``, ``pruned``; with
    ``--fp16`` / ``--quantize int8`` also ``dense_fp16`` ... ``pruned_int8``; with
    ``--visual-tokens`` ``dense_tokens``, ``pruned_tokens`` and their precision twins
    ``dense_tokens_int8`` ...), in that order. ``precision`` is the served graphs' (the
    spec's ``quantize``, else its ``precision``: fp32, fp16, int8)."""
    from ..runtime.ort_generate import read_spec

    found = {}
    for d in sorted(p for p in run.iterdir() if (p / "generation.json").is_file()):
        spec = read_spec(d)
        found[d.name] = {"precision": str(spec.get("quantize") or spec.get("precision", "fp32"))}

    def order(name: str):
        base, _, rest = name.partition("_")
        tokens = rest == "tokens" or rest.startswith("tokens_")
        precision = rest[len("tokens"):].lstrip("_") if tokens else rest
        return (tokens, bool(precision), precision, VARIANTS.index(base)
                if base in VARIANTS else len(VARIANTS), name)

    return {v: found[v] for v in sorted(found, key=order)}


def generation_files(run: Path, variant: str, spec: dict) -> dict[str, Path]:
    """part -> the run's file a generation model of ``variant`` serves for it: its own graphs,
    and for a ``--visual-tokens`` variant its full-token twin's embed and decoder, which its
    ``generation.json`` names by relative path (``../dense/decoder.onnx``). One ConfigError
    line when a file is missing or lies outside the run folder, or two parts share a name."""
    root = run.resolve()
    out, names = {}, {}
    for part, rel in spec["files"].items():
        path = (run / variant / rel).resolve()
        if root not in path.parents:
            raise ConfigError(f"{variant}/generation.json names {rel!r} for its {part} graph, "
                              f"outside the run folder {str(run)!r}; allowed: files inside it")
        if not path.is_file():
            raise ConfigError(f"run folder {str(run)!r} lacks "
                              f"{posixpath.normpath(f'{variant}/{rel}')}; allowed: a "
                              "prune-export folder with its generative export in place")
        if path.name in names and names[path.name] != path:
            raise ConfigError(f"{variant}/generation.json names two graphs called {path.name!r} "
                              f"({names[path.name]}, {path}); allowed: one file name per part")
        names[path.name] = path
        out[part] = path
    return out


def _write_generate_model(run: Path, report: dict, m: TritonModel, folder: Path) -> None:
    """``1/`` of a generation model: exactly the graphs its variant's generation loop runs
    (:func:`generation_files`: a token variant's own vision graph and its twin's embed and
    decoder), each under its file name, with the generation.json naming them there; the run's
    processor files; and model.py."""
    from ..runtime.ort_generate import read_spec

    spec = read_spec(run / m.source)
    files = generation_files(run, m.source, spec)
    for path in files.values():
        _link_or_copy(path, folder / path.name)
        data = path.with_name(path.name + ".data")
        if data.is_file():
            _link_or_copy(data, folder / data.name)
    served = {**spec, "files": {p: f.name for p, f in files.items()}}
    if served["files"] != spec["files"]:  # where each graph came from, relative to the run
        served["served_from"] = {p: f.relative_to(run.resolve()).as_posix()
                                 for p, f in files.items()}
    (folder / "generation.json").write_text(json.dumps(served, indent=2), encoding="utf-8")
    (folder / "processor").mkdir()
    for f in sorted(processor_dir(run, report).iterdir()):
        if f.is_file() and f.suffix in _PROCESSOR_SUFFIXES and f.name != "vlcompress.json":
            shutil.copyfile(f, folder / "processor" / f.name)
    source = GENERATE_MODEL_FILES.get(str(spec.get("kind", "llava")), GENERATE_MODEL_FILES["llava"])
    shutil.copyfile(Path(__file__).with_name(source), folder / "model.py")


def _plan(run: Path, backend: str, device: str | None, variants) -> tuple[list[TritonModel], str]:
    report = _read_report(run)
    if is_generative(report):
        return _plan_generative(run, report, backend, device, variants)
    available = run_variants(run, report)
    chosen = check_variants(variants, available, backend, run)
    run_device = (report.get("config", {}).get("runtime") or {}).get("device", "cpu")
    if device is None:
        device = "gpu" if backend == "tensorrt" or (backend == "onnxruntime" and run_device == "cuda") \
            else "cpu"
    rows = report.get("latency") or []
    engine_max = None
    if backend == "tensorrt" and run_batch_sizes(report):
        from .tensorrt import profile_batch_range

        engine_max = profile_batch_range(run_batch_sizes(report))[1]
    models, missing = [], []
    for variant in chosen:
        info = available[variant]
        for tower in TOWERS:
            folder = info["folders"].get(tower, variant)
            onnx_path = run / folder / f"{tower}.onnx"
            engine = run / folder / f"{tower}.engine"
            if not onnx_path.is_file():
                if engine.is_file() or (run / folder / f"{tower}.onnx.data").is_file() or \
                        tower in info["folders"]:
                    missing.append(str(onnx_path))
                continue
            if backend == "tensorrt" and not engine.is_file():
                raise ConfigError(f"--backend tensorrt needs the run's TensorRT engines, and "
                                  f"{str(engine)!r} does not exist; allowed: a run made with "
                                  "--engine trt, or --backend onnxruntime|python")
            ins, outs, batched = _onnx_io(onnx_path)
            mb, pref, delay, rule = batching_rule([r for r in rows if r.get("tower") == tower],
                                                  f"{variant}_ms")
            max_batch = (engine_max or mb or 8) if batched else 0
            if engine_max is not None and batched:
                pref = [b for b in pref if b <= engine_max]
                rule += (f"; max_batch_size {engine_max} = the engine profiles' maximum (they "
                         f"accept every batch 1..{engine_max})")
            if not batched:
                pref, rule = [], rule + "; the ONNX has a fixed batch axis: no batching"
            models.append(TritonModel(
                name=f"{variant}_{tower}", variant=variant, tower=tower,
                source=f"{folder}/{(engine if backend == 'tensorrt' else onnx_path).name}",
                reference_onnx=f"{folder}/{onnx_path.name}", max_batch_size=max_batch,
                inputs=_tensors(ins, batched), outputs=_tensors(outs, batched),
                preferred_batch_size=pref, max_queue_delay_microseconds=delay, rule=rule,
                vocab_size=_vocab_size(run, tower), precision=info["precision"],
                reference=info["reference"]))
    if missing:
        raise ConfigError(f"run folder {str(run)!r} lacks {', '.join(missing)}; allowed: a "
                          "prune-export folder with <dense|pruned>/<tower>.onnx")
    if not models:
        raise ConfigError(f"run folder {str(run)!r} has no ONNX files (dense/<tower>.onnx, "
                          "pruned/<tower>.onnx); allowed: a `vlcompress prune-export --out` folder")
    return models, device


def model_config_text(m: TritonModel, backend: str, device: str, *, threads: int = 0) -> str:
    """``config.pbtxt`` of one model (protobuf text format of Triton's ModelConfig)."""
    def tensors(kind, ts):
        body = ",\n".join(f'  {{ name: "{t.name}" data_type: {t.data_type} dims: [ '
                          f'{", ".join(str(d) for d in t.dims)} ]'
                          + (" optional: true" if t.optional else "")
                          + (" allow_ragged_batch: true" if t.ragged else "") + " }" for t in ts)
        return f"{kind} [\n{body}\n]"

    lines = [f'name: "{m.name}"']
    if backend == "tensorrt":
        lines.append('platform: "tensorrt_plan"')
    else:
        lines.append(f'backend: "{backend}"')
    lines += [f"max_batch_size: {m.max_batch_size}", tensors("input", m.inputs),
              tensors("output", m.outputs)]
    if m.max_batch_size > 0:
        pref = "".join(f"\n  preferred_batch_size: {b}" for b in m.preferred_batch_size)
        lines.append(f"dynamic_batching {{{pref}\n  max_queue_delay_microseconds: "
                     f"{m.max_queue_delay_microseconds}\n}}")
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [ {{ kind: {kind} count: 1 }} ]")
    if backend == "python":
        if m.tower != GENERATE:
            lines.append('parameters { key: "onnx_file" value: { string_value: "model.onnx" } }')
        lines.append(f'parameters {{ key: "intra_op_threads" value: {{ string_value: "{threads}" }} }}')
        if m.vocab_size:  # token ids checked per request against it (_triton_model.py)
            lines.append(f'parameters {{ key: "vocab_size" value: {{ string_value: "{m.vocab_size}" }} }}')
        for k, v in m.parameters.items():
            value = json.dumps(str(v), ensure_ascii=False)
            lines.append(f'parameters {{ key: "{k}" value: {{ string_value: {value} }} }}')
    return "\n".join(lines) + "\n"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no copy of a large ONNX
    except OSError:
        shutil.copy2(src, dst)


#: what ``prompt`` is to a generation model, by its kind (README and snippet)
_PROMPT_MEANING = {
    "blip-caption": ("a picture of", "`prompt` is optional: the caption's start (absent: the "
                     "run's caption prompt, from `1/generation.json`; an empty row: none); the "
                     "answer is the caption after it"),
    "blip-vqa": ("what color is the shape?", "`prompt` is the question, required (a request "
                 "without one, or with a blank one, is refused in one line)"),
}


def _generate_snippet(m: TritonModel) -> str:
    px = ", ".join(map(str, next(t.dims for t in m.inputs if t.name == "pixel_values")))
    example, meaning = _PROMPT_MEANING.get(m.parameters.get("kind", "llava"), (
        "describe the picture.", "`prompt` is the user's text, rendered with the model's chat "
        "template"))
    return "\n".join([
        f"### `{m.name}`", "", "```python", "import numpy as np",
        "import tritonclient.http as httpclient", "",
        'client = httpclient.InferenceServerClient("127.0.0.1:8000")',
        "# byte strings travel as UINT8 rows [batch, n] (right-padded with zero bytes)",
        'image = np.frombuffer(open("photo.png", "rb").read(), np.uint8)[None]',
        f'prompt = np.frombuffer("{example}".encode(), np.uint8)[None]',
        "new = np.array([[24]], dtype=np.int32)  # optional: max_new_tokens",
        "inputs = []",
        'for name, a, t in (("image", image, "UINT8"), ("prompt", prompt, "UINT8"),',
        '                   ("max_new_tokens", new, "INT32")):',
        "    x = httpclient.InferInput(name, list(a.shape), t)",
        "    x.set_data_from_numpy(a)",
        "    inputs.append(x)",
        f'res = client.infer("{m.name}", inputs)',
        'text = res.as_numpy("text")[0].tobytes().rstrip(b"\\0").decode()  # the answer',
        'ids = res.as_numpy("token_ids")[0]  # new token ids, padded with -1',
        "```", "",
        f"{meaning}. Instead of `image`, `pixel_values` (FP32 `[batch, {px}]`, the processor's "
        f"output) may be sent. Default max_new_tokens: {m.parameters.get('max_new_tokens')}. "
        "`vlcompress.serve.generate_feeds` builds these inputs.", "", f"Batching: {m.rule}.", ""])


def _client_snippet(m: TritonModel) -> str:
    if m.tower == GENERATE:
        return _generate_snippet(m)
    shape = lambda t: [1] + [8 if d == -1 else d for d in t.dims] if m.max_batch_size else \
        [8 if d == -1 else d for d in t.dims]  # noqa: E731
    lines = [f"### `{m.name}`", "", "```python", "import numpy as np",
             "import tritonclient.http as httpclient", "",
             'client = httpclient.InferenceServerClient("127.0.0.1:8000")', "inputs = []"]
    for t in m.inputs:
        if t.numpy.startswith("int"):
            hi = m.vocab_size or 2
            data = f"np.random.randint(0, {hi}, size={shape(t)}).astype(np.{t.numpy})"
            if "mask" in t.name:
                data = f"np.ones({shape(t)}, dtype=np.{t.numpy})"
        else:
            data = f"np.random.rand(*{shape(t)}).astype(np.{t.numpy})"
        lines += [f'x = httpclient.InferInput("{t.name}", {shape(t)}, "{t.datatype}")',
                  f"x.set_data_from_numpy({data})", "inputs.append(x)"]
    outs = ", ".join(f'httpclient.InferRequestedOutput("{o.name}")' for o in m.outputs)
    lines += [f'res = client.infer("{m.name}", inputs, outputs=[{outs}])']
    lines += [f'{o.name} = res.as_numpy("{o.name}")  # {o.numpy}, shape {shape(o)}' for o in m.outputs]
    lines += ["```", "", f"Batching: {m.rule}.", ""]
    return "\n".join(lines)


def _readme(repo: TritonRepo) -> str:
    head = [f"# Triton model repository ({repo.backend} backend, {repo.device})", "",
            f"Written from the run `{repo.run_dir}` (`--backend {repo.backend}`). One "
            f"model per variant ({', '.join(dict.fromkeys(m.variant for m in repo.models))}) "
            "and tower; inputs and outputs are the run's ONNX.", "",
            "```bash", f"tritonserver --model-repository {repo.path.name}", "```", "",
            "`vlcompress serve-check REPO` starts the `tritonserver` of the `[serve]` extra on "
            "a free loopback port, sends each model a batch it accepts and several concurrent "
            "single requests (the dynamic batcher's path), and compares every answer with the "
            "run's PyTorch model (dense or pruned) at the tolerance of the served precision.", ""]
    gen = [m for m in repo.models if m.tower == GENERATE]
    if gen and gen[0].parameters.get("kind") in _PROMPT_MEANING:
        head[-1:] = ["For a BLIP captioning / VQA run, each `*_generate` model takes an image "
                     "(file bytes) and a prompt (the caption's start, optional; or the question) "
                     "and returns the answer: it runs vlcompress's greedy generation loop "
                     "(BlipOrtGenerator) on `1/vision.onnx`, (VQA) `1/question.onnx` and "
                     "`1/decoder.onnx` with the run's processor in `1/processor/`, so the "
                     "server's Python needs vlcompress installed. Each row gets the answer it "
                     "gets alone, whatever requests the batcher merges. `serve-check` compares "
                     "its tokens one for one with the direct BlipOrtGenerator run of each row.",
                     ""]
    elif gen:
        head[-1:] = ["For a generative run, each `*_generate` model takes an image (file bytes) "
                     "and a prompt and returns the answer: it runs vlcompress's greedy generation "
                     "loop (OrtGenerator) on `1/vision.onnx`, `1/embed.onnx`, `1/decoder.onnx` "
                     "with the run's processor in `1/processor/`, so the server's Python needs "
                     "vlcompress installed. `serve-check` compares its tokens one for one with "
                     "the direct OrtGenerator run on the same inputs.", ""]
    elif repo.backend == "python":
        head += ["The Python backend runs `1/model.onnx` with onnxruntime: the server's Python "
                 "needs numpy and onnxruntime.", ""]
    return "\n".join(head + [_client_snippet(m) for m in repo.models])


def _check_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"threads {threads!r} is not valid; allowed: an integer >= 0 (0 = "
                          "onnxruntime's default)")
    return threads


def _check_out_vs_run(out: Path, run: Path, force: bool) -> None:
    """The repository must not be the run folder, nor hold it: ``--force`` replaces ``out``."""
    o, r = out.resolve(), run.resolve()
    if o == r or o in r.parents:
        raise ConfigError(f"--out {str(out)!r} is the run folder or holds it"
                          + (", and --force would delete the run" if force else "")
                          + "; allowed: a new folder, e.g. inside the run (RUN/triton)")


def export_triton(run_dir: str | Path, out: str | Path, *, backend: str | None = None,
                  device: str | None = None, variants=None, threads: int = 0,
                  force: bool = False) -> TritonRepo:
    """Write a Triton model repository for ``run_dir`` into ``out`` (new, or empty, or
    ``force``); every check runs before anything is written, and ``out`` appears complete or
    not at all. ``variants``: the run's variants to serve (default: all it holds, quantized
    ones included, and for a generative run its token and precision variants; a list or
    ``"dense,pruned"``). ``backend``: default ``onnxruntime``, and
    ``python`` for a generative run (its only backend: one generation model per variant)."""
    run = Path(run_dir)
    if backend is None:
        backend = "python" if run.is_dir() and is_generative(_read_report(run)) else "onnxruntime"
    backend, device = check_triton_options(backend, device)
    threads = _check_threads(threads)
    _check_out_vs_run(Path(out), run, force)
    models, device = _plan(run, backend, device, variants)
    out = check_output_folder(out, force)
    out_abs, run_abs = Path(out).resolve(), run.resolve()
    run_rec = os.path.relpath(run_abs, out_abs) if run_abs in out_abs.parents else str(run_abs)
    with atomic_dir(out, overwrite=force) as tmp:
        for m in models:
            folder = tmp / m.name / "1"
            folder.mkdir(parents=True)
            src = run / m.source
            if m.tower == GENERATE:
                _write_generate_model(run, _read_report(run), m, folder)
            elif backend == "tensorrt":
                _link_or_copy(src, folder / "model.plan")
            else:
                _link_or_copy(src, folder / "model.onnx")
                data = src.with_name(src.name + ".data")
                if data.is_file():
                    _link_or_copy(data, folder / data.name)
                if backend == "python":
                    shutil.copyfile(Path(__file__).with_name("_triton_model.py"), folder / "model.py")
            (tmp / m.name / "config.pbtxt").write_text(
                model_config_text(m, backend, device, threads=threads), encoding="utf-8")
        repo = TritonRepo(Path(out), run_rec, backend, device, models)
        (tmp / "README.md").write_text(_readme(repo), encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(repo.to_dict(), indent=2) + "\n", encoding="utf-8")
    return repo
