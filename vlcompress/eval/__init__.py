"""Accuracy of a model on image-caption pairs: zero-shot classification, retrieval, fidelity."""

from __future__ import annotations

from .metrics import EvalEmbeddings, embed_eval, evaluate, fidelity, metrics_from_embeddings

__all__ = ["EvalEmbeddings", "embed_eval", "evaluate", "fidelity", "metrics_from_embeddings"]
