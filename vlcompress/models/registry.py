"""Model families, bundled models and architecture presets, by name.

A family registers its adapter class for one or more HF ``model_type`` values with
:func:`register_family`; ``load_model`` finds the family from the config of whatever it
loads. Bundled models ship in ``vlcompress/assets``; presets are configs that build randomly
initialised full-size models for latency work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

ASSETS = Path(__file__).resolve().parent.parent / "assets"

_FAMILIES: dict[str, type] = {}
#: HF architecture name -> family, for model types several families share (``blip``:
#: retrieval, captioning, VQA); consulted before the model type
_ARCHITECTURES: dict[str, type] = {}


def register_family(*model_types: str, architectures: tuple[str, ...] = ()):
    def deco(cls):
        for mt in model_types:
            _FAMILIES[mt] = cls
        for arch in architectures:
            _ARCHITECTURES[arch] = cls
        return cls

    return deco


def families() -> dict[str, type]:
    _import_families()
    return dict(_FAMILIES)


def _import_families() -> None:
    """Import every family module of this package (each registers itself)."""
    import importlib
    import pkgutil

    from .. import models

    for mod in pkgutil.iter_modules(models.__path__):
        if mod.name not in ("base", "registry") and not mod.name.startswith("_"):
            importlib.import_module(f"{models.__name__}.{mod.name}")


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "bundled" | "preset"
    family: str
    description: str
    path: Path


MODEL_CARD = "vlcompress.json"


def model_card(folder) -> dict:
    """The ``vlcompress.json`` a model folder carries (every bundled model has one; any model
    folder may), or ``{}``: family, description, training record and, optionally, the
    ``recover_recipe`` that :func:`vlcompress.recover.recover` starts from."""
    f = Path(folder) / MODEL_CARD if folder else None
    if f is None or not f.is_file():
        return {}
    try:
        card = json.loads(f.read_text())
    except ValueError:
        raise ModelError(f"{str(f)!r} is not valid JSON; allowed: a vlcompress model card "
                         "(or no such file)") from None
    if not isinstance(card, dict):
        raise ModelError(f"{str(f)!r} is not a JSON object; allowed: a vlcompress model card")
    return card


def bundled_models() -> list[Entry]:
    out = []
    root = ASSETS / "models"
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if (d / "config.json").is_file():
                meta = model_card(d)
                out.append(Entry(d.name, "bundled", meta.get("family", "clip"),
                                 meta.get("description", ""), d))
    return out


def presets() -> list[Entry]:
    out = []
    root = ASSETS / "presets"
    if root.is_dir():
        for f in sorted(root.glob("*.json")):
            cfg = json.loads(f.read_text())
            fam = cfg.get("model_type", "?")
            if cfg.get("architectures"):  # blip: retrieval, captioning, VQA share the type
                _import_families()
                fam = next((_ARCHITECTURES[a].family for a in cfg["architectures"]
                            if a in _ARCHITECTURES), fam)
            out.append(Entry(f.stem, "preset", fam,
                             cfg.pop("_description", "randomly initialised"), f))
    return out


def family_for(model_type: str, architectures=None):
    """The family of a config: by its ``architectures`` where a family registered one of
    them (a BLIP captioning config is ``model_type`` ``blip`` like a retrieval one), else by
    its ``model_type``."""
    fams = families()
    for arch in architectures or ():
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    if model_type not in fams:
        raise ModelError(
            f"model_type {model_type!r} is not supported; supported families: "
            f"{', '.join(sorted(fams))}"
        )
    return fams[model_type]


def family_info(vlm_or_cls, towers=None):
    """A :class:`~vlcompress.methods.registry.FamilyInfo` of an adapter class or instance
    (``towers``: the towers kept, when fewer than the family's)."""
    from ..methods.registry import FamilyInfo
    from .base import VLM

    cls = vlm_or_cls if isinstance(vlm_or_cls, type) else type(vlm_or_cls)
    all_towers = tuple(cls.towers)
    if towers is None:
        towers = all_towers if isinstance(vlm_or_cls, type) else tuple(vlm_or_cls.towers)
    towers = tuple(towers)
    whole = towers == all_towers
    return FamilyInfo(family=cls.family, towers=towers,
                      has_loss=whole and cls.loss is not VLM.loss,
                      structured=bool(getattr(cls, "structured", False)),
                      image_text=whole and (("vision" in towers and "text" in towers)
                                            or bool(getattr(cls, "image_text", False))),
                      generative=bool(getattr(cls, "generative", False)),
                      structured_families=tuple(sorted(
                          n for n, c in families().items() if getattr(c, "structured", False))))
