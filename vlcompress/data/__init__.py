"""Data every step uses: image-caption pairs or text alone (the bundled shapes set, user
folders, ``.jsonl`` and ``.txt`` files), all as one :class:`PairData` type.

A source is ``"shapes"`` (the bundled set; each step reads its own split), a folder with
images and ``captions.jsonl``, a captions ``.jsonl`` file, or a ``.txt`` file (one sentence a
line). Text-only data has ``images is None``. :func:`source_kind` says which a source holds
without loading it, so a caller can refuse a text-only source for a model that needs images
before any work (``VLM.check_data``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .pairs import (
    PairBatch,
    PairData,
    as_pair_data,
    folder_pairs,
    has_vqa,
    is_vqa_source,
    save_pairs,
    save_vqa,
    shapes_pairs,
    source_kind,
    text_data,
)
from .vqa import VqaData, folder_vqa, shapes_vqa

SPLITS = ("calibration", "train", "eval")


def load_data(source: str | Path | PairData = "shapes", split: str = "calibration", n: int = 256,
              batch_size: int = 32, seed: int = 0) -> PairData:
    """``n`` items of ``source`` in batches of ``batch_size``: image-caption pairs or text-only
    data (``images is None``), whichever the source holds. ``split`` picks the bundled shapes
    split (``calibration``, ``train``, ``eval``); a user source is the same for every split.
    A :class:`PairData` is returned as is."""
    if isinstance(source, PairData):
        return source
    if split not in SPLITS:
        raise DataError(f"data split {split!r} is not valid; allowed: {', '.join(SPLITS)}")
    if str(source) == "shapes":
        return shapes_pairs(split, n, batch_size, seed if split != "eval" else 0)
    if is_vqa_source(source):  # question-answer data (generative models)
        return folder_vqa(source, n, batch_size)
    if source_kind(source) == "text":
        return text_data(source, n, batch_size)
    p = Path(source)
    if not p.exists():
        raise DataError(f"{split} data {str(source)!r} does not exist; allowed: 'shapes', a folder "
                        "with images and captions.jsonl, a .jsonl or a .txt file")
    return folder_pairs(p, n, batch_size)


def load_calibration(source: str | Path | PairData = "shapes", n: int = 256, batch_size: int = 32,
                     seed: int = 0) -> PairData:
    """Calibration data: ``"shapes"`` (the bundled calibration split), a pairs folder / .jsonl,
    or text-only data (.txt, image-less captions.jsonl) for text encoders."""
    return load_data(source, "calibration", n, batch_size, seed)


def load_eval(source: str | Path | PairData = "shapes", n: int = 720, batch_size: int = 64) -> PairData:
    """Evaluation data: ``"shapes"`` (the bundled eval split) or a user source, as
    :func:`load_calibration`."""
    return load_data(source, "eval", n, batch_size, 0)


def load_train(source: str | Path | PairData = "shapes", n: int = 4096, batch_size: int = 32,
               seed: int = 0) -> PairData:
    """Training data for distillation (recover, UPop / EfficientVLM retraining): ``"shapes"``
    (the bundled train split) or a user source, as :func:`load_calibration`."""
    return load_data(source, "train", n, batch_size, seed)


def generative_eval_data(source, n: int, batch_size: int = 16,
                         questions: bool = True) -> list[PairData]:
    """The evaluation sets a generative model is scored on from one source: its captions
    (``shapes``, a captions folder) and its questions (``vqa.jsonl``), whichever it holds.
    ``questions=False`` (a model that only captions): the captions alone, the source's
    questions left out (:func:`skipped_questions` says whether there were any, for the
    report)."""
    sets: list[PairData] = []
    if not is_vqa_source(source):
        sets.append(load_eval(source, n=n, batch_size=batch_size))
    if not questions:
        return sets
    if str(source) == "shapes":  # the bundled eval split: its captions and its questions
        sets.append(shapes_vqa("eval", n, batch_size))
    elif has_vqa(source):
        sets.append(folder_vqa(source, n=n, batch_size=batch_size))
    return sets


def skipped_questions(source) -> bool:
    """Whether ``source`` holds questions besides its captions (the bundled ``shapes``, a
    folder with captions.jsonl and vqa.jsonl): what a captioning-only model leaves out."""
    return not is_vqa_source(source) and (str(source) == "shapes" or has_vqa(source))


__all__ = ["PairBatch", "PairData", "SPLITS", "as_pair_data", "folder_pairs", "load_calibration",
           "load_data", "load_eval", "load_train", "save_pairs", "save_vqa", "shapes_pairs",
           "source_kind", "text_data", "VqaData", "folder_vqa", "generative_eval_data", "skipped_questions"]
