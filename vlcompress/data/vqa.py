"""Question-answer data for generative VLMs: a folder with ``vqa.jsonl``.

Each line is ``{"image": "img/0.png", "question": "what color is it ?", "answer": "red"}``;
``answer`` is one string or a list of accepted strings (VQA-style: a prediction is right
when it matches any of them after normalisation). A folder may hold ``captions.jsonl`` too;
the caption loaders read that, the VQA loaders this.

:class:`VqaData` is a :class:`~vlcompress.data.pairs.PairData` whose batches are
:class:`GenBatch` (images, questions, answers): every step that takes calibration or
training pairs takes it, and a generative adapter builds ``prompt(question) + answer``
sequences from it. Its ``captions`` are the first accepted answers (the target texts).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .pairs import VQA_INDEX as INDEX
from .pairs import PairBatch, PairData, _check_counts, _read_lines, open_image


@dataclass
class GenBatch(PairBatch):
    """A batch of images with a question and its accepted answers each."""

    questions: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)


@dataclass
class VqaData(PairData):
    questions: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "vqa"

    def batches(self) -> Iterator[GenBatch]:
        for i in range(0, len(self.captions), self.batch_size):
            sl = slice(i, i + self.batch_size)
            yield GenBatch(self.images[sl], self.captions[sl], None,
                           questions=self.questions[sl], answers=self.answers[sl])


def _answers(value) -> list[str] | None:
    if isinstance(value, str) and value.strip():
        return [value]
    if isinstance(value, list) and value and all(isinstance(a, str) and a.strip() for a in value):
        return list(value)
    return None


def folder_vqa(path: str | Path, n: int | None = None, batch_size: int = 32) -> VqaData:
    """Question-answer items from a folder's ``vqa.jsonl`` (or that file); image paths are
    relative to its folder. Every line and image is checked up front: a line without a
    question, without an answer, or naming a missing image is one DataError naming it."""
    p = Path(path)
    index = p if p.is_file() else p / INDEX
    root = index.parent
    if not index.is_file():
        raise DataError(f"VQA folder {str(p)!r} has no {INDEX} "
                        '(one {"image", "question", "answer"} object per line)')
    if n is not None:
        _check_counts(n, batch_size)
    imgs, qs, ans = [], [], []
    for lineno, line in enumerate(_read_lines(index), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise DataError(f'{index}:{lineno} is not a JSON object with a string "image"')
        q = rec.get("question")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f'{index}:{lineno} has no "question" (a non-empty string); allowed: '
                            '{"image", "question", "answer": a string or a list of strings}')
        a = _answers(rec.get("answer"))
        if a is None:
            raise DataError(f'{index}:{lineno} has no "answer"; allowed: a non-empty string or a '
                            "list of non-empty strings (the accepted answers)")
        f = root / rec["image"]
        if not f.is_file():
            raise DataError(f"image {str(f)!r} listed in {index} (line {lineno}) does not exist")
        imgs.append(open_image(f))
        qs.append(q.strip())
        ans.append(a)
        if n is not None and len(qs) >= n:
            break
    if not qs:
        raise DataError(f"{index} is empty: it lists no questions")
    return VqaData(imgs, [a[0] for a in ans], batch_size, source=str(p), questions=qs,
                   answers=ans)



def shapes_vqa(split: str, n: int, batch_size: int = 32) -> VqaData:
    """``n`` questions on the bundled shapes ``split`` (``shapes.vqa_sample``: one question
    per image, about its colour, shape, size or position), one accepted answer each."""
    from . import shapes

    _check_counts(n, batch_size)
    items = [shapes.vqa_sample(split, i) for i in range(n)]
    return VqaData([im for im, _ in items], [v.answer for _, v in items], batch_size,
                   source=f"shapes:{split}", questions=[v.question for _, v in items],
                   answers=[[v.answer] for _, v in items])
