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


def _load_model(name_or_path, *, random_init: bool, tower: str | None) -> VLM:
    import transformers

    _quiet_transformers()
    name = str(name_or_path)
    by_name = {e.name: e for e in list_models()}
    if name in by_name and by_name[name].kind == "preset":
        return _load_preset(by_name[name])
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
    if tower == "vision" and cfg.model_type not in families():
        from .towers import load_nested_vision_tower

        return load_nested_vision_tower(path, cfg, random_init=random_init, name=name)
    fam = family_for(cfg.model_type)
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
        model = model_cls.from_pretrained(path)
    tok, img = _load_processors(path)
    return fam(model, tok, img, name=name, source=path)


def _load_preset(entry) -> VLM:
    import transformers

    cfg_dict = json.loads(entry.path.read_text())
    cfg_dict.pop("_description", None)
    model_type = cfg_dict.pop("model_type")
    fam = family_for(model_type)
    cfg = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    model = fam.hf_class()(cfg)
    tok, img = fam.default_processors(cfg)
    return fam(model, tok, img, name=entry.name, source=f"preset:{entry.name}")


def peek_model(name_or_path: str | Path, *, tower: str | None = None):
    """What the checks need to know of a model (:class:`FamilyInfo`), read from its config
    alone: no weights are loaded, so a bad method x pattern x family combination fails in
    well under a second. Raises ModelError for what ``load_model`` would refuse."""
    import transformers

    _quiet_transformers()
    name = str(name_or_path)
    by_name = {e.name: e for e in list_models()}
    if name in by_name and by_name[name].kind == "preset":
        cfg_dict = json.loads(by_name[name].path.read_text())
        model_type = cfg_dict.get("model_type")
        fam = family_for(model_type)
    else:
        if name in by_name:
            path = str(by_name[name].path)
        else:
            p = Path(name).expanduser()
            if p.exists() and not (p / "config.json").is_file():
                raise ModelError(f"model folder {name!r} has no config.json (not an HF model folder)")
            if not p.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
                raise ModelError(f"model {name!r} is not a bundled name or preset "
                                 f"({', '.join(by_name)}), an HF id like org/name, or a model folder")
            path = str(p) if p.exists() else name
        try:
            cfg = transformers.AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load model {name!r}: not a bundled name ({', '.join(by_name)}), "
                f"nor a local folder, nor an HF id reachable offline ({exc.__class__.__name__})"
            ) from None
        if tower == "vision" and cfg.model_type not in families():
            from .towers import NESTED_VISION

            vcfg = getattr(cfg, "vision_config", None)
            if vcfg is None or vcfg.model_type not in NESTED_VISION:
                raise ModelError(f"model_type {cfg.model_type!r} has no CLIP or SigLIP vision tower "
                                 f"(vision_config: {getattr(vcfg, 'model_type', None)}); --tower "
                                 "vision needs one")
            return family_info(NESTED_VISION[vcfg.model_type])
        fam = family_for(cfg.model_type)
    if tower is not None and tower not in fam.towers:
        raise ModelError(f"{fam.family} model has no tower {tower}; towers: {', '.join(fam.towers)}")
    return family_info(fam, towers=(tower,) if tower else None)
