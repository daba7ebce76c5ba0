"""``prune_export``: the whole job, load -> ... -> report, as one Python call.

Everything is validated before any work starts; the output is assembled in a temporary
sibling folder and renamed into place only when complete, so a failure leaves nothing at
``out``.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict, dataclass, field

from .atomic import atomic_dir, check_output_folder  # noqa: F401 (re-exported)
from .config import PruneConfig, parse_batch_sizes
from .errors import ConfigError
from .methods.registry import get_method
from .progress import NULL
from .runtime.registry import (
    ENGINE,
    MODEL,
    ONNX,
    LatencyConfig,
    expected_speedup,
    get_runtime,
    runtime_names,
)


@dataclass(frozen=True)
class RunConfig:
    """Every option of ``prune-export``; validated on construction."""

    model: str = "tiny-clip"
    method: str = "multiflow"
    sparsity: float | str | None = None
    pattern: str = "2:4"
    calibration: str = "shapes"
    calibration_size: int = 256
    eval_data: str | None = None  # default: the calibration source (shapes: its eval split)
    eval_size: int = 720
    train_data: str | None = None  # recovery / retraining; default: the calibration source
    train_size: int = 4096
    engine: str = "onnxruntime"  # a runtime of the registry (onnxruntime, torch, torch-2:4, trt, ...)
    out: str = "vlcompress-out"
    batch_sizes: tuple[int, ...] | str = (1, 8)
    device: str | None = None  # None: the runtime's first device (cpu; cuda for trt, torch-2:4)
    fp16: bool = False  # fp16 ONNX and runtime precision (trt and torch-2:4 are always fp16)
    force: bool = False
    skip_incompatible: bool = False
    scope: tuple[str, ...] | None = None
    tower: str | None = None  # keep one tower only ("vision", "text"); LLaVA-style vision towers
    seed: int = 0
    warmup: int = 5
    iterations: int = 30
    units: str | tuple[str, ...] = "heads,neurons"  # pattern structured only
    round_to: int | str = 8
    depth: int | str = 0
    recover_steps: int = 0  # distillation steps after pruning (vlcompress.recover), 0 = none
    # quantization on top of sparsity (vlcompress.exporters.quantize, vlcompress.quantized_variants)
    quantize: str = "none"  # none | int8 | fp16 | fp8: adds dense_<q> and pruned_<q> variants
    quantize_method: str = "static"  # int8: static QDQ (calibrated) or dynamic
    target_speedup: float | str | None = None  # prune to the lowest structured sparsity reaching it
    triton: str | None = None  # also write OUT/triton with this backend (exporters.triton)
    method_options: dict | None = None  # the method's own options (Method.options), checked
    # fit the survivors to the dense outputs after a scorer's mask (methods/reconstruct.py);
    # None: on wherever it applies (scoring methods at unstructured / N:M)
    reconstruct: bool | None = None
    # recovery: share of the training data held out for early stopping, and its cadence
    holdout_fraction: float = 0.0
    holdout_every: int = 25
    # generative models (llava): the parts pruned ("vision,bridge,language", a part=sparsity
    # each where given) and the greedy generation length of the evaluation
    parts: str | tuple[str, ...] | None = None
    max_new_tokens: int = 24
    # generative models: keep K of the vision tower's tokens (models/visual_tokens.py,
    # VisionZip); adds the dense_tokens and pruned_tokens variants
    visual_tokens: int | None = None
    cuda_graphs: bool = False  # torch on CUDA: time under CUDA-graph replay (runtime.graphs)
    # generative models bigger than memory: "disk" prunes and evaluates block by block from
    # the shards (methods/offload.py); no ONNX export then
    offload: str = "none"
    prune_config: PruneConfig = field(init=False, repr=False)
    latency_config: LatencyConfig = field(init=False, repr=False)

    def __post_init__(self):
        if self.offload != "none":  # before the options are completed with their defaults
            _check_offload_options(self)
        if self.target_speedup is not None and self.sparsity is not None:
            raise ConfigError(f"--target-speedup {self.target_speedup} chooses the sparsity; "
                              f"--sparsity {self.sparsity} is not allowed with it (allowed: "
                              "one of the two)")
        pc = PruneConfig(method=self.method, sparsity=self.sparsity, pattern=self.pattern,
                         scope=self.scope, skip_incompatible=self.skip_incompatible, seed=self.seed,
                         units=self.units, round_to=self.round_to, depth=self.depth,
                         method_options=self.method_options, reconstruct=self.reconstruct)
        object.__setattr__(self, "prune_config", pc)
        object.__setattr__(self, "method_options", dict(pc.method_options))
        object.__setattr__(self, "units", ",".join(pc.units))
        object.__setattr__(self, "round_to", pc.round_to)
        object.__setattr__(self, "depth", pc.depth)
        object.__setattr__(self, "sparsity", pc.sparsity)
        if str(self.engine).strip().lower() not in runtime_names() + ["trt", "ort"]:
            raise ConfigError(f"unknown engine {self.engine!r}; allowed: "
                              f"{', '.join(runtime_names())} (trt = tensorrt)")
        if not isinstance(self.calibration_size, int) or self.calibration_size < 1:
            raise ConfigError(f"calibration size {self.calibration_size!r} is not valid; "
                              "allowed: a positive integer")
        if not isinstance(self.eval_size, int) or self.eval_size < 1:
            raise ConfigError(f"eval size {self.eval_size!r} is not valid; allowed: a positive integer")
        if not isinstance(self.train_size, int) or self.train_size < 1:
            raise ConfigError(f"train size {self.train_size!r} is not valid; allowed: a positive "
                              "integer")
        object.__setattr__(self, "calibration", str(self.calibration))
        if self.eval_data is None:
            object.__setattr__(self, "eval_data", self.calibration)
        if self.train_data is None:
            object.__setattr__(self, "train_data", self.calibration)
        if isinstance(self.recover_steps, bool) or not isinstance(self.recover_steps, int) \
                or self.recover_steps < 0:
            raise ConfigError(f"recover steps {self.recover_steps!r} is not valid; allowed: an "
                              "integer >= 0")
        if self.holdout_fraction or self.holdout_every != 25:
            from .distill import EarlyStopping
            from .recover import check_holdout_fraction

            check_holdout_fraction(self.holdout_fraction, self.train_size)
            EarlyStopping(lambda: 0.0, self.holdout_every)  # checks the cadence
            if self.holdout_fraction and not self.recover_steps:
                raise ConfigError(f"--holdout-fraction {self.holdout_fraction:g} is for "
                                  "recovery; allowed: with --recover-steps N")
        if self.parts is not None:
            object.__setattr__(self, "parts", format_parts(parse_parts(self.parts)))
        from .eval.generative import check_max_new_tokens

        check_max_new_tokens(self.max_new_tokens)
        vt = self.visual_tokens
        if vt is not None and (isinstance(vt, bool) or not isinstance(vt, int) or vt < 1):
            raise ConfigError(f"--visual-tokens {vt} is not valid; allowed: a positive integer "
                              "(at most the tokens the model's vision tower produces)")
        bs = parse_batch_sizes(self.batch_sizes)
        object.__setattr__(self, "batch_sizes", bs)
        lc = LatencyConfig(batch_sizes=bs, warmup=self.warmup, iterations=self.iterations,
                           runtime=self.engine, device=self.device,
                           precision="fp16" if self.fp16 else None,
                           cuda_graphs=self.cuda_graphs)
        lc.runtime_entry.check_pattern(pc.pattern)
        if self.triton is not None:  # --triton BACKEND: checked before any work
            from .exporters.triton import check_triton_options

            tb, _ = check_triton_options(self.triton)
            if tb == "tensorrt" and lc.runtime_entry.consumes != ENGINE:
                raise ConfigError(f"--triton tensorrt needs the run's TensorRT engines, and engine "
                                  f"{self.engine!r} builds none; allowed: --engine trt, or --triton "
                                  "onnxruntime|python")
            object.__setattr__(self, "triton", tb)
        object.__setattr__(self, "device", lc.device)
        object.__setattr__(self, "latency_config", lc)
        self._check_quantize()
        if self.triton not in (None, "tensorrt"):  # OUT/triton serves the quantized variants too
            from .exporters.triton import TENSORRT_ONLY

            if self.quantize in TENSORRT_ONLY:
                raise ConfigError(f"--triton {self.triton} cannot serve the run's {self.quantize} "
                                  f"variants (explicit QDQ made for TensorRT); allowed: --triton "
                                  f"tensorrt, or no --triton (export-triton --variants dense,pruned "
                                  "afterwards)")

    def _check_quantize(self):
        """--quantize / --quantize-method / --target-speedup, with the runtime (one line each)."""
        from .exporters.quantize import check_quantize, check_quantize_runtime
        from .speedup_search import check_target_speedup

        q = check_quantize(self.quantize, self.quantize_method)
        object.__setattr__(self, "quantize", q)
        check_quantize_runtime(q, self.latency_config.runtime_entry, self.quantize_method)
        if q != "none" and self.fp16:
            raise ConfigError(f"--quantize {q} quantizes the fp32 export; drop --fp16 (the "
                              "report times fp32 and quantized variants side by side)")
        ts = check_target_speedup(self.target_speedup)
        object.__setattr__(self, "target_speedup", ts)
        if ts is not None and not self.prune_config.pattern.is_structured:
            raise ConfigError(f"--target-speedup searches structured sparsities; pattern "
                              f"{self.prune_config.pattern} is not allowed with it (allowed: "
                              "--pattern structured)")

    @property
    def onnx_fp16(self) -> bool:
        """Whether the ONNX files are fp16: ``--fp16``, or a runtime that runs fp16 ONNX or
        engines built from it (TensorRT engines are built from fp16 ONNX, strongly typed)."""
        rt = self.latency_config.runtime_entry
        return self.fp16 or (rt.consumes in (ONNX, ENGINE) and rt.precision == "fp16")

    @property
    def quantize_fp32_export(self) -> bool:
        """Whether ``--quantize`` needs an fp32 export of each variant beside the run's own:
        int8 / fp8 quantize an fp32 graph, and the run's ONNX is fp16 (``--engine trt``: the
        float engines are built from fp16 ONNX, the int8 / fp8 ones from QDQ ONNX quantized
        from fp32)."""
        return self.quantize in ("int8", "fp8") and self.onnx_fp16

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("prune_config", "latency_config")}
        d["pattern"] = str(self.prune_config.pattern)
        d["batch_sizes"] = list(self.batch_sizes)
        lc = self.latency_config
        d["runtime"] = {"name": lc.runtime, "device": lc.device, "precision": lc.precision}
        d["precision"] = lc.precision
        return d


def parse_parts(parts) -> dict[str, float | None]:
    """``"vision,language=0.6"`` (or a tuple of such items) -> ``{part: sparsity or None}``
    (None: the run's ``--sparsity``); one line for a malformed item or sparsity."""
    from .config import check_sparsity

    items = parts.split(",") if isinstance(parts, str) else list(parts)
    out: dict[str, float | None] = {}
    for item in (i.strip() for i in items):
        name, _, value = item.partition("=")
        name = name.strip()
        if not name or name in out:
            raise ConfigError(f"--parts {parts!r} is not valid; allowed: distinct part names, "
                              "comma-separated, each optionally =SPARSITY (vision,language=0.6)")
        try:
            out[name] = check_sparsity(float(value)) if value.strip() else None
        except ValueError:
            raise ConfigError(f"--parts {name}={value!r}: the sparsity is not valid; allowed: a "
                              "number in [0, 1)") from None
    if not out:
        raise ConfigError("--parts is empty; allowed: part names such as vision,bridge,language")
    return out


def format_parts(parts: dict[str, float | None]) -> str:
    return ",".join(k if v is None else f"{k}={v:g}" for k, v in parts.items())


def _check_offload_options(cfg: RunConfig) -> None:
    """One line for what ``prune-export --offload disk`` cannot do (the model, method,
    pattern, folder and free disk are checked by :func:`vlcompress.methods.offload.check_offload`
    in :func:`check_run`)."""
    from .methods.offload import OFFLOAD_MODES

    if cfg.offload not in OFFLOAD_MODES:
        raise ConfigError(f"--offload {cfg.offload!r}; allowed: {', '.join(OFFLOAD_MODES)}")
    refused = [(f"--method-option {','.join(cfg.method_options)}", "the offloaded methods take "
                "no options") if cfg.method_options else None,
               (f"--recover-steps {cfg.recover_steps}", "recovery trains the whole model in "
                "memory") if cfg.recover_steps else None,
               (f"--target-speedup {cfg.target_speedup}", "it searches on a resident model")
               if cfg.target_speedup is not None else None,
               ("--reconstruct", "it fits a scorer's masks on a resident model")
               if cfg.reconstruct else None]
    if cfg.parts is not None and any(v is not None for v in parse_parts(cfg.parts).values()):
        refused.append((f"--parts {cfg.parts}", "one sparsity for every part offloaded"))
    hit = next((r for r in refused if r), None)
    if hit:
        raise ConfigError(f"{hit[0]} is not available with --offload {cfg.offload} ({hit[1]}); "
                          "allowed: wanda or wanda-seq, unstructured or N:M, part names alone")


def check_engine(engine: str, device: str | None = None, precision: str | None = None) -> None:
    """Fail before any work when the runtime ``(engine, device, precision)`` does not exist
    (ConfigError) or cannot run here (MissingDependencyError: one sentence, exit 2)."""
    get_runtime(engine, device, precision).check()


def _describe(data) -> str:
    return f"{getattr(data, 'source', '') or 'pairs'} (n={len(data)})"


def check_run(cfg: RunConfig):
    """Every combination the run involves, checked before any data or weights are loaded:
    method x pattern (RunConfig did), x the model's family (from its config alone), x data."""
    from .methods.registry import check_family
    from .models import peek_model
    from .models.registry import families

    info = peek_model(cfg.model, tower=cfg.tower)
    if cfg.offload != "none":
        from .methods.offload import check_offload

        if not info.generative:
            raise ConfigError(f"--offload {cfg.offload} in prune-export is for generative models "
                              f"(llava) bigger than memory; {cfg.model} is {info.family} (allowed: "
                              "a llava folder; vlcompress prune --offload disk for other folders)")
        check_offload(cfg.offload, cfg.method, str(cfg.prune_config.pattern), cfg.model, cfg.out)
    method = get_method(cfg.method)
    check_family(method, cfg.prune_config.pattern, info)
    if info.generative:  # pruned, recovered, evaluated in PyTorch, exported to fp32 ONNX, timed
        if cfg.triton not in (None, "python"):
            raise ConfigError(f"--triton {cfg.triton} cannot serve the generative model "
                              f"{cfg.model}: its token loop runs in a Python-backend generation "
                              "model; allowed: --triton python")
        unused = [f"--{k.replace('_', '-')} {v}" for k, v in (
            ("engine", cfg.engine if cfg.engine != "onnxruntime" else None),
            ("target_speedup", cfg.target_speedup),
            ("cuda_graphs", cfg.cuda_graphs or None))
            if v is not None]
        if unused:
            raise ConfigError(f"{unused[0]} is not available for the generative model "
                              f"{cfg.model} ({info.family}): it is pruned and evaluated in "
                              "PyTorch and exported to ONNX (no runtime choice yet)")
        from .exporters.generative_quant import check_generative_precision

        check_generative_precision(cfg.quantize, cfg.quantize_method, cfg.fp16,
                                   cfg.latency_config.runtime_entry)  # --fp16 / --quantize int8
    if cfg.visual_tokens is not None:
        if not info.generative:
            raise ConfigError(f"--visual-tokens {cfg.visual_tokens} keeps image tokens of a "
                              f"generative model (llava); {cfg.model} ({info.family}) is not "
                              "one; allowed: a generative model, or no --visual-tokens")
        if info.family != "llava":
            raise ConfigError(f"--visual-tokens {cfg.visual_tokens} reduces the image tokens a "
                              f"LLaVA decoder reads; {cfg.model} ({info.family}) feeds its "
                              "decoder otherwise; allowed: a llava model, or no --visual-tokens")
        if cfg.offload != "none":
            raise ConfigError(f"--visual-tokens {cfg.visual_tokens} is not available with "
                              f"--offload {cfg.offload} (no ONNX export there); allowed: one of "
                              "the two")
        from .models import peek_config
        from .models.visual_tokens import check_visual_tokens, tower_tokens

        check_visual_tokens(cfg.visual_tokens, tower_tokens(peek_config(cfg.model)), cfg.model)
    if cfg.parts is not None:
        if not info.generative:
            raise ConfigError(f"--parts chooses the parts of a generative model (llava); "
                              f"{cfg.model} ({info.family}) has towers: use --tower or --scope")
        bad = [p for p in parse_parts(cfg.parts) if p not in info.towers]
        if bad:
            raise ConfigError(f"--parts {bad[0]} is not a part of {cfg.model} ({info.family}); "
                              f"allowed: {', '.join(info.towers)}")
        fam = next(c for c in families().values() if c.family == info.family)  # by family name
        sliceable = getattr(fam, "structured_parts", info.towers)  # (blip2's model_type: blip-2)
        if cfg.prune_config.pattern.is_structured and \
                not any(p in sliceable for p in parse_parts(cfg.parts)):
            raise ConfigError(f"--pattern structured cannot slice --parts {cfg.parts} of "
                              f"{cfg.model} ({info.family}): no heads or neurons there; allowed "
                              f"parts: {', '.join(sliceable)}")
        if cfg.prune_config.pattern.is_nm and any(v is not None for v in parse_parts(cfg.parts).values()):
            raise ConfigError(f"--parts with a sparsity: pattern {cfg.prune_config.pattern} fixes "
                              "the sparsity; allowed: part names alone, or --pattern unstructured")
    if cfg.prune_config.scope is not None:
        bad = [m for m in cfg.prune_config.scope if m not in info.towers]
        if bad:
            raise ConfigError(f"scope {','.join(bad)} is not a modality of {cfg.model} "
                              f"({info.family}); allowed: {', '.join(info.towers)}")
    check_data_sources(cfg, info)
    return info


def check_data_sources(cfg: RunConfig, info) -> None:
    """Each data source exists and holds what the model reads (images for a vision or fusion
    tower): one line naming the option and what is allowed, before any data is loaded."""
    from .data import source_kind
    from .models.registry import families

    needs_images = any(t in ("vision", "fusion") for t in info.towers)
    sources = [("--calibration", cfg.calibration), ("--eval-data", cfg.eval_data)]
    if cfg.recover_steps or get_method(cfg.method).retrain is not None:
        sources.append(("--train-data", cfg.train_data))
    for option, src in sources:
        kind = source_kind(src)  # raises DataError for a missing or unreadable source
        if kind == "vqa" and info.generative and \
                not getattr(families().get(info.family), "answers_questions", True):
            raise ConfigError(f"{option} {src!r} holds questions and answers (vqa.jsonl), and "
                              f"{cfg.model} ({info.family}) captions images, answering no "
                              "questions; allowed: a folder with captions.jsonl, or a VQA model "
                              "(BlipForQuestionAnswering, llava)")
        if kind == "vqa" and not info.generative:
            raise ConfigError(f"{option} {src!r} holds questions and answers (vqa.jsonl), which "
                              f"{cfg.model} ({info.family}) does not read; allowed: image-caption "
                              "pairs (a folder with captions.jsonl)")
        if needs_images and kind == "text":
            raise ConfigError(f"{option} {src!r} holds text only, but {cfg.model} "
                              f"({info.family}, towers: {', '.join(info.towers)}) needs images; "
                              "allowed: image-caption pairs (a folder with captions.jsonl), or "
                              "text only with --tower text")


def data_notes(cfg: RunConfig, is_preset: bool) -> list[str]:
    """What the report says about data the user did not choose explicitly."""
    notes = []
    if cfg.eval_data == cfg.calibration and cfg.calibration != "shapes":
        notes.append(f"evaluated on the calibration source {cfg.calibration!r} (no --eval-data "
                     "given): the first pairs overlap the calibration pairs")
    if is_preset:
        notes.append("preset with random weights: accuracy is fidelity to the dense model only")
    return notes


def export_examples(calib):
    """(export batch of 3 pairs, validation batch of 2) from the first calibration pairs (the
    pairs are repeated when there are fewer than 5)."""
    from .runtime.latency import resize_batch

    first = next(iter(calib.batches()))
    five = resize_batch(first, 5) if len(first) < 5 else first
    return resize_batch(five, 3), _slice_batch(five, 3, 5)


def _slice_batch(batch, a: int, b: int):
    return type(batch)(*(None if v is None else v[a:b] for v in vars(batch).values()))


def prune_export(config: RunConfig | None = None, progress=NULL, **kw) -> dict:
    """Run the whole pipeline and return the report (also written to ``config.out``).

    load -> evaluate dense -> export dense -> calibrate/score/mask/apply -> evaluate pruned
    -> export pruned -> save pruned model -> latency dense vs pruned -> report.
    """
    from .data import load_calibration, load_eval, load_train
    from .envinfo import env_info
    from .eval import embed_eval, fidelity, metrics_from_embeddings
    from .exporters.onnx import export_model
    from .flops import size_section, tower_size
    from .models import load_model
    from .prune import prune
    from .report import accuracy_section, build_report, write_report
    from .run_latency import time_dense_pruned

    cfg = config or RunConfig(**kw)
    out = check_output_folder(cfg.out, cfg.force)
    check_engine(cfg.engine, cfg.device, cfg.latency_config.precision)
    if cfg.quantize != "none":  # the entry the quantized variants run on (TensorRT int8 / fp8)
        from .quantized_variants import quantized_runtime

        quantized_runtime(cfg.latency_config.runtime_entry, cfg.quantize).check()
    info = check_run(cfg)  # method x pattern x family x data, from the model's config alone
    if info.generative and cfg.offload != "none":
        return _prune_export_offloaded(cfg, out, progress)
    if info.generative:
        return _prune_export_generative(cfg, out, progress)
    t_start = time.perf_counter()
    calib = load_calibration(cfg.calibration, n=cfg.calibration_size, batch_size=32, seed=cfg.seed)
    vlm = load_model(cfg.model, tower=cfg.tower)
    if cfg.prune_config.pattern.is_structured:  # heads / depth the model cannot lose: fail now
        from .sparsity.structured import check_structured

        check_structured(vlm, cfg.prune_config)
    is_preset = vlm.source.startswith("preset:")
    # A preset has random weights: no accuracy to measure, only fidelity to the dense model.
    eval_data = load_eval(cfg.eval_data, n=min(32, cfg.eval_size) if is_preset else cfg.eval_size)
    train = None
    if cfg.recover_steps or get_method(cfg.method).retrain is not None:
        train = load_train(cfg.train_data, n=cfg.train_size, seed=cfg.seed)
        if cfg.holdout_fraction:  # the slice must leave pairs to train on: checked now
            from .recover import check_holdout_fraction

            check_holdout_fraction(cfg.holdout_fraction, len(train))
    # Export examples (and latency inputs): the first calibration pairs, an export batch of 3
    # and a validation batch of 2 (another batch size and text length).
    example, check = export_examples(calib)
    data_section = {
        "calibration": _describe(calib), "eval": _describe(eval_data),
        "train": _describe(train) if train is not None else None,
        "export_examples": f"the first {len(example) + len(check)} calibration pairs",
        "latency_inputs": "the first calibration pairs, repeated to each batch size",
        "notes": data_notes(cfg, is_preset),
    }

    with atomic_dir(out, overwrite=cfg.force) as tmp:
        dense_emb = embed_eval(vlm, eval_data, progress) if eval_data is not None else None
        dense_export = export_model(vlm, tmp / "dense", example, check,
                                    fp16=cfg.onnx_fp16, progress=progress)
        quant_src = tmp / ".quantize-src"  # fp32 exports to quantize from (fp16 runs only)
        quant_sources = None
        if cfg.quantize_fp32_export:
            quant_sources = {"dense": dict(export_model(vlm, quant_src / "dense", example, check,
                                                        progress=progress).paths)}
        rt = cfg.latency_config.runtime_entry
        dense_model = copy.deepcopy(vlm.model) if rt.consumes == MODEL else None
        dense_size = tower_size(vlm)
        pc = cfg.prune_config
        teacher = None
        if cfg.recover_steps:
            from .distill import dense_copy

            teacher = dense_copy(vlm)
        sparsity, search = pc.sparsity, None
        if cfg.target_speedup is not None:  # measured: lowest structured sparsity meeting it
            from .speedup_search import run_search

            search = run_search(cfg, vlm, calib, train, dense_export, dense_emb, eval_data,
                                example, check, tmp / ".search", progress)
            sparsity = search.sparsity
        result = prune(vlm, cfg.method, sparsity, str(pc.pattern),
                       calibration=calib, train=train, scope=cfg.scope,
                       skip_incompatible=cfg.skip_incompatible, seed=cfg.seed, units=pc.units,
                       round_to=pc.round_to, depth=pc.depth, method_options=pc.method_options,
                       progress=progress, reconstruct=cfg.reconstruct)
        if teacher is not None:  # distil the dense model into the pruned one, pattern kept
            from .recover import recover

            before = (fidelity(dense_emb, embed_eval(vlm, eval_data, progress))
                      if dense_emb is not None else None)
            rec = recover(vlm, steps=cfg.recover_steps, teacher=teacher, data=train,
                          seed=cfg.seed, progress=progress, n=len(train),
                          holdout_fraction=cfg.holdout_fraction,
                          holdout_every=cfg.holdout_every).to_dict()
            rec["fidelity_before"] = before  # the report's accuracy is after recovery
            result.details["recover"] = rec
            if rec["recipe"]:  # lr / loss weights the user did not set came from the model
                from .recover import describe_recipe

                data_section["notes"].append(describe_recipe(rec["recipe"]))
            teacher = None
        accuracy = None
        if dense_emb is not None:
            pruned_emb = embed_eval(vlm, eval_data, progress)
            if is_preset:
                accuracy = accuracy_section(f"{eval_data.source} (n={len(eval_data)}; preset: "
                                            "random weights, fidelity only)", {}, {},
                                            fidelity(dense_emb, pruned_emb))
            else:
                accuracy = accuracy_section(eval_data.source, metrics_from_embeddings(dense_emb),
                                            metrics_from_embeddings(pruned_emb),
                                            fidelity(dense_emb, pruned_emb))
        pruned_export = export_model(vlm, tmp / "pruned", example, check,
                                     fp16=cfg.onnx_fp16, progress=progress)
        vlm.save(tmp / "pruned" / "model")
        if quant_sources is not None:
            quant_sources["pruned"] = dict(export_model(vlm, quant_src / "pruned", example, check,
                                                        progress=progress).paths)
        quant = None
        if cfg.quantize != "none":  # dense_<q>/ and pruned_<q>/, their accuracy and latency
            from .quantized_variants import quantized_section

            quant, latency = quantized_section(cfg, vlm, calib, dense_export, pruned_export,
                                               dense_emb, eval_data, example, tmp, progress,
                                               sources=quant_sources)
            shutil.rmtree(quant_src, ignore_errors=True)
        else:
            latency = time_dense_pruned(cfg, vlm, dense_model, dense_export, pruned_export,
                                        example, progress, tmp)
        total, nonzero = vlm.num_parameters()
        report = build_report(
            model={"name": cfg.model, "family": vlm.family, "source": vlm.source,
                   "params_total": total, "params_nonzero": nonzero,
                   "towers": size_section(dense_size, tower_size(vlm))},
            prune=result.to_dict(),
            export={"format": "onnx",
                    # what was written, not the flag: fp16 when both variants are fp16
                    "fp16": bool(dense_export.fp16 and pruned_export.fp16),
                    "precision": {"dense": "fp16" if dense_export.fp16 else "fp32",
                                  "pruned": "fp16" if pruned_export.fp16 else "fp32"},
                    "paths": {"dense": {t: f"dense/{t}.onnx" for t in dense_export.paths},
                              "pruned": {t: f"pruned/{t}.onnx" for t in pruned_export.paths},
                              "model": "pruned/model"},
                    "max_abs_diff": {"dense": dense_export.max_abs_diff,
                                     "pruned": pruned_export.max_abs_diff}},
            accuracy=accuracy, latency=latency, env=env_info(),
            config={**cfg.to_dict(), "seconds_total": round(time.perf_counter() - t_start, 2)},
        )
        report["data"] = data_section
        report["speedup_expectation"] = expected_speedup(rt, pc.pattern)
        if quant is not None:
            report["quantize"] = quant
        if search is not None:
            from .speedup_search import final_speedup

            report["target_speedup"] = {**search.to_dict(),
                                        **final_speedup(latency, cfg.quantize,
                                                        search.target)}
        if cfg.triton is not None:  # a Triton model repository of this run: OUT/triton
            from .exporters.triton import export_triton

            write_report(report, tmp)  # export_triton reads the latency table from it
            repo = export_triton(tmp, tmp / "triton", backend=cfg.triton)
            report["export"]["triton"] = {"path": "triton", "backend": repo.backend,
                                          "device": repo.device,
                                          "models": [m.name for m in repo.models]}
        write_report(report, tmp)
    return report


def _prune_generative(vlm, cfg: RunConfig, calib, progress):
    """Prune the chosen parts: one prune() per distinct sparsity, parts in model order (the
    engine then calibrates each group on the inputs the earlier groups left)."""
    from .prune import prune

    pc = cfg.prune_config
    dense: dict[str, str] = {}
    if cfg.parts is not None:
        parts = parse_parts(cfg.parts)
    else:  # --tower PART names one part; neither: every part but those the family keeps
        # dense by default (BLIP-2's Q-Former, as in ECoFLaP), which the report names
        dense = {} if cfg.tower else dict(getattr(vlm, "dense_parts", {}))
        parts = dict.fromkeys((cfg.tower,) if cfg.tower else
                              [t for t in vlm.towers if t not in dense])
    groups: dict[float, list[str]] = {}
    for part in vlm.towers:
        if part in parts:
            s = parts[part] if parts[part] is not None else pc.sparsity
            groups.setdefault(float(s), []).append(part)
    results = []
    for s, names in groups.items():
        results.append((names, prune(vlm, cfg.method, s, str(pc.pattern), calibration=calib,
                                     scope=tuple(names), skip_incompatible=cfg.skip_incompatible,
                                     seed=cfg.seed, method_options=pc.method_options,
                                     units=pc.units, round_to=pc.round_to, progress=progress)))
    first = results[0][1].to_dict()
    if len(results) > 1:  # per-part sparsities: the overall figures over every pruned layer
        first["groups"] = [{"parts": n, **r.to_dict()} for n, r in results]
        for key in ("per_modality", "per_layer"):
            first[key] = {k: v for _, r in results for k, v in getattr(r, key).items()}
        sizes = {ly.name: ly.weight.numel() for ly in vlm.prunable_layers()}
        total = sum(sizes[k] for k in first["per_layer"])
        first["achieved"] = sum(v * sizes[k] for k, v in first["per_layer"].items()) / total
        first["seconds"] = sum(r.seconds for _, r in results)
    first["parts"] = format_parts({p: parts[p] for p in vlm.towers if p in parts})
    first["scope"] = [p for p in vlm.towers if p in parts]
    if dense:
        first["dense_parts"] = dense
    return first


def _prune_export_offloaded(cfg: RunConfig, out, progress) -> dict:
    """prune-export of a generative model bigger than memory (``--offload disk``): the dense
    model evaluated with its blocks on disk (:func:`vlcompress.methods.offload.load_offloaded`:
    a ``device_map`` over the GPUs, bounded host memory and the shards), pruned block by block
    from the shards into ``pruned/model`` (:func:`~vlcompress.methods.offload.prune_offloaded`),
    then evaluated the same way. No ONNX export (tracing needs the whole model in memory) and
    no latency: the report says so."""
    import tempfile

    from .data import generative_eval_data, load_calibration
    from .envinfo import env_info
    from .eval.generative import generative_accuracy, run_all
    from .methods.offload import checkpoint_counts, load_offloaded, prune_offloaded
    from .report import build_report, write_report

    t_start = time.perf_counter()
    calib = load_calibration(cfg.calibration, n=cfg.calibration_size, batch_size=8, seed=cfg.seed)
    evals = generative_eval_data(cfg.eval_data, n=cfg.eval_size)
    parts = list(parse_parts(cfg.parts)) if cfg.parts is not None else \
        ([cfg.tower] if cfg.tower else None)
    device = cfg.device or ("cuda" if _cuda_available() else None)
    with atomic_dir(out, overwrite=cfg.force) as tmp:
        with tempfile.TemporaryDirectory(prefix=".offload-", dir=tmp) as off:
            vlm, plan = load_offloaded(cfg.model, off, device=cfg.device)
            dense = run_all(vlm, evals, max_new_tokens=cfg.max_new_tokens, progress=progress)
            del vlm
        res = prune_offloaded(cfg.model, tmp / "pruned" / "model", calib, method=cfg.method,
                              pattern=str(cfg.prune_config.pattern),
                              sparsity=cfg.prune_config.sparsity, parts=parts, keep_masks=False,
                              device=device)
        with tempfile.TemporaryDirectory(prefix=".offload-", dir=tmp) as off:
            vlm, _ = load_offloaded(tmp / "pruned" / "model", off, device=cfg.device)
            pruned = run_all(vlm, evals, max_new_tokens=cfg.max_new_tokens, progress=progress)
            towers = list(vlm.towers)
            del vlm
        accuracy = generative_accuracy(evals, dense, pruned, random_weights=False)
        _, dense_nonzero = checkpoint_counts(cfg.model)  # the weights as stored, tensor by tensor
        total, nonzero = checkpoint_counts(tmp / "pruned" / "model")
        notes = data_notes(cfg, False)
        notes.append("--offload disk: pruned block by block from the checkpoint's shards and "
                     "evaluated with a device_map (GPUs, bounded host memory, the rest read from "
                     "disk at each forward); no ONNX export or latency (tracing needs the whole "
                     "model in memory)")
        report = build_report(
            model={"name": cfg.model, "family": "llava", "source": str(cfg.model),
                   "generative": True, "parts": towers, "params_total": total,
                   "params_nonzero": nonzero, "params_nonzero_dense": dense_nonzero},
            prune={"method": cfg.method, "pattern": str(cfg.prune_config.pattern),
                   "target": cfg.prune_config.sparsity, "achieved": res["achieved"],
                   "per_modality": res["per_modality"],
                   "seconds": round(res["seconds"], 2), "scope": parts or towers,
                   "offload": {"mode": cfg.offload, "stacks": res["offloaded_stacks"],
                               "block_loads": res["block_loads"],
                               "shards_written": res["shards_written"],
                               "bytes_written": res["bytes_written"], "device": device,
                               "eval_device_map": sorted(set(map(str, plan.values())))},
                   "details": res["details"]},
            export={"format": None, "paths": {"model": "pruned/model"}},
            accuracy=accuracy, latency=[], env=env_info(),
            config={**cfg.to_dict(), "seconds_total": round(time.perf_counter() - t_start, 2)})
        report["data"] = {"calibration": _describe(calib),
                          "eval": [_describe(d) for d in evals], "notes": notes}
        write_report(report, tmp)
    return report


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


#: evaluation prompts per data set on which a generative export is validated
GENERATIVE_VALIDATION_PROMPTS = 8


def _export_generative(vlm, evals, folder, cfg: RunConfig, progress,
                       visual_tokens: int | None = None, reuse=None) -> dict:
    """Export one variant to ``folder`` (vision/embed/decoder.onnx) and validate it on the
    first :data:`GENERATIVE_VALIDATION_PROMPTS` items of each evaluation set; the report's
    entry, its paths relative to the run folder. ``visual_tokens``: the vision graph keeps K
    tokens, and ``reuse`` (the full-token twin's folder) lends it embed and decoder."""
    import json
    from pathlib import Path

    from .eval.generative import validation_items

    if getattr(vlm, "onnx_generation", "llava") == "blip":  # vision + decoder, cross-attention
        from .exporters.generative_blip import export_blip as export_generative
    else:
        from .exporters.generative import export_generative

    images, questions = validation_items(evals, GENERATIVE_VALIDATION_PROMPTS)
    with (progress or NULL).task(f"export {folder.name} onnx", total=1) as t:
        tokens = {} if visual_tokens is None else {"visual_tokens": visual_tokens, "reuse": reuse}
        res = export_generative(vlm, folder, images=images, questions=questions,
                                max_new_tokens=cfg.max_new_tokens, **tokens)
        t.advance(1)
    out = res.to_dict()
    root = folder.parent
    out["paths"] = {k: Path(v).relative_to(root).as_posix() for k, v in out["paths"].items()}
    if visual_tokens is not None:
        out["visual_tokens"] = json.loads((folder / "generation.json").read_text())["visual_tokens"]
    precision = _generative_precision(cfg)
    # --fp16 / --quantize int8: <folder>_<precision>/, built while vlm holds the weights it
    # validates against; a token variant's holds its vision graph in that precision and
    # names its twin's (<reuse>_<precision>/) embed and decoder
    if precision:
        from .exporters.generative_quant import build_variant

        shared = None if reuse is None else Path(reuse).parent / f"{Path(reuse).name}_{precision}"
        with (progress or NULL).task(f"export {folder.name}_{precision} onnx", total=1) as t:
            out[precision] = build_variant(vlm, folder, precision, images=images,
                                           questions=questions, max_new_tokens=cfg.max_new_tokens,
                                           visual_tokens=visual_tokens, shared=shared)
            t.advance(1)
    return out


def _token_variant(vlm, evals, tmp, base: str, cfg: RunConfig, progress):
    """The ``{base}_tokens`` variant: the same weights evaluated in PyTorch with K visual
    tokens (``models.visual_tokens``), then its vision graph exported beside ``base``'s
    embed and decoder and validated; (runs, export entry)."""
    from .eval.generative import run_all
    from .models.visual_tokens import reduced_tokens

    k = cfg.visual_tokens
    with reduced_tokens(vlm.model, vlm.processor, k):
        runs = run_all(vlm, evals, max_new_tokens=cfg.max_new_tokens, progress=progress)
    entry = _export_generative(vlm, evals, tmp / f"{base}_tokens", cfg, progress,
                               visual_tokens=k, reuse=tmp / base)
    return runs, entry


def _generative_precision(cfg: RunConfig) -> str | None:
    """The precision variant of a generative run: fp16 (--fp16), int8 (--quantize int8) or None."""
    from .exporters.generative_quant import check_generative_precision

    return check_generative_precision(cfg.quantize, cfg.quantize_method, cfg.fp16,
                                      cfg.latency_config.runtime_entry)


def _generative_variants(vlm, cfg, exports, root, evals, runs, is_preset, progress):
    """Move each variant's ``--fp16`` / ``--quantize int8`` twin into ``exports`` as
    ``dense_<p>`` / ``pruned_<p>`` (and ``dense_tokens_<p>`` / ``pruned_tokens_<p>`` with
    ``--visual-tokens``) and measure their accuracy from their files (ONNX Runtime); the
    report's ``quantize`` section, or None without a precision variant."""
    precision = _generative_precision(cfg)
    if precision is None:
        return None
    from .exporters.generative_quant import variants_accuracy

    names = []
    for v in [v for v in ("dense", "pruned", "dense_tokens", "pruned_tokens") if v in exports]:
        exports[f"{v}_{precision}"] = exports[v].pop(precision)
        names.append(f"{v}_{precision}")
    acc = variants_accuracy(vlm, root, names, evals, runs["dense"], runs["pruned"],
                            max_new_tokens=cfg.max_new_tokens, random_weights=is_preset,
                            progress=progress, float_twins=runs)
    return {"quantize": precision, "method": exports[names[0]]["method"],
            "runtime": "onnxruntime/cpu",
            "quantized_from": "the run's fp32 ONNX (" + ", ".join(
                n.rsplit("_", 1)[0] + "/" for n in names) + ")",
            "files": {n: exports[n]["files"] for n in names},
            "validation": {n: exports[n]["validation"] for n in names}, "accuracy": acc}


def _prune_export_generative(cfg: RunConfig, out, progress) -> dict:
    """prune-export of a generative model (llava): load -> evaluate dense (generation,
    next-token log-probabilities) -> export dense ONNX -> prune the chosen parts -> evaluate
    pruned -> export pruned ONNX -> save -> report. Each export (vision, embed, decoder;
    :mod:`vlcompress.exporters.generative`) is validated against its PyTorch twin on the
    first evaluation prompts; then vision / prefill / decode latency of every variant
    (:func:`vlcompress.runtime.gen_latency.generative_latency`)."""
    from .data import generative_eval_data, load_calibration, skipped_questions
    from .envinfo import env_info
    from .eval.generative import generative_accuracy, run_all
    from .exporters.generative import check_exportable
    from .models import load_model
    from .report import build_report, write_report
    from .runtime import gen_latency

    t_start = time.perf_counter()
    calib = load_calibration(cfg.calibration, n=cfg.calibration_size, batch_size=8, seed=cfg.seed)
    vlm = load_model(cfg.model)
    if getattr(vlm, "onnx_generation", "llava") == "llava":
        check_exportable(vlm)  # a decoder the export cannot build: refused before any work
    is_preset = vlm.source.startswith("preset:")
    answers = getattr(vlm, "answers_questions", True)  # a captioner: the source's captions only
    evals = generative_eval_data(cfg.eval_data, n=min(32, cfg.eval_size) if is_preset
                                 else cfg.eval_size, questions=answers)
    # latency inputs: the first evaluation prompt; a prompt + timed tokens past the context:
    # refused now
    lat_inputs = gen_latency.latency_inputs(vlm, evals, cfg.latency_config.batch_sizes)
    gen_latency.check_timing_context(
        lat_inputs, int(vlm.model.config.text_config.max_position_embeddings),
        model=cfg.model, warmup=cfg.latency_config.warmup)
    with atomic_dir(out, overwrite=cfg.force) as tmp:
        dense_total, dense_nonzero = vlm.num_parameters()
        dense = run_all(vlm, evals, max_new_tokens=cfg.max_new_tokens, progress=progress)
        exports = {"dense": _export_generative(vlm, evals, tmp / "dense", cfg, progress)}
        runs = {"dense": dense}
        if cfg.visual_tokens is not None:  # tokens alone: the dense weights, K tokens
            runs["dense_tokens"], exports["dense_tokens"] = _token_variant(
                vlm, evals, tmp, "dense", cfg, progress)
        teacher = None
        if cfg.recover_steps:
            from .distill import dense_copy

            teacher = dense_copy(vlm)
        prune_section = _prune_generative(vlm, cfg, calib, progress)
        if teacher is not None:  # logit distillation on the training sequences, masks kept
            from .recover import recover

            rec = recover(vlm, steps=cfg.recover_steps, teacher=teacher, data=cfg.train_data,
                          n=cfg.train_size, batch_size=8, seed=cfg.seed,
                          progress=progress).to_dict()
            prune_section.setdefault("details", {})["recover"] = rec
            del teacher
        pruned = run_all(vlm, evals, max_new_tokens=cfg.max_new_tokens, progress=progress)
        exports["pruned"] = _export_generative(vlm, evals, tmp / "pruned", cfg, progress)
        runs["pruned"] = pruned
        if cfg.visual_tokens is not None:  # both: the pruned weights, K tokens
            runs["pruned_tokens"], exports["pruned_tokens"] = _token_variant(
                vlm, evals, tmp, "pruned", cfg, progress)
        accuracy = generative_accuracy(evals, dense, pruned, random_weights=is_preset)
        if cfg.visual_tokens is not None:
            from .eval.generative import variants_accuracy

            accuracy["variants"] = variants_accuracy(runs, random_weights=is_preset)
            accuracy["visual_tokens"] = exports["dense_tokens"]["visual_tokens"]
        quant = _generative_variants(vlm, cfg, exports, tmp, evals, runs, is_preset, progress)
        vlm.save(tmp / "pruned" / "model")
        latency = gen_latency.generative_latency(
            gen_latency.variant_folders(tmp, tuple(exports)), load_model(cfg.model), vlm,
            lat_inputs, cfg.latency_config, progress=progress)
        total, nonzero = vlm.num_parameters()
        notes = data_notes(cfg, is_preset)
        if not answers and skipped_questions(cfg.eval_data):
            notes.append(f"--eval-data {cfg.eval_data}: its questions (vqa) left out, as "
                         f"{vlm.family} captions images and answers no questions; evaluated on "
                         "its captions")
        notes.append("generative model: pruned and evaluated in PyTorch, exported to fp32 ONNX "
                     "and validated; latency: vision, prefill (time to first token) and decode "
                     "(ms per token, forced past the end token) of every variant on ONNX Runtime "
                     "and of dense and pruned in PyTorch eager, interleaved, on the first "
                     "evaluation prompt" + (
                         " (BLIP: the cross-attention keys / values computed once per request, "
                         "in the prefill)"
                         if getattr(vlm, "onnx_generation", "llava") == "blip" else ""))
        if quant is not None:
            notes.append(f"--{'fp16' if quant['quantize'] == 'fp16' else 'quantize int8'}: "
                         + ", ".join(f"{n}/" for n in quant["files"]) + " validated "
                         "against PyTorch per precision (logits cosine, top-1 agreement; greedy "
                         "tokens reported, not required) and evaluated from their files on ONNX "
                         "Runtime CPU")
        notes += [f"{p} kept dense: {why}" for p, why in prune_section.get("dense_parts", {}).items()]
        report = build_report(
            model={"name": cfg.model, "family": vlm.family, "source": vlm.source,
                   "generative": True, "parts": list(vlm.towers),
                   "params_total": total, "params_nonzero": nonzero,
                   "params_nonzero_dense": dense_nonzero},
            prune=prune_section,
            export={"format": "onnx", "paths": {"model": "pruned/model"},
                    "generative": exports},
            accuracy=accuracy, latency=latency, env=env_info(),
            config={**cfg.to_dict(), "seconds_total": round(time.perf_counter() - t_start, 2)},
        )
        if quant is not None:
            report["quantize"] = quant
        report["data"] = {"calibration": _describe(calib),
                          "calibration_sequences": "image tokens + prompt + target text, built "
                                                   "with the model's processor and chat template",
                          "prompts": dict(vlm.prompts),
                          "eval": [_describe(d) for d in evals], "notes": notes}
        if cfg.triton is not None:  # OUT/triton: one generation model per variant
            from .exporters.triton import export_triton

            write_report(report, tmp)  # export_triton reads the model and config from it
            repo = export_triton(tmp, tmp / "triton", backend=cfg.triton)
            report["export"]["triton"] = {"path": "triton", "backend": repo.backend,
                                          "device": repo.device,
                                          "models": [m.name for m in repo.models]}
        write_report(report, tmp)
    return report
