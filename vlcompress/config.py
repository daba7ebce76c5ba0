"""Frozen, validated configuration objects.

Each config checks itself in ``__post_init__`` and raises :class:`ConfigError` (a
``ValueError``) with one line naming the bad value and what is allowed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import ConfigError

_NM_RE = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``unstructured``, ``N:M`` (keep N of every M input columns) or
    ``structured`` (whole attention heads and MLP neurons removed, layers physically sliced)."""

    kind: str  # "unstructured" | "nm" | "structured"
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        if isinstance(text, Pattern):
            return text
        if not isinstance(text, str):
            raise ConfigError(f"pattern {text!r} is not a string; allowed: unstructured, N:M")
        t = text.strip().lower()
        if t in ("unstructured", "structured"):
            return cls(t)
        mt = _NM_RE.match(t)
        if mt:
            n, m = int(mt.group(1)), int(mt.group(2))
            if not 0 < n < m:
                raise ConfigError(
                    f"pattern {text!r} is an impossible N:M; need 0 < N < M (e.g. 2:4, 4:8)"
                )
            return cls("nm", n, m)
        raise ConfigError(
            f"unknown pattern {text!r}; allowed: unstructured, structured, N:M (e.g. 2:4, 4:8)")

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def is_structured(self) -> bool:
        return self.kind == "structured"

    @property
    def implied_sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else self.kind


def check_sparsity(value) -> float:
    """Turn ``value`` into a float in [0, 1) or raise a one-line ConfigError."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity {value!r} is not a number; allowed: 0 <= sparsity < 1") from None
    if math.isnan(s) or not 0.0 <= s < 1.0:
        raise ConfigError(f"sparsity {value!r} is out of range; allowed: 0 <= sparsity < 1")
    return s


STRUCTURED_UNITS = ("heads", "neurons")


def parse_units(value) -> tuple[str, ...]:
    """``"heads,neurons"`` (or a sequence) -> a tuple of structured units, checked."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    units = tuple(dict.fromkeys(str(u).strip().lower() for u in items if str(u).strip()))
    bad = [u for u in units if u not in STRUCTURED_UNITS]
    if bad or not units:
        raise ConfigError(f"units {value!r} are not valid; allowed: heads, neurons or heads,neurons")
    return units


def check_positive_int(value, name: str, *, zero_ok: bool = False) -> int:
    """``value`` as an int > 0 (>= 0 with ``zero_ok``), or a one-line ConfigError naming ``name``."""
    allowed = "a non-negative integer" if zero_ok else "a positive integer"
    if isinstance(value, bool):
        raise ConfigError(f"{name} {value!r} is not valid; allowed: {allowed}")
    try:
        v = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ConfigError(f"{name} {value!r} is not an integer; allowed: {allowed}") from None
    if isinstance(value, float) and value != v:
        raise ConfigError(f"{name} {value!r} is not an integer; allowed: {allowed}")
    if v < 0 or (v == 0 and not zero_ok):
        raise ConfigError(f"{name} {value!r} is not valid; allowed: {allowed}")
    return v


def parse_method_options(value) -> dict:
    """``["k=v", ...]``, ``"k=v,k2=v2"`` or a mapping -> ``{k: v}`` (values still text from
    the CLI; the method's declaration casts and checks them)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    items = value.split(",") if isinstance(value, str) else list(value)
    out: dict = {}
    for it in items:
        text = str(it).strip()
        if not text:
            continue
        key, sep, val = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"method option {text!r} is not KEY=VALUE (e.g. search_steps=40)")
        out[key.strip()] = val.strip()
    return out


#: modalities of prunable layers: encoder towers, and a generative model's parts
MODALITIES = ("vision", "text", "fusion", "bridge", "language")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    ``sparsity`` may be None for an N:M pattern (it is implied: 2:4 is 0.5); a given sparsity
    that conflicts with the N:M pattern is an error. ``scope`` picks modalities to prune
    (None = every prunable layer). ``skip_incompatible`` skips layers whose input width is not
    a multiple of M instead of failing.
    """

    method: str = "multiflow"
    sparsity: float | None = None
    pattern: Pattern | str = "2:4"
    scope: tuple[str, ...] | None = None
    skip_incompatible: bool = False
    seed: int = 0
    layerwise: bool = False  # uniform per-layer allocation instead of the method's default
    # structured pattern only: which groups to remove, the width multiple kept, layers dropped
    units: tuple[str, ...] | str = STRUCTURED_UNITS
    round_to: int | str = 8
    depth: int | str = 0
    # the method's own options (its Method.options), checked and completed with defaults
    method_options: dict | None = None
    # fit the survivors after a scorer's mask (methods/reconstruct.py); None: where it applies
    reconstruct: bool | None = None

    def __post_init__(self):
        from .methods.registry import check_method, reconstruct_refusal  # a leaf registry

        pat = Pattern.parse(self.pattern)
        object.__setattr__(self, "pattern", pat)
        object.__setattr__(self, "units", parse_units(self.units))
        object.__setattr__(self, "round_to", check_positive_int(self.round_to, "--round-to"))
        object.__setattr__(self, "depth", check_positive_int(self.depth, "--depth", zero_ok=True))
        if self.depth and not pat.is_structured:
            raise ConfigError(f"--depth {self.depth} removes whole layers: it needs pattern "
                              f"structured, not {pat}")
        m = check_method(self.method, pat, depth=self.depth)
        given = parse_method_options(self.method_options)
        object.__setattr__(self, "method_options", m.check_options(given))
        if self.reconstruct not in (None, True, False):
            raise ConfigError(f"reconstruct {self.reconstruct!r} is not valid; allowed: True, "
                              "False or None (where it applies)")
        why = reconstruct_refusal(m, pat) if self.reconstruct else None
        if why:
            raise ConfigError(why)
        kv = self.method_options.get("kv_groups", "within")
        if kv != "within" and not pat.is_structured:
            raise ConfigError(f"method option kv_groups={kv} removes whole key/value groups of "
                              f"a structured prune, not {pat}; use --pattern structured or drop it")
        if kv != "within" and m.search is not None:
            raise ConfigError(f"method option kv_groups={kv} is not available with {m.name!r} "
                              "(its search sets the head counts); allowed: kv_groups=within")
        if self.method_options.get("permute") and not pat.is_nm:
            raise ConfigError(f"method option permute=true permutes input channels for an N:M "
                              f"pattern, not {pat}; use --pattern 2:4 (or another N:M) or drop it")
        if "permute" in self.method_options and not self.method_options["permute"]:
            # a search setting without the search (a default value passes: a recorded
            # method_options dict holds them all)
            defaults = {o.name: o.default for o in m.run_options}
            idle = [k for k in ("permute_seconds", "permute_rounds", "permute_objective")
                    if k in given and self.method_options[k] != defaults[k]]
            if idle:
                raise ConfigError(f"method option {idle[0]} sets the channel permutation "
                                  "search, which runs only with permute=true; add "
                                  "--method-option permute=true or drop it")
        if pat.is_nm:
            implied = pat.implied_sparsity
            if self.sparsity is not None:
                s = check_sparsity(self.sparsity)
                if abs(s - implied) > 1e-9:
                    raise ConfigError(
                        f"sparsity {self.sparsity!r} conflicts with pattern {pat} which fixes "
                        f"sparsity at {implied:g}; omit --sparsity or pass {implied:g}"
                    )
            object.__setattr__(self, "sparsity", implied)
        else:
            s = 0.5 if self.sparsity is None else check_sparsity(self.sparsity)
            object.__setattr__(self, "sparsity", s)
        if self.scope is not None:
            scope = tuple(self.scope)
            bad = [m for m in scope if m not in MODALITIES]
            if bad or not scope:
                raise ConfigError(f"scope {','.join(scope) or '(empty)'} is not valid; allowed: "
                                  f"{', '.join(MODALITIES)}")
            object.__setattr__(self, "scope", scope)


def parse_batch_sizes(text: str | tuple | list) -> tuple[int, ...]:
    """Parse ``"1,8,64"`` into ``(1, 8, 64)`` with a one-line error on bad input."""
    if isinstance(text, (tuple, list)):
        items = list(text)
    else:
        items = [t for t in str(text).split(",") if t.strip()]
    out = []
    for it in items:
        try:
            v = int(str(it).strip())
        except ValueError:
            raise ConfigError(
                f"batch size {it!r} is not an integer; allowed: comma-separated positive integers"
            ) from None
        if v < 1:
            raise ConfigError(f"batch size {v} is not positive; allowed: positive integers")
        out.append(v)
    if not out:
        raise ConfigError("no batch sizes given; allowed: comma-separated positive integers")
    return tuple(out)
