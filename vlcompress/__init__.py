"""vlcompress: prune, export and benchmark sparse vision-language models.

Public API: :func:`load_model`, :func:`load_calibration`, :func:`prune`, :func:`export`,
:func:`evaluate`, :func:`benchmark`, :func:`prune_export`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .data import load_calibration, load_eval  # noqa: E402
from .models import load_model  # noqa: E402

__all__ = ["__version__", "load_model", "load_calibration", "load_eval"]
