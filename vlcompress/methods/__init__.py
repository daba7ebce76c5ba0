"""Pruning methods that are more than a per-weight score, and the registry of all methods.

One file per method: model-level passes (``snip``, ``ecoflap``), solvers that update weights
(``sparsegpt``), a meta-method (``auto``), group importance (``mope``) and search + retrain
(``upop``, ``efficientvlm``). Pure per-weight scorers live in :mod:`vlcompress.scoring`. Each
module registers a :class:`~vlcompress.methods.registry.Method` declaration when imported;
see :mod:`vlcompress.methods.registry`.
"""

from __future__ import annotations

from .registry import (
    Context,
    FamilyInfo,
    Method,
    Prepared,
    Solved,
    available_methods,
    check_family,
    check_method,
    get_method,
    methods,
    register_method,
)

__all__ = ["Method", "Context", "FamilyInfo", "Prepared", "Solved", "available_methods",
           "check_family", "check_method", "get_method", "methods", "register_method"]
