"""Python entry points behind the CLI's ``prune`` and ``export`` commands.

Both validate every option before loading anything and publish their output folder
atomically (temporary sibling folder, renamed when complete).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from .atomic import atomic_dir
from .progress import NULL


def prune_and_save(model, out, *, method="multiflow", sparsity=None, pattern="2:4",
                   calibration="shapes", calibration_size=256, force=False,
                   skip_incompatible=False, progress_factory=None, units="heads,neurons",
                   round_to=8, depth=0, method_options=None) -> dict:
    """Prune ``model`` and save it to ``out`` (safetensors + config + ``prune.json``; a
    structurally pruned model also gets ``vlcompress_manifest.json`` and a README)."""
    from .atomic import check_output_folder
    from .config import PruneConfig
    from .data import load_calibration
    from .methods.registry import check_family, get_method
    from .models import load_model, peek_model
    from .prune import prune

    pc = PruneConfig(method=method, sparsity=sparsity, pattern=pattern,
                     skip_incompatible=skip_incompatible, units=units, round_to=round_to,
                     depth=depth, method_options=method_options)
    out = check_output_folder(out, force)
    check_family(get_method(pc.method), pc.pattern, peek_model(model))
    calib = load_calibration(calibration, n=calibration_size)
    vlm = load_model(model)
    if pc.pattern.is_structured:
        from .sparsity.structured import check_structured

        check_structured(vlm, pc)
    with (progress_factory() if progress_factory else nullcontext(NULL)) as prog:
        res = prune(vlm, pc.method, pc.sparsity, str(pc.pattern), calibration=calib, train=calib,
                    skip_incompatible=skip_incompatible, units=pc.units, round_to=pc.round_to,
                    depth=pc.depth, method_options=pc.method_options, progress=prog)
    info = {**res.to_dict(), "model": str(model)}
    with atomic_dir(out, overwrite=force) as tmp:
        vlm.save(tmp)
        (tmp / "prune.json").write_text(json.dumps(info, indent=2))
    return info


def export(model, out, *, fp16=False, force=False, calibration="shapes", progress_factory=None):
    """Export every tower of ``model`` (a VLM, a name or a folder) to ``out/<tower>.onnx``,
    traced on the first pairs of ``calibration`` (a source for ``load_calibration``) and
    validated against PyTorch on a batch of another size; returns the ExportResult."""
    from .atomic import check_output_folder
    from .data import load_calibration
    from .exporters.onnx import export_model
    from .models import VLM, load_model
    from .pipeline import export_examples

    out = check_output_folder(out, force)
    vlm = model if isinstance(model, VLM) else load_model(model)
    example, check = export_examples(load_calibration(calibration, n=5, batch_size=5))
    with atomic_dir(out, overwrite=force) as tmp, \
            (progress_factory() if progress_factory else nullcontext(NULL)) as prog:
        res = export_model(vlm, tmp, example, check, fp16=fp16, progress=prog)
    res.paths = {t: out / Path(p).name for t, p in res.paths.items()}
    return res
