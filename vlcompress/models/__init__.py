"""Model loading: bundled models, architecture presets, HF hub ids and local folders."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError
from .base import VLM, PrunableLayer
from .registry import bundled_models, families, family_for, family_info, presets, register_family

__all__ = ["VLM", "PrunableLayer", "load_model", "list_models", "families", "register_family",
           "family_info", "peek_model"]


def list_models():
    """Every name ``load_model`` accepts without a path: bundled models, then presets."""
    return bundled_models() + presets()


def _quiet_transformers():
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - older hub
        pass


def _load_processors(path: str):
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = img = None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    try:
        img = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        img = None
    return tok, img


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "vocab.txt", "tokenizer.model",
                   "sentencepiece.bpe.model")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _needs(towers) -> dict[str, tuple[str, ...]]:
    """What each kept tower needs from a model folder: a tokenizer, an image processor."""
    out = {}
    if "text" in towers or "language" in towers:
        out["tokenizer"] = TOKENIZER_FILES
    if "vision" in towers:
        out["image processor"] = IMAGE_PROCESSOR_FILES
    return out


def check_folder_files(folder: Path, towers, *, weights: bool = True) -> None:
    """Refuse a local model folder that lacks the tokenizer / image-processor files its
    towers need, or whose weight files are missing, truncated or corrupt: one line naming the
    file and what is allowed. Reads file headers only (milliseconds)."""
    name = str(folder)
    for what, files in _needs(towers).items():
        if not any((folder / f).is_file() for f in files):
            raise ModelError(f"model folder {name!r} has no {what} files (one of {', '.join(files)}); "
                             f"add the {what} the model was trained with (save_pretrained writes it)")
    if weights:
        check_weight_files(folder)


def check_weight_files(folder: Path) -> None:
    """The weight files of ``folder`` exist and are whole: safetensors headers parse and the
    file is as long as its header says; every shard an index names exists; a
    ``pytorch_model.bin`` is a readable zip archive (torch.save's format)."""
    import struct
    import zipfile

    name = str(folder)
    index = next((folder / f for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (folder / f).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ModelError(f"weights index {str(index)!r} is corrupt (not JSON with a "
                             '"weight_map")') from None
        files = [folder / f for f in shards]
    else:
        files = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()][:1]
    if not files:
        raise ModelError(f"model folder {name!r} has no weights; allowed: {', '.join(WEIGHT_FILES)}")
    for f in files:
        if not f.is_file():
            raise ModelError(f"weight file {str(f)!r} named by {index.name} does not exist")
        size = f.stat().st_size
        if f.suffix == ".safetensors":
            try:
                with f.open("rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    if n > size - 8:
                        raise ValueError
                    header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                          default=0)
            except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise ModelError(f"weight file {str(f)!r} is corrupt (no valid safetensors "
                                 "header)") from None
            if 8 + n + end > size:
                raise ModelError(f"weight file {str(f)!r} is truncated: {size} bytes, its header "
                                 f"needs {8 + n + end}")
        elif not zipfile.is_zipfile(f):
            raise ModelError(f"weight file {str(f)!r} is truncated or corrupt (not a torch.save "
                             "zip archive)")


def _from_pretrained(model_cls, path: str, name: str):
    """``from_pretrained`` that refuses, in one line, weights that do not fit the config
    (missing or mismatched tensors would otherwise stay randomly initialised)."""
    try:
        # ignore_mismatched_sizes: report mismatched tensors ourselves, in one line, below
        model, info = model_cls.from_pretrained(path, output_loading_info=True,
                                                ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise ModelError(f"cannot load the weights of model {name!r} ({exc.__class__.__name__}: "
                         f"{first}); allowed: weights saved for this config") from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    missing = sorted(info.get("missing_keys") or [])
    if mismatched or missing:
        keys = [k[0] if isinstance(k, tuple) else k for k in (mismatched or missing)]
        kind = "have shapes that do not match" if mismatched else "are missing from"
        raise ModelError(f"weights of model {name!r} do not match its config "
                         f"({cfg_name(model)}): {len(keys)} tensors {kind} the weights, e.g. "
                         f"{keys[0]}; allowed: weights saved for this config")
    return model


def cfg_name(model) -> str:
    return f"{model.config.model_type}, {type(model).__name__}"


def load_model(name_or_path: str | Path, *, random_init: bool = False,
               tower: str | None = None) -> VLM:
    """Load a model by bundled name (``tiny-clip``), preset, HF hub id or local folder.

    All of them go through the same path: read the config, pick the family adapter by its
    ``model_type``, build the HF model (weights, or random ``random_init``) and its processors.
    ``tower`` keeps one tower only (``"vision"``, ``"text"``); for a VLM of an unsupported
    family whose config nests a CLIP/SigLIP vision config (LLaVA-style), ``tower="vision"``
    loads that vision tower alone.
    """
    vlm = _load_model(name_or_path, random_init=random_init, tower=tower)
    if tower is not None and tuple(vlm.towers) != (tower,):
        vlm.select_towers((tower,))
    return vlm


def _resolve(name: str):
    """What ``load_model`` and ``peek_model`` both start from: ``(preset entry, None, None)``
    for a preset, else ``(None, path, config)``; a one-line ModelError for a name that is no
    bundled model, preset, model folder or HF id reachable offline."""
    import transformers

    _quiet_transformers()
    by_name = {e.name: e for e in list_models()}
    if name in by_name and by_name[name].kind == "preset":
        return by_name[name], None, None
    if name in by_name:
        path = str(by_name[name].path)
    else:
        p = Path(name).expanduser()
        looks_local = p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not p.exists():
            raise ModelError(f"model path {name!r} does not exist; give a bundled name "
                             f"({', '.join(by_name)}), an HF id or a model folder")
        if not p.exists() and "/" not in name:
            raise ModelError(f"unknown model {name!r}; allowed: a bundled model or preset "
                             f"({', '.join(by_name)}), an HF id like org/name, or a model folder")
        if p.exists() and not (p / "config.json").is_file():
            raise ModelError(f"model folder {name!r} has no config.json (not an HF model folder)")
        path = str(p) if p.exists() else name
    try:
        cfg = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load model {name!r}: not a bundled name ({', '.join(by_name)}), "
            f"nor a local folder, nor an HF id reachable offline ({exc.__class__.__name__})"
        ) from None
    return None, path, cfg


def _load_model(name_or_path, *, random_init: bool, tower: str | None) -> VLM:
    name = str(name_or_path)
    preset, path, cfg = _resolve(name)
    if preset is not None:
        return _load_preset(preset)
    if tower == "vision" and _nested_vision(cfg):
        from .towers import load_nested_vision_tower

        return load_nested_vision_tower(path, cfg, random_init=random_init, name=name)
    fam = family_for(cfg.model_type, getattr(cfg, "architectures", None))
    getattr(fam, "check_config", lambda c: None)(cfg)
    model_cls = fam.hf_class()
    manifest = None
    if Path(path).is_dir():
        from .surgery import read_manifest

        manifest = read_manifest(path)
    if manifest is not None:  # structurally pruned: per-layer widths the config cannot hold
        from .surgery import load_sliced

        model = load_sliced(path, model_cls, cfg, manifest, random_init=random_init)
    elif random_init:
        model = model_cls(cfg)
    else:
        if Path(path).is_dir():
            check_weight_files(Path(path))
        model = _from_pretrained(model_cls, path, name)
    if hasattr(fam, "from_folder"):  # a generative family: its processor and chat template
        return fam.from_folder(model, path, name)
    towers = fam.towers if tower is None else (tower,)
    if Path(path).is_dir():
        check_folder_files(Path(path), towers, weights=False)
    tok, img = _load_processors(path)
    for what, obj in (("tokenizer", tok), ("image processor", img)):
        if what in _needs(towers) and obj is None:
            raise ModelError(f"model {name!r}: its {what} cannot be loaded; allowed: a folder "
                             f"with one of {', '.join(_needs(towers)[what])}")
    return fam(model, tok, img, name=name, source=path)


def _preset_config(entry):
    import transformers

    cfg_dict = json.loads(entry.path.read_text())
    cfg_dict.pop("_description", None)
    model_type = cfg_dict.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **cfg_dict)


def peek_config(name_or_path: str | Path):
    """The HF config of a model (a preset's too), no weights loaded: for checks that need a
    shape (e.g. how many tokens a vision tower produces) before any work."""
    preset, _, cfg = _resolve(str(name_or_path))
    return _preset_config(preset) if preset is not None else cfg


def _load_preset(entry) -> VLM:
    cfg = _preset_config(entry)
    fam = family_for(cfg.model_type, getattr(cfg, "architectures", None))
    model = fam.hf_class()(cfg)
    tok, img = fam.default_processors(cfg)
    return fam(model, tok, img, name=entry.name, source=f"preset:{entry.name}")


def _nested_vision(cfg) -> bool:
    """``--tower vision`` loads the nested CLIP/SigLIP vision tower alone (exportable, as
    before generative families): for a model of no family, or of a generative one."""
    fam = families().get(cfg.model_type)
    return fam is None or bool(getattr(fam, "generative", False))


def peek_model(name_or_path: str | Path, *, tower: str | None = None):
    """What the checks need to know of a model (:class:`FamilyInfo`), read from its config
    alone: no weights are loaded, so a bad method x pattern x family combination fails in
    well under a second. Raises ModelError for what ``load_model`` would refuse."""
    name = str(name_or_path)
    preset, path, cfg = _resolve(name)
    if preset is not None:
        spec = json.loads(preset.path.read_text())
        fam = family_for(spec.get("model_type"), spec.get("architectures"))
    else:
        if tower == "vision" and _nested_vision(cfg):
            from .towers import NESTED_VISION

            vcfg = getattr(cfg, "vision_config", None)
            if vcfg is None or vcfg.model_type not in NESTED_VISION:
                raise ModelError(f"model_type {cfg.model_type!r} has no CLIP or SigLIP vision tower "
                                 f"(vision_config: {getattr(vcfg, 'model_type', None)}); --tower "
                                 "vision needs one")
            return family_info(NESTED_VISION[vcfg.model_type])
        fam = family_for(cfg.model_type, getattr(cfg, "architectures", None))
        getattr(fam, "check_config", lambda c: None)(cfg)
    if tower is not None and tower not in fam.towers:
        raise ModelError(f"{fam.family} model has no tower {tower}; towers: {', '.join(fam.towers)}")
    if all(e.name != name for e in list_models()) and Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        # missing processors, missing / truncated weights: refused before any work
        check_folder_files(folder, fam.towers if tower is None else (tower,),
                           weights=True)
    return family_info(fam, towers=(tower,) if tower else None)
