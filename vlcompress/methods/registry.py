"""The method registry: every pruning method is a declaration, checked before any work.

A :class:`Method` says what the method *is* (its ``kind``), which patterns and families it
supports and what it *needs*; :func:`check_method` checks a method x pattern x family x data
combination and fails with one line naming the allowed values. The callables are plain
functions, called by :func:`vlcompress.prune.prune` with a :class:`Context`:

=================  =========================================================================
kind               what prune() calls
=================  =========================================================================
``score``          ``score(layer, stats, *, seed, extra=None) -> Tensor`` per prunable weight
                   (pure; ``scoring/``), then the method's allocation and the pattern
``prepare+score``  ``prepare(ctx, layers, stats) -> Prepared`` once (a model-level pass:
                   SNIP's gradients, ECoFLaP's block budget), then ``score`` per layer
``solve``          ``solve(ctx, layers) -> Solved``: masks the weights itself and may update
                   the surviving ones (SparseGPT), or chooses among methods (``auto``)
``group``          ``group_importance(ctx, blocks) -> (head scores, neuron scores)`` for the
                   structured pattern (MoPE); ``layer_importance(ctx, blocks)`` for ``depth``
``search+retrain`` ``search(ctx, blocks) -> (head scores, neuron scores, keep counts,
                   details)``, then slicing, then ``retrain(ctx, dense) -> details``
=================  =========================================================================

This module is a leaf: it imports nothing of vlcompress but :mod:`vlcompress.errors`. The
methods themselves live in ``scoring/`` (pure per-weight scorers, registered through
:func:`vlcompress.scoring.register_scorer`) and ``methods/`` (everything else); both packages
are discovered on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError, PatternError

KINDS = ("score", "prepare+score", "solve", "group", "search+retrain")
PATTERN_KINDS = ("unstructured", "nm", "structured")
#: What a method may need. ``calibration``: calibration pairs (or sentences); ``loss``: the
#: model's own training loss (gradients or loss probes); ``image_text``: an image-text model
#: with two towers (contrastive distillation / metrics); ``training``: training pairs.
NEEDS = ("calibration", "loss", "image_text", "training")
_PATTERN_NAMES = {"unstructured": "unstructured", "nm": "N:M", "structured": "structured"}


@dataclass(frozen=True)
class Option:
    """One option a method exposes (``--method-option NAME=VALUE``; ``method_options`` in the
    API): its type (int, float, str or bool), default, the allowed ``choices`` (str) or the
    smallest allowed value (numbers) and one line of help."""

    name: str
    type: type
    default: object
    help: str = ""
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    #: a further check of the cast value: the reason it is refused, or None
    validate: Callable[[object], str | None] | None = None

    def describe(self) -> str:
        allowed = "|".join(self.choices) if self.choices else self.type.__name__
        if self.minimum is not None:
            allowed += f" >= {self.minimum:g}"
        return f"{self.name}={self.default} ({allowed})"

    def check(self, method: str, value) -> object:
        """``value`` (a str from the CLI or a Python value) cast and checked; one line else."""
        bad = f"method option {method}.{self.name}={value!r} is not valid; allowed: {self.describe()}"
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError
                    v = low in ("1", "true", "yes")
                elif isinstance(value, bool):
                    v = value
                else:
                    raise ValueError
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and value != int(value)):
                    raise ValueError
                v = int(str(value).strip()) if isinstance(value, str) else int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                v = float(value)
                if v != v or v in (float("inf"), float("-inf")):
                    raise ValueError
            else:
                v = str(value).strip()
        except (TypeError, ValueError):
            raise ConfigError(bad) from None
        if self.choices is not None and v not in self.choices:
            raise ConfigError(bad)
        if self.minimum is not None and v < self.minimum:
            raise ConfigError(bad)
        if self.validate is not None:
            reason = self.validate(v)
            if reason:
                raise ConfigError(f"method option {method}.{self.name}={value!r} is not "
                                  f"valid: {reason}")
        return v


#: Options of every method that supports N:M (``--method-option permute=true``): channel
#: permutation before the N:M selection (:mod:`vlcompress.sparsity.permute`), and the search's
#: time budget for the whole model.
NM_OPTIONS = (
    Option("permute", bool, False, "permute each layer's input channels (absorbed into the "
           "layer that produces them) so the N:M groups keep more importance; N:M only"),
    Option("permute_seconds", float, 30.0, "time budget of the permutation search, whole "
           "model", minimum=0.0),
    Option("permute_rounds", int, 0, "cap on each layer's search rounds, for a run that "
           "repeats on any load (0: no cap, the time budget alone)", minimum=0),
    Option("permute_objective", str, "auto", "what the search maximises: the kept scores "
           "summed over the matrix (score), each output row's kept share (row), or auto: row "
           "for a scorer whose score carries a factor per output row (MULTIFLOW's I_out), "
           "score for the others", choices=("auto", "score", "row")),
)

#: Options of every method that supports structured pruning (``--method-option kv_groups=``):
#: how a grouped-query attention (a LLaMA / Qwen2 decoder) loses heads. ``within``: query heads
#: only, the same number from each key/value group (every k/v head stays); ``whole``: whole
#: groups (a group's query heads with its k/v head; ``num_key_value_heads`` shrinks);
#: ``auto``: per layer, whichever the scores make cheaper (see ``sparsity.structured``).
KV_GROUP_MODES = ("within", "whole", "auto")
STRUCTURED_OPTIONS = (
    Option("kv_groups", str, "within", "grouped-query attention: remove query heads within "
           "each key/value group, whole groups (k/v projections shrink), or per layer as the "
           "scores say; structured only", choices=KV_GROUP_MODES),
)


@dataclass(frozen=True)
class Method:
    """A pruning method's declaration (see the module doc)."""

    name: str
    kind: str
    description: str
    patterns: tuple[str, ...] = ("unstructured", "nm")
    needs: tuple[str, ...] = ()
    families: tuple[str, ...] | None = None  # None: every family the pattern supports
    allocation: str = "layerwise"  # default weight allocation for score-based kinds
    score: Callable | None = None
    prepare: Callable | None = None
    solve: Callable | None = None
    group_importance: Callable | None = None
    layer_importance: Callable | None = None  # makes ``depth`` available
    search: Callable | None = None
    retrain: Callable | None = None
    structured_allocation: str | None = None  # the label a search reports
    options: tuple[Option, ...] = ()  # what the method exposes (its reference's knobs)
    #: its score multiplies each output row by one factor (MULTIFLOW's I_out): an N:M mask
    #: never sees it, so the permutation search's ``auto`` objective divides it out ("row")
    row_factor: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        bad = [p for p in self.patterns if p not in PATTERN_KINDS]
        bad += [n for n in self.needs if n not in NEEDS]
        if bad:
            raise ValueError(f"method {self.name!r}: unknown pattern/need {bad}")
        required = {"score": ("score",), "prepare+score": ("prepare", "score"), "solve": ("solve",),
                    "group": ("group_importance",), "search+retrain": ("search",)}[self.kind]
        missing = [r for r in required if getattr(self, r) is None]
        if missing:
            raise ValueError(f"method {self.name!r} of kind {self.kind!r} lacks {missing}")

    @property
    def needs_calibration(self) -> bool:
        return "calibration" in self.needs

    @property
    def updates_weights(self) -> bool:
        return self.kind in ("solve", "search+retrain")

    @property
    def pattern_names(self) -> str:
        return ", ".join(_PATTERN_NAMES[p] for p in self.patterns)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "patterns": list(self.patterns),
                "needs": list(self.needs), "families": None if self.families is None
                else list(self.families), "allocation": self.allocation,
                "description": self.description,
                "options": {o.name: {"type": o.type.__name__, "default": o.default,
                                     "help": o.help} for o in self.options}}

    def permute_objective(self, asked: str) -> str:
        """The permutation search's objective for ``asked`` (``auto``: see :attr:`row_factor`)."""
        return ("row" if self.row_factor else "score") if asked == "auto" else asked

    @property
    def run_options(self) -> tuple[Option, ...]:
        """Options every method of a pattern gets (:data:`NM_OPTIONS` for N:M methods,
        :data:`STRUCTURED_OPTIONS` for structured ones)."""
        return (NM_OPTIONS if "nm" in self.patterns else ()) + \
            (STRUCTURED_OPTIONS if "structured" in self.patterns else ())

    def check_options(self, given: dict | None) -> dict:
        """Every option of this method, ``given`` ones checked and cast, the rest defaulted;
        an unknown name or a bad value is one ConfigError line naming what is allowed. The
        :attr:`run_options` appear only when one of them is given (then all, defaulted)."""
        known = {o.name: o for o in self.options}
        shared = {o.name: o for o in self.run_options}
        given = dict(given or {})
        unknown = [k for k in given if k not in known and k not in shared]
        if unknown:
            allowed = ", ".join(o.describe() for o in self.options + self.run_options) or "none"
            raise ConfigError(f"method {self.name!r} has no option {unknown[0]!r}; its options: "
                              f"{allowed}")
        out = {name: (o.check(self.name, given[name]) if name in given else o.default)
               for name, o in known.items()}
        if any(name in given for name in shared):
            out.update({name: (o.check(self.name, given[name]) if name in given else o.default)
                        for name, o in shared.items()})
        return out


@dataclass
class Prepared:
    """What ``prepare`` returns: per-layer inputs to ``score`` (``extra``), optional per-layer
    sparsity ratios applied per output row, and JSON-able details for the result."""

    extra: dict = field(default_factory=dict)
    ratios: dict[str, float] | None = None
    details: dict = field(default_factory=dict)


@dataclass
class Solved:
    """What ``solve`` returns: ``masks`` (True = kept) for every layer it pruned, JSON-able
    ``details``, the allocation label and the seconds spent collecting calibration data."""

    masks: dict
    details: dict = field(default_factory=dict)
    allocation: str = ""
    calibration_seconds: float = 0.0


@dataclass
class Context:
    """What prune() hands a method: the model, the validated ``PruneConfig``, the calibration
    data (None when the method needs none), the training data (search+retrain), progress,
    the dense teacher copy (search+retrain) and ``prune``: prune() itself, for methods that
    run other methods (``auto``)."""

    vlm: object
    cfg: object
    data: object = None
    train: object = None
    progress: object = None
    prune: Callable | None = None
    dense: object = None  # search+retrain: the frozen dense copy (teacher of search and retrain)


_METHODS: dict[str, Method] = {}
_DISCOVERED = False
#: Packages whose modules register methods when imported.
PACKAGES = ("vlcompress.scoring", "vlcompress.methods")


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (a second registration of a name replaces the first)."""
    _METHODS[method.name] = method
    return method


def _discover() -> None:
    """Import every module of the method packages once (each registers what it defines)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_") and mod.name != "registry":
                importlib.import_module(f"{pkg_name}.{mod.name}")


def available_methods() -> list[str]:
    _discover()
    return sorted(_METHODS)


def methods() -> list[Method]:
    _discover()
    return [_METHODS[n] for n in sorted(_METHODS)]


def get_method(name: str) -> Method:
    _discover()
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; allowed: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def _pattern_kind(pattern) -> str:
    kind = getattr(pattern, "kind", None) or str(pattern)
    return "nm" if kind not in ("unstructured", "structured") else kind


def methods_for(pattern_kind: str) -> list[str]:
    return [m.name for m in methods() if pattern_kind in m.patterns]


#: method kinds whose masks reconstruction may follow (they choose, they do not update)
SCORING_KINDS = ("score", "prepare+score")


def reconstruct_refusal(method: Method, pattern) -> str | None:
    """Why reconstruction (:mod:`vlcompress.methods.reconstruct`) cannot be asked of
    ``method`` at ``pattern``, or None when it can: one line naming what is allowed."""
    if method.kind not in SCORING_KINDS:
        if method.name == "sparsegpt":
            return ("--reconstruct is implied by method 'sparsegpt' (its OBS sweep already updates "
                    "the surviving weights); drop --reconstruct")
        return (f"--reconstruct follows a scorer's mask; method {method.name!r} (kind "
                f"{method.kind}) prunes by its own procedure; allowed: a scoring method ("
                + ", ".join(m.name for m in methods() if m.kind in SCORING_KINDS)
                + ") or --no-reconstruct")
    if _pattern_kind(pattern) == "structured":
        return ("--reconstruct applies to unstructured and N:M patterns, not structured (whole "
                "heads and neurons are sliced away); allowed: --no-reconstruct with pattern "
                "structured")
    return None


def check_method(name: str, pattern, *, depth: int = 0) -> Method:
    """The method ``name``, checked against ``pattern`` (a Pattern or its text) and ``depth``;
    a one-line ConfigError naming what is allowed otherwise."""
    m = get_method(name)
    pk = _pattern_kind(pattern)
    if pk not in m.patterns:
        raise ConfigError(f"method {name!r} does not support pattern {pattern}; {name} supports "
                          f"{m.pattern_names}; methods for {_PATTERN_NAMES[pk]}: "
                          f"{', '.join(methods_for(pk))}")
    if depth and m.layer_importance is None:
        with_depth = [x.name for x in methods() if x.layer_importance is not None]
        raise ConfigError(f"--depth {depth} needs a method that scores whole layers "
                          f"({', '.join(with_depth)}), not {name!r}")
    return m


@dataclass(frozen=True)
class FamilyInfo:
    """What the checks need to know of a model before loading its weights."""

    family: str
    towers: tuple[str, ...]
    has_loss: bool  # the adapter defines the model's own training loss
    structured: bool  # its encoder layers can be sliced (pattern structured)
    image_text: bool  # an image-text model with contrastive image and text embeddings
    structured_families: tuple[str, ...] = ()  # every registered family that ``structured`` fits
    generative: bool = False  # a generative VLM (llava): its towers are parts, evaluated by generation


def check_family(method: Method, pattern, info: FamilyInfo) -> None:
    """Fail with one line when ``method`` x ``pattern`` cannot run on a model like ``info``."""
    pk = _pattern_kind(pattern)
    if pk == "structured" and not info.structured:
        raise PatternError(f"pattern structured is not supported for family {info.family!r} (it "
                          "slices encoder layers of known layouts: q/k/v or fused qkv, "
                          "out-projection, fc1/fc2); "
                          f"supported: {', '.join(info.structured_families)}; use unstructured "
                          "or N:M")
    if method.families is not None and info.family not in method.families:
        raise ConfigError(f"method {method.name!r} supports the families "
                          f"{', '.join(method.families)}, not {info.family!r}")
    if "loss" in method.needs and not info.has_loss:
        ok = [m.name for m in methods() if "loss" not in m.needs and pk in m.patterns]
        raise ConfigError(f"method {method.name!r} needs the model's own training loss, which "
                          f"family {info.family!r} (towers: {', '.join(info.towers)}) does not "
                          f"have; methods for it: {', '.join(ok)}")
    if "image_text" in method.needs and not info.image_text:
        raise ConfigError(f"method {method.name!r} distils image-text models with two towers; "
                          f"this model has {', '.join(info.towers)}")
