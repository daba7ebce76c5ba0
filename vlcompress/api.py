"""Python entry points behind the CLI's ``prune``, ``export`` and ``generate`` commands.

Both validate every option before loading anything and publish their output folder
atomically (temporary sibling folder, renamed when complete).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from .atomic import atomic_dir
from .errors import ConfigError
from .progress import NULL


def prune_and_save(model, out, *, method="multiflow", sparsity=None, pattern="2:4",
                   calibration="shapes", calibration_size=256, force=False,
                   skip_incompatible=False, progress_factory=None, units="heads,neurons",
                   round_to=8, depth=0, method_options=None, offload="none",
                   reconstruct=None) -> dict:
    """Prune ``model`` and save it to ``out`` (safetensors + config + ``prune.json``; a
    structurally pruned model also gets ``vlcompress_manifest.json`` and a README).

    ``offload="disk"``: ``model`` is a folder of safetensors shards pruned without holding it
    in memory (:func:`vlcompress.methods.offload.prune_offloaded`: its big stacks are read block by
    block from the shards and the pruned blocks written to ``out`` shard by shard)."""
    from .atomic import check_output_folder
    from .config import PruneConfig
    from .data import load_calibration
    from .methods.registry import check_family, get_method
    from .models import load_model, peek_model
    from .prune import prune

    pc = PruneConfig(method=method, sparsity=sparsity, pattern=pattern,
                     skip_incompatible=skip_incompatible, units=units, round_to=round_to,
                     depth=depth, method_options=method_options, reconstruct=reconstruct)
    out = check_output_folder(out, force)
    if offload != "none":
        return _prune_offloaded(model, out, pc, offload, calibration, calibration_size, force,
                                method_options)
    check_family(get_method(pc.method), pc.pattern, peek_model(model))
    calib = load_calibration(calibration, n=calibration_size)
    vlm = load_model(model)
    if pc.pattern.is_structured:
        from .sparsity.structured import check_structured

        check_structured(vlm, pc)
    with (progress_factory() if progress_factory else nullcontext(NULL)) as prog:
        res = prune(vlm, pc.method, pc.sparsity, str(pc.pattern), calibration=calib, train=calib,
                    skip_incompatible=skip_incompatible, units=pc.units, round_to=pc.round_to,
                    depth=pc.depth, method_options=pc.method_options, progress=prog,
                    reconstruct=reconstruct)
    info = {**res.to_dict(), "model": str(model)}
    with atomic_dir(out, overwrite=force) as tmp:
        vlm.save(tmp)
        (tmp / "prune.json").write_text(json.dumps(info, indent=2))
    return info


def _prune_offloaded(model, out: Path, pc, offload: str, calibration, calibration_size: int,
                     force: bool, method_options) -> dict:
    """``prune_and_save`` with ``offload="disk"``: refusals first (mode, method, pattern,
    folder, free disk, the family), then the pruned shards written into the output folder."""
    from .data import load_calibration
    from .methods.offload import check_offload, prune_offloaded
    from .methods.registry import check_family, get_method
    from .models import peek_model

    check_offload(offload, pc.method, str(pc.pattern), model, out)
    if method_options:  # the user's, not the defaults PruneConfig fills in
        raise ConfigError(f"--offload {offload} takes no --method-option (got "
                          f"{', '.join(method_options)}); allowed: none")
    if pc.reconstruct:
        raise ConfigError(f"--reconstruct is not available with --offload {offload} (it fits a "
                          "scorer's masks on a resident model); allowed: --no-reconstruct or "
                          "neither")
    check_family(get_method(pc.method), pc.pattern, peek_model(model))
    calib = load_calibration(calibration, n=calibration_size)
    with atomic_dir(out, overwrite=force) as tmp:
        res = prune_offloaded(model, tmp, calib, method=pc.method, pattern=str(pc.pattern),
                              sparsity=pc.sparsity, keep_masks=False)
        info = {"method": pc.method, "pattern": str(pc.pattern), "achieved": res["achieved"],
                "seconds": res["seconds"], "offload": offload, "model": str(model),
                "offloaded_stacks": res["offloaded_stacks"], "details": res["details"]}
        (tmp / "prune.json").write_text(json.dumps(info, indent=2))
    return info


def export(model, out, *, fp16=False, force=False, calibration="shapes", progress_factory=None,
           quantize="none", quantize_method="static", quantize_target="onnxruntime"):
    """Export every tower of ``model`` (a VLM, a name or a folder) to ``out/<tower>.onnx``,
    traced on the first pairs of ``calibration`` (a source for ``load_calibration``) and
    validated against PyTorch on a batch of another size; returns the ExportResult.

    ``quantize`` (int8 | fp16 | fp8, :mod:`vlcompress.exporters.quantize`) also writes
    ``out/<tower>.<quantize>.onnx`` beside the fp32 file: static int8 (QDQ, per-channel weights)
    calibrated on the first pairs of ``calibration`` (the same source), or dynamic; for
    ``quantize_target="tensorrt"`` explicit symmetric QDQ (int8, fp8). Each quantized file is
    compared with PyTorch on the validation batch; ``result.quantized[tower]`` holds its path,
    its quantized nodes and that comparison (reported, not a pass/fail: int8 differs by design).
    """
    from .atomic import check_output_folder
    from .data import load_calibration
    from .exporters.onnx import export_model, validate_tower
    from .exporters.quantize import check_quantize_target, quantize_onnx
    from .models import VLM, load_model
    from .pipeline import export_examples
    from .quantized_variants import QUANT_CALIBRATION_PAIRS, calibration_feeds

    q = check_quantize_target(quantize, quantize_method, quantize_target)
    if q != "none" and fp16:
        raise ConfigError(f"--quantize {q} quantizes the fp32 export (written beside it); drop "
                          "--fp16" + (" (--quantize fp16 writes the fp16 file)" if q == "fp16"
                                      else ""))
    out = check_output_folder(out, force)
    vlm = model if isinstance(model, VLM) else load_model(model)
    static = q in ("int8", "fp8") and quantize_method == "static"
    calib = load_calibration(calibration, n=QUANT_CALIBRATION_PAIRS if static else 5,
                             batch_size=QUANT_CALIBRATION_PAIRS if static else 5)
    example, check = export_examples(calib)
    quantized = {}
    with atomic_dir(out, overwrite=force) as tmp, \
            (progress_factory() if progress_factory else nullcontext(NULL)) as prog:
        res = export_model(vlm, tmp, example, check, fp16=fp16, progress=prog)
        if q != "none":
            with prog.task(f"quantize {q}", total=len(res.paths)) as task:
                for tower, src in res.paths.items():
                    feeds = calibration_feeds(vlm, tower, calib) if static else None
                    dst = tmp / f"{tower}.{q}.onnx"
                    qr = quantize_onnx(src, dst, q, calibration=feeds, method=quantize_method,
                                       target=quantize_target)
                    info = qr.to_dict()
                    if quantize_target == "onnxruntime":  # ORT CPU runs it; TensorRT QDQ may not
                        v = validate_tower(vlm, tower, dst, check)
                        info["vs_pytorch"] = {"max_abs_diff": v["max_abs_diff"],
                                              "min_cosine": v["min_cosine"], "batch": v["batch"]}
                    info["path"] = str(out / dst.name)
                    quantized[tower] = info
                    task.advance()
            (tmp / "quantize.json").write_text(json.dumps(quantized, indent=2) + "\n")
    res.paths = {t: out / Path(p).name for t, p in res.paths.items()}
    res.quantized = quantized
    return res



#: generation runtimes of ``generate``: our loop on onnxruntime, or ONNX Runtime GenAI
GENERATE_RUNTIMES = ("onnxruntime", "genai")


def generate(run_dir, image, prompt: str, *, dense: bool = False, max_new_tokens: int = 24,
             threads: int | None = None, sampling=None, reduced_tokens: bool = False,
             runtime: str = "onnxruntime") -> str:
    """The answer of a generative run's exported ONNX graphs (``pruned/``, or ``dense/`` with
    ``dense``) to ``prompt`` about ``image`` (a path), generated on ONNX Runtime
    (:class:`vlcompress.runtime.ort_generate.OrtGenerator`; a BLIP captioning / VQA run:
    :class:`vlcompress.runtime.ort_generate_blip.BlipOrtGenerator`): greedily, or drawn with
    ``sampling`` (a :class:`~vlcompress.runtime.ort_generate.Sampling`: seeded temperature /
    top-k / top-p); ``reduced_tokens``: the run's ``dense_tokens/`` or ``pruned_tokens/``
    export (``--visual-tokens``), whose prompt carries as many image tokens as its
    ``generation.json`` records. Everything is checked before the
    graphs are loaded: a run that is not generative, ``max_new_tokens`` above the model's
    context, an image that cannot be read, a prompt (with its image tokens) plus the new tokens
    longer than the context. ``runtime="genai"`` generates with ONNX Runtime GenAI instead
    (:class:`vlcompress.runtime.genai_generate.GenaiGenerator`, the ``[genai]`` extra; its
    own seeded sampler with the same options: other draws than ours for one seed).
    Nothing is written."""
    from .eval.generative import check_max_new_tokens
    from .runtime.gen_inputs import PromptEncoder, read_image
    from .runtime.ort_generate import OrtGenerator, read_spec

    if runtime not in GENERATE_RUNTIMES:
        raise ConfigError(f"--runtime {runtime!r} is not a generation runtime; allowed: "
                          f"{', '.join(GENERATE_RUNTIMES)}")
    if reduced_tokens and runtime == "genai":
        raise ConfigError("--reduced-tokens needs --runtime onnxruntime: the GenAI adapter "
                          "numbers the image tokens contiguously, not at their full-prompt "
                          "positions (the kept tokens' image_positions); allowed: --runtime "
                          "onnxruntime with --reduced-tokens")
    if runtime == "genai":
        from .runtime.genai_generate import check_sampling

        check_sampling(sampling)
    run_dir = Path(run_dir)
    rep = run_dir / "report.json"
    if not rep.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run folder (no report.json); allowed: the "
                          "--out folder of a prune-export run of a generative model")
    report = json.loads(rep.read_text())
    model = report.get("model") or {}
    if not model.get("generative"):
        raise ConfigError(f"generate needs a generative run; {str(run_dir)!r} is a retrieval run "
                          f"of {model.get('name')} ({model.get('family')}); allowed: a "
                          "prune-export run of a generative model (llava)")
    check_max_new_tokens(max_new_tokens)
    variant = ("dense" if dense else "pruned") + ("_tokens" if reduced_tokens else "")
    if reduced_tokens and variant not in ((report.get("export") or {}).get("generative") or {}):
        raise ConfigError(f"--reduced-tokens: {str(run_dir)!r} has no token-reduced export "
                          f"({variant}/); allowed: a run made with prune-export --visual-tokens K")
    folder = run_dir / variant
    spec = read_spec(folder)
    ctx = int(spec["context"])
    if max_new_tokens > ctx:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} is above the context of "
                          f"{model.get('name')} ({ctx} tokens); allowed: 1..{ctx}")
    img = read_image(image)
    proc_dir = run_dir / ((report.get("export") or {}).get("paths", {}).get("model")
                          or "pruned/model")
    if spec.get("kind", "llava") != "llava":  # BLIP: vision + decoder with cross-attention
        if runtime == "genai":  # before asking for the extra: it could not run this anyway
            raise ConfigError(f"--runtime genai cannot run the {spec['kind']} export in "
                              f"{str(run_dir)!r}: ONNX Runtime GenAI's decoders take "
                              "inputs_embeds or input_ids with rotary positions and no "
                              "cross-attention, and BLIP's decoder cross-attends the image (or "
                              "question) and adds learned absolute positions; allowed: --runtime "
                              "onnxruntime")
        if reduced_tokens:  # prune-export --visual-tokens builds llava-style exports only
            raise ConfigError(f"--reduced-tokens runs on LLaVA-style exports; {str(run_dir)!r} "
                              f"is a {spec['kind']} export (no token-reduced variant); allowed: "
                              "generate without --reduced-tokens")
        return _generate_blip(folder, spec, proc_dir, img, prompt, max_new_tokens, threads,
                              str(model.get("name")), sampling)
    if runtime == "genai":
        from .optional_deps import require_onnxruntime_genai

        require_onnxruntime_genai()
    encoder = PromptEncoder(proc_dir, str(model.get("name")), ctx,
                            image_tokens=spec.get("image_tokens"))
    enc = encoder.encode([img], [prompt])
    # a token-reduced prompt's positions run as far as the full prompt's (visual_tokens)
    skipped = int(spec.get("tower_tokens") or 0) - int(spec.get("image_tokens")
                                                        or spec.get("tower_tokens") or 0)
    encoder.check_length(int(enc["input_ids"].shape[1]) + skipped, max_new_tokens)
    if runtime == "genai":
        from .runtime.genai_generate import GenaiGenerator

        generator = GenaiGenerator(folder, threads)
        try:
            tokens = generator.generate(enc["input_ids"], enc["attention_mask"],
                                        enc["pixel_values"], max_new_tokens, sampling=sampling)[0]
        finally:
            generator.close()
    else:
        tokens = OrtGenerator(folder, threads).generate(
            enc["input_ids"], enc["attention_mask"], enc["pixel_values"], max_new_tokens,
            sampling=sampling)[0]
    return encoder.decode(tokens)


def _generate_blip(folder, spec: dict, proc_dir, img, prompt: str, max_new_tokens: int,
                   threads, name: str, sampling=None) -> str:
    """:func:`generate` on a BLIP export: ``prompt`` is the caption's start (captioning, as
    BLIP's "a picture of") or the question (VQA: required, not blank); greedy, or seeded
    ``sampling``, on ONNX Runtime
    (:class:`vlcompress.runtime.ort_generate_blip.BlipOrtGenerator`), encoded by the same
    front end as the served generation model
    (:class:`vlcompress.runtime.gen_inputs.BlipPromptEncoder`)."""
    from .runtime.gen_inputs import BlipPromptEncoder
    from .runtime.ort_generate_blip import BlipOrtGenerator

    encoder = BlipPromptEncoder(proc_dir, name, spec)
    rows = encoder.encode([img], [prompt])
    encoder.check_length(rows, max_new_tokens)
    tokens = encoder.generate(BlipOrtGenerator(folder, threads), rows, [max_new_tokens],
                              sampling=sampling)[0]
    return encoder.decode(tokens)
