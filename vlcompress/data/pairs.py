"""Image-caption pairs: the one data shape every model adapter consumes.

A :class:`PairBatch` holds PIL images and caption strings; a model adapter turns it into
tensors with its own processor (``VLM.encode``). A :class:`PairData` is a sequence of
batches, built from the bundled shapes data or a user folder (images + ``captions.jsonl``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from . import shapes


@dataclass
class PairBatch:
    images: list[Image.Image]
    captions: list[str]
    labels: list[int] | None = None  # class index per image, where the source has classes

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class PairData:
    """Image-caption pairs in batches, plus the class prompts where the source has classes."""

    images: list[Image.Image]
    captions: list[str]
    batch_size: int = 32
    labels: list[int] | None = None
    class_prompts: list[str] | None = None
    retrieval_captions: list[str] | None = None  # captions naming every attribute
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self) -> Iterator[PairBatch]:
        for i in range(0, len(self.images), self.batch_size):
            sl = slice(i, i + self.batch_size)
            yield PairBatch(
                self.images[sl],
                self.captions[sl],
                None if self.labels is None else self.labels[sl],
            )

    def __iter__(self) -> Iterator[PairBatch]:
        return self.batches()

    @property
    def num_batches(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size


def _check_counts(n: int, batch_size: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise DataError(f"calibration size {n!r} is not valid; allowed: a positive integer")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size {batch_size!r} is not valid; allowed: a positive integer")


def shapes_pairs(split: str, n: int, batch_size: int = 32, seed: int = 0) -> PairData:
    """``n`` pairs of the bundled shapes ``split``; ``seed`` offsets the sample indices."""
    _check_counts(n, batch_size)
    imgs, caps, labels, full = [], [], [], []
    start = seed * 100_000
    for i in range(start, start + n):
        img, s = shapes.sample(split, i)
        imgs.append(img)
        caps.append(s.caption)
        labels.append(s.label)
        full.append(s.full_caption)
    return PairData(
        imgs, caps, batch_size, labels,
        class_prompts=[shapes.class_prompt(c, s) for c, s in shapes.CLASSES],
        retrieval_captions=full, source=f"shapes:{split}",
    )


def folder_pairs(path: str | Path, n: int | None = None, batch_size: int = 32) -> PairData:
    """Pairs from a folder holding images and ``captions.jsonl`` lines ``{"image", "caption"}``.

    Optional ``"label"`` (int) on every line and a ``classes.json`` list of prompts enable
    zero-shot evaluation. Every referenced image is opened and verified up front, so a corrupt
    file is reported by name before any work starts.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"calibration folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"calibration path {str(root)!r} is not a folder; allowed: a folder "
                        "with images and captions.jsonl, or 'shapes'")
    index = root / "captions.jsonl"
    if not index.is_file():
        raise DataError(f"calibration folder {str(root)!r} has no captions.jsonl "
                        '(one {"image": ..., "caption": ...} object per line)')
    records = []
    for lineno, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            img, cap = rec["image"], rec["caption"]
            if not isinstance(img, str) or not isinstance(cap, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{index}:{lineno} is not a JSON object with string fields "
                            '"image" and "caption"') from None
        records.append(rec)
        if n is not None and len(records) >= n:
            break
    if not records:
        raise DataError(f"calibration folder {str(root)!r} is empty: captions.jsonl lists no pairs")
    if n is not None:
        _check_counts(n, batch_size)
    imgs, caps, labels = [], [], []
    for rec in records:
        f = root / rec["image"]
        if not f.is_file():
            raise DataError(f"image {str(f)!r} listed in captions.jsonl does not exist")
        try:
            with Image.open(f) as im:
                im.verify()
            with Image.open(f) as im:
                imgs.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            kind = exc.__class__.__name__
            raise DataError(f"image {str(f)!r} is corrupt or not an image ({kind})") from None
        caps.append(rec["caption"])
        labels.append(rec.get("label"))
    has_labels = all(isinstance(x, int) for x in labels)
    prompts = None
    cls_file = root / "classes.json"
    if cls_file.is_file():
        try:
            prompts = json.loads(cls_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise DataError(f"{cls_file} is not valid JSON (a list of class prompts)") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DataError(f"{cls_file} must be a JSON list of class prompt strings")
    return PairData(imgs, caps, batch_size, labels if has_labels else None,
                    class_prompts=prompts if has_labels else None, source=str(root))


def as_pair_data(data: PairData | Sequence[PairBatch]) -> PairData:
    if isinstance(data, PairData):
        return data
    imgs, caps = [], []
    for b in data:
        imgs.extend(b.images)
        caps.extend(b.captions)
    return PairData(imgs, caps, batch_size=max(1, len(data[0]) if data else 1))
