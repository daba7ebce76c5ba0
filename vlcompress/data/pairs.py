"""Image-caption pairs (or text alone): the one data shape every model adapter consumes.

A :class:`PairBatch` holds PIL images and caption strings; a model adapter turns it into
tensors with its own processor (``VLM.encode``). A :class:`PairData` is a sequence of
batches, built from the bundled shapes data, a user folder (images + ``captions.jsonl``) or
text-only data (``images is None``): a ``captions.jsonl`` whose lines have a ``caption`` and
no ``image``, or a ``.txt`` file with one sentence a line. Text-only data feeds text encoders
(family ``bert``, or ``--tower text``); :func:`source_kind` tells which a source holds without
opening any image.
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
    images: list[Image.Image] | None  # None: text-only data
    captions: list[str]
    labels: list[int] | None = None  # class index per image, where the source has classes

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class PairData:
    """Image-caption pairs in batches, plus the class prompts where the source has classes.
    ``images is None`` for text-only data (``captions`` are then the sentences)."""

    images: list[Image.Image] | None
    captions: list[str]
    batch_size: int = 32
    labels: list[int] | None = None
    class_prompts: list[str] | None = None
    retrieval_captions: list[str] | None = None  # captions naming every attribute
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def text_only(self) -> bool:
        return self.images is None

    @property
    def kind(self) -> str:
        """``"text"`` for text-only data, else ``"pairs"`` (as :func:`source_kind`)."""
        return "text" if self.images is None else "pairs"

    def batches(self) -> Iterator[PairBatch]:
        for i in range(0, len(self.captions), self.batch_size):
            sl = slice(i, i + self.batch_size)
            yield PairBatch(
                None if self.images is None else self.images[sl],
                self.captions[sl],
                None if self.labels is None else self.labels[sl],
            )

    def __iter__(self) -> Iterator[PairBatch]:
        return self.batches()

    @property
    def num_batches(self) -> int:
        return (len(self.captions) + self.batch_size - 1) // self.batch_size


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


def save_pairs(data: PairData, root: str | Path, captions: list[str] | None = None) -> Path:
    """Write image-caption pairs as a user's folder: ``img/000.png ...`` and
    ``captions.jsonl`` (``{"image", "caption"}`` per line), the layout :func:`folder_pairs`
    reads. ``captions`` default to ``data.captions`` (e.g. pass ``data.retrieval_captions``)."""
    if data.images is None:
        raise DataError(f"{data.source or 'these pairs'} are text only; save_pairs needs images")
    caps = data.captions if captions is None else captions
    if len(caps) != len(data.images):
        raise DataError(f"{len(caps)} captions for {len(data.images)} images")
    return _save_folder(root, "captions.jsonl", data.images,
                        [{"caption": cap} for cap in caps])


def save_vqa(images: Sequence[Image.Image], questions: Sequence[str],
             answers: Sequence[str | list[str]], root: str | Path) -> Path:
    """Write image-question-answer triples as a user's VQA folder: ``img/000.png ...`` and
    ``vqa.jsonl`` (``{"image", "question", "answer"}`` per line; an answer is a string or a
    list of accepted strings). Images are written as :func:`save_pairs` writes them."""
    if not len(images) == len(questions) == len(answers):
        raise DataError(f"{len(questions)} questions and {len(answers)} answers for "
                        f"{len(images)} images")
    return _save_folder(root, "vqa.jsonl", images,
                        [{"question": q, "answer": a} for q, a in zip(questions, answers,
                                                                      strict=True)])


def _save_folder(root: str | Path, index: str, images: Sequence[Image.Image],
                 records: list[dict]) -> Path:
    """``img/NNN.png`` per image and ``index`` with one ``{"image", **record}`` line each."""
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(images) - 1)))
    lines = []
    for i, (im, rec) in enumerate(zip(images, records, strict=True)):
        name = f"img/{i:0{width}d}.png"
        im.save(root / name)
        lines.append(json.dumps({"image": name, **rec}))
    (root / index).write_text("\n".join(lines) + "\n")
    return root


def folder_pairs(path: str | Path, n: int | None = None, batch_size: int = 32) -> PairData:
    """Pairs from a folder holding images and ``captions.jsonl`` lines ``{"image", "caption"}``
    (or from that ``.jsonl`` file itself; image paths are relative to its folder).

    Optional ``"label"`` (int) on every line and a ``classes.json`` list of prompts enable
    zero-shot evaluation. Every referenced image is opened and verified up front, so a corrupt
    file is reported by name before any work starts.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"calibration folder {str(root)!r} does not exist")
    if root.is_file() and root.suffix == ".jsonl":
        root, index = root.parent, root
    elif not root.is_dir():
        raise DataError(f"calibration path {str(root)!r} is not a folder; allowed: a folder "
                        "with images and captions.jsonl, a .jsonl, a .txt, or 'shapes'")
    else:
        index = root / "captions.jsonl"
    if not index.is_file():
        raise DataError(f"calibration folder {str(root)!r} has no captions.jsonl "
                        '(one {"image": ..., "caption": ...} object per line)')
    records = []
    for lineno, line in enumerate(_read_lines(index), 1):
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
        imgs.append(open_image(f))
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
    source = str(root) if index.name == "captions.jsonl" else str(index)
    return PairData(imgs, caps, batch_size, labels if has_labels else None,
                    class_prompts=prompts if has_labels else None, source=source)


MAX_SHORT_SIDE = 768  # every processor we know resizes to <= 384; larger images are shrunk on load


def open_image(f: Path) -> Image.Image:
    """An image as people have it, as RGB: JPEG / PNG / anything PIL reads; modes RGB, RGBA
    and LA (alpha dropped onto black, as ``convert`` does), L, P (palette, with or without
    transparency), CMYK, I;16; EXIF orientation applied (phone portraits stay portrait).
    Images whose shorter side exceeds :data:`MAX_SHORT_SIDE` are shrunk (aspect kept) as they
    are read, so a folder of 4000 px photos costs what 768 px ones do: the processors resize
    to 224-384 px anyway (resize + center crop of the shrunk image differs from that of the
    original by resampling only). A corrupt file is a one-line DataError naming it."""
    from PIL import ImageOps

    try:
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            if im.format == "JPEG":  # decode at a reduced scale directly (fast, little memory)
                short = min(im.size)
                if short > 2 * MAX_SHORT_SIDE:
                    scale = MAX_SHORT_SIDE / short
                    im.draft(im.mode, (int(im.width * scale) + 1, int(im.height * scale) + 1))
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        kind = exc.__class__.__name__
        raise DataError(f"image {str(f)!r} is corrupt or not an image ({kind})") from None
    short = min(rgb.size)
    if short > MAX_SHORT_SIDE:
        scale = MAX_SHORT_SIDE / short
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                         Image.BICUBIC, reducing_gap=3.0)
    return rgb


def _read_lines(index: Path) -> list[str]:
    """The lines of a UTF-8 text file; a one-line DataError naming file and line otherwise."""
    data = index.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors)
        data = data[3:]
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        lineno = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{index}:{lineno} is not UTF-8 text (byte {data[exc.start]:#04x}); "
                        "allowed: UTF-8 encoded captions") from None


def _text_index(source: str | Path) -> Path:
    """The file that lists a source's captions (``.txt``, ``.jsonl``, folder/captions.jsonl)."""
    p = Path(source)
    if not p.exists():
        raise DataError(f"data source {str(source)!r} does not exist; allowed: 'shapes', a folder "
                        "with images and captions.jsonl, a captions .jsonl, or a .txt file")
    if p.is_dir():
        index = p / "captions.jsonl"
        if not index.is_file():
            raise DataError(f"data folder {str(p)!r} has no captions.jsonl "
                            '(one {"image": ..., "caption": ...} object per line)')
        return index
    if p.suffix not in (".txt", ".jsonl"):
        raise DataError(f"data file {str(p)!r} is not valid; allowed: a .txt (one sentence a "
                        "line), a .jsonl (captions), or a folder with captions.jsonl")
    return p


VQA_INDEX = "vqa.jsonl"  # question-answer data (vlcompress.data.vqa)


def is_vqa_source(source) -> bool:
    """Whether ``source`` is VQA data: a folder with ``vqa.jsonl`` and no ``captions.jsonl``,
    or a ``vqa.jsonl`` file."""
    if isinstance(source, PairData):
        return source.kind == "vqa"
    if str(source) == "shapes":
        return False
    p = Path(str(source))
    if p.is_file():
        return p.name == VQA_INDEX
    return p.is_dir() and (p / VQA_INDEX).is_file() and not (p / "captions.jsonl").is_file()


def has_vqa(source) -> bool:
    """Whether ``source`` holds question-answer data (a ``vqa.jsonl``, alone or beside
    ``captions.jsonl``)."""
    if isinstance(source, PairData):
        return source.kind == "vqa"
    if str(source) == "shapes":
        return False
    p = Path(str(source))
    return p.name == VQA_INDEX if p.is_file() else (p / VQA_INDEX).is_file()


def source_kind(source) -> str:
    """What a data source holds, without loading any image: ``"pairs"`` (image-caption
    pairs: ``shapes``, a folder or ``.jsonl`` whose lines name an ``image``) or ``"text"``
    (a ``.txt`` file, or a ``captions.jsonl`` whose lines have a ``caption`` and no ``image``).
    Decided by the first non-blank line; the loaders check every line."""
    if isinstance(source, PairData):
        return source.kind
    if str(source) == "shapes":
        return "pairs"
    if is_vqa_source(source):
        return "vqa"  # images with questions and answers (generative models)
    index = _text_index(source)
    if index.suffix == ".txt":
        return "text"
    lineno = 0
    try:
        with index.open(encoding="utf-8-sig") as f:
            for line in f:
                lineno += 1
                if line.strip():
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise TypeError
                    return "pairs" if "image" in rec else "text"
    except (json.JSONDecodeError, TypeError):
        raise DataError(f"{index}:{lineno} is not a JSON object with a string field "
                        '"caption"') from None
    except UnicodeDecodeError:
        _read_lines(index)  # names the line
        raise DataError(f"{index} is not UTF-8 text") from None
    raise DataError(f"data file {str(index)!r} is empty: it lists no captions")


def text_data(source: str | Path, n: int | None = None, batch_size: int = 32) -> PairData:
    """Text-only data (``images=None``): a ``.txt`` file, one sentence a line (blank lines
    skipped), or a ``.jsonl`` / folder ``captions.jsonl`` whose lines are ``{"caption": ...}``
    with no ``image``. Errors name the file and line."""
    if n is not None:
        _check_counts(n, batch_size)
    elif not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size {batch_size!r} is not valid; allowed: a positive integer")
    index = _text_index(source)
    caps: list[str] = []
    lines = _read_lines(index)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if index.suffix == ".txt":
            caps.append(line.strip())
        else:
            try:
                rec = json.loads(line)
                cap = rec["caption"]
                if not isinstance(cap, str) or "image" in rec:
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f'{index}:{lineno} is not a JSON object with a string "caption" '
                                'and no "image" (text-only data: every line or none names an '
                                "image)") from None
            caps.append(cap)
        if n is not None and len(caps) >= n:
            break
    if not caps:
        raise DataError(f"data file {str(index)!r} is empty: it lists no sentences")
    source_name = str(source if Path(source).is_dir() else index)
    return PairData(None, caps, batch_size, source=source_name, meta={"kind": "text"})


def as_pair_data(data: PairData | Sequence[PairBatch]) -> PairData:
    if isinstance(data, PairData):
        return data
    imgs, caps = [], []
    for b in data:
        if b.images is None:
            imgs = None
        elif imgs is not None:
            imgs.extend(b.images)
        caps.extend(b.captions)
    return PairData(imgs, caps, batch_size=max(1, len(data[0]) if data else 1))
