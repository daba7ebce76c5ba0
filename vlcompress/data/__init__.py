"""Image-caption data: the bundled shapes set and user folders."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .pairs import PairBatch, PairData, folder_pairs, shapes_pairs


def load_calibration(source: str | Path = "shapes", n: int = 256, batch_size: int = 32,
                     seed: int = 0) -> PairData:
    """Calibration pairs: ``"shapes"`` (the bundled calibration split) or a folder path."""
    if str(source) == "shapes":
        return shapes_pairs("calibration", n, batch_size, seed)
    p = Path(source)
    if not p.exists():
        raise DataError(f"calibration source {str(source)!r} does not exist; allowed: 'shapes' "
                        "or a folder with images and captions.jsonl")
    return folder_pairs(p, n, batch_size)


def load_eval(source: str | Path = "shapes", n: int = 720, batch_size: int = 64) -> PairData:
    """Evaluation pairs: ``"shapes"`` (the bundled eval split) or a folder path."""
    if str(source) == "shapes":
        return shapes_pairs("eval", n, batch_size, 0)
    return folder_pairs(source, n, batch_size)


def source_kind(source) -> str:  # TEMP until the data branch lands
    return "pairs"


def load_training(source, n: int = 4096, batch_size: int = 32, seed: int = 0) -> PairData:  # TEMP
    if str(source) == "shapes":
        return shapes_pairs("train", n, batch_size, seed)
    return folder_pairs(source, n, batch_size)


__all__ = ["PairBatch", "PairData", "load_calibration", "load_eval", "folder_pairs",
           "shapes_pairs"]
