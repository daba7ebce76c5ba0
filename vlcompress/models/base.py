"""The model adapter: what the pipeline knows about a vision-language model.

A :class:`VLM` wraps an HF model with its processor and knows its towers, its prunable
linears (each with a modality and role) and how to turn a :class:`PairBatch` into tensors.
Families subclass it in one file each and register themselves (see ``registry.py``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.pairs import PairBatch, PairData


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable ``nn.Linear``: ``name`` is its dotted path in ``VLM.model``.

    ``modality`` is ``vision``, ``text`` or ``fusion``; ``role`` one of ``attn.q``, ``attn.k``,
    ``attn.v``, ``attn.o``, ``mlp.in``, ``mlp.out``; ``block`` the encoder layer index.
    """

    name: str
    module: nn.Linear
    modality: str
    role: str
    block: int

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


class VLM:
    """Base adapter. Subclasses set ``family`` and implement the abstract methods."""

    family: str = "?"
    towers: tuple[str, ...] = ()
    #: whether its encoder layers can be sliced (pattern structured): CLIP-style q/k/v/out
    #: projections and fc1/fc2 (see :mod:`vlcompress.models.surgery`)
    structured: bool = False

    def __init__(self, model: nn.Module, tokenizer=None, image_processor=None, name: str = "",
                 source: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name or family_name(model)
        self.source = source
        self.model.eval()

    # --- structure -----------------------------------------------------------------------
    def prunable_layers(self) -> list[PrunableLayer]:
        raise NotImplementedError

    #: which modalities' layers belong to each tower (for ``select_towers``)
    tower_modalities = {"vision": ("vision",), "text": ("text",), "fusion": ("fusion",)}

    def select_towers(self, towers) -> VLM:
        """Keep only ``towers`` (e.g. ``("vision",)``): pruning, export and latency then touch
        those towers alone. Raises ModelError naming the towers the model has."""
        from ..errors import ModelError

        towers = tuple([towers] if isinstance(towers, str) else towers)
        bad = [t for t in towers if t not in self.towers]
        if bad or not towers:
            raise ModelError(f"{self.family} model has no tower {', '.join(bad) or '(none)'}; "
                             f"towers: {', '.join(self.towers)}")
        # an attribute, not a closure over self: a copy (copy.copy, deepcopy) of a selected
        # model then filters its own layers, not the original's
        self._kept_modalities = frozenset(m for t in towers for m in self.tower_modalities[t])
        self.towers = towers
        return self

    def __init_subclass__(cls, **kw):
        """Every family's ``prunable_layers`` honours :meth:`select_towers`."""
        super().__init_subclass__(**kw)
        impl = cls.__dict__.get("prunable_layers")
        if impl is None or getattr(impl, "_honours_towers", False):
            return

        @functools.wraps(impl)
        def prunable_layers(self):
            layers = impl(self)
            keep = self.__dict__.get("_kept_modalities")
            return layers if keep is None else [ly for ly in layers if ly.modality in keep]

        prunable_layers._honours_towers = True
        cls.prunable_layers = prunable_layers

    def tower_module(self, tower: str) -> nn.Module:
        """An ``nn.Module`` computing one tower's embedding, for export and latency."""
        raise NotImplementedError

    def tower_inputs(self, tower: str, batch: PairBatch) -> dict[str, torch.Tensor]:
        """The named input tensors of ``tower_module(tower)`` for ``batch``."""
        raise NotImplementedError

    def dynamic_axes(self, tower: str) -> dict[str, dict[int, str]]:
        raise NotImplementedError

    # --- data ----------------------------------------------------------------------------
    #: the towers that consume images (every other tower reads text only)
    image_towers: tuple[str, ...] = ("vision", "fusion")

    @property
    def needs_images(self) -> bool:
        """Whether this model (its selected towers) needs images: False for text encoders
        (``bert``, ``--tower text``), which also take text-only data."""
        return any(t in self.image_towers for t in self.towers)

    def check_data(self, source, role: str = "data") -> str:
        """The kind of ``source`` (``"pairs"`` / ``"text"``, see ``data.source_kind``); a
        one-line DataError when it is text-only and this model needs images. Cheap: reads
        no image, so callers check every source before any work."""
        from ..data import source_kind
        from ..errors import DataError

        kind = source_kind(source)
        if kind == "text" and self.needs_images:
            name = source.source if isinstance(source, PairData) else str(source)
            need = [t for t in self.towers if t in self.image_towers]
            raise DataError(f"{role} {name!r} is text-only, but the {self.family} towers "
                            f"{', '.join(need)} need images; allowed: image-caption pairs "
                            "('shapes', a folder with images and captions.jsonl) - text-only "
                            "data (.txt, captions.jsonl without images) fits text encoders "
                            "(bert, --tower text)")
        return kind

    def encode(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        """Turn a batch of PIL images and captions into the model's input tensors."""
        raise NotImplementedError

    def token_mask(self, modality: str, encoded: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Bool [batch, tokens] of real (non-padding) tokens seen by ``modality``'s layers;
        None when every token counts."""
        return None

    def model_inputs(self, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword arguments of ``self.model`` among ``encoded`` (an adapter may carry
        extra tensors in ``encoded``, e.g. a padding mask the model itself must not see)."""
        return encoded

    @torch.no_grad()
    def forward(self, batch: PairBatch | dict[str, torch.Tensor]):
        """Run the model on one calibration batch (raw or encoded)."""
        enc = self.encode(batch) if isinstance(batch, PairBatch) else batch
        return self.model(**self.model_inputs(enc))

    def embed_images(self, images) -> torch.Tensor:
        raise NotImplementedError

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own training loss on a batch (contrastive for CLIP)."""
        raise NotImplementedError

    def features(self, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Differentiable outputs for distillation (gradients on): one entry per tower named
        after it (``vision``: [B, T, D] tokens or [B, D], ``text``: [B, D]), and optionally
        ``logits`` ([B, B] image-text similarity logits), ``itm`` ([B, 2] matching logits of the
        aligned pairs) and ``loss`` (the model's own contrastive loss). The default runs each
        selected tower's ``tower_module`` on the ``encoded`` tensors it takes, which suits
        one-tower models; a two-tower family overrides it to add logits and loss.
        ``vlcompress.distill`` turns the teacher's and student's features into a loss."""
        out = {}
        for tower in self.towers:
            mod = self.tower_module(tower)
            names = inspect.signature(mod.forward).parameters
            out[tower] = mod(**{k: encoded[k] for k in names if k in encoded})
        return out

    # --- io ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(path)

    def num_parameters(self) -> tuple[int, int]:
        """(total, nonzero) parameter counts."""
        total = nonzero = 0
        for p in self.model.parameters():
            total += p.numel()
            nonzero += int(torch.count_nonzero(p).item())
        return total, nonzero

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r})"


def family_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", "") or type(model).__name__
