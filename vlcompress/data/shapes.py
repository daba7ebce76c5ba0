"""The bundled "shapes" image-caption data, generated procedurally and deterministically.

Each image is one coloured shape (circle, square, ...) of some size at some position on a
noisy dark background. Captions name a varying subset of its attributes ("a red circle",
"a large red circle at the top left", "a small purple shape", ...) so that short zero-shot
prompts like "a red circle" are in distribution. Splits are disjoint by construction: every
sample is drawn from its own RNG seeded by (split, index), with a different split salt.

For generative models the same samples carry questions (:func:`questions_of`,
:func:`vqa_sample`: "what color is the shape?" -> "red") and :func:`parse_caption` reads the
attributes a generated caption states, for exact attribute accuracy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: dict[str, float] = {"small": 0.26, "large": 0.46}  # fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
SPLITS = {"train": 11, "calibration": 23, "eval": 37}
IMAGE_SIZE = 48

CLASSES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)


def class_prompt(color: str, shape: str) -> str:
    """The zero-shot prompt of one (colour, shape) class."""
    return f"a {color} {shape}"


@dataclass(frozen=True)
class ShapeSample:
    color: str
    shape: str
    size: str
    position: str
    caption: str
    full_caption: str  # names every attribute (used for retrieval)

    @property
    def label(self) -> int:
        return CLASSES.index((self.color, self.shape))


def _where(pos: str) -> str:
    return "in the center" if pos == "center" else f"at the {pos}"


def captions_of(color: str, shape: str, size: str, pos: str) -> tuple[str, ...]:
    """Every caption template filled in for one sample: the captions that are true of it.

    A sample's ``caption`` is one of these (drawn by its seed); its ``full_caption`` is the
    one naming every attribute. Training uses the set to tell which captions in a batch
    describe which images (a caption naming only colour and shape is true of every image of
    that colour and shape)."""
    where = _where(pos)
    return (
        f"a {color} {shape}",
        f"a {color} {shape}",
        f"a {size} {color} {shape}",
        f"a {color} {shape} {where}",
        f"a {size} {color} {shape} {where}",
        f"a picture of a {color} {shape}",
        f"a {shape} that is {color}",
        f"a {size} {shape} {where}",
        f"a {color} shape {where}",
    )


def _caption(rng: random.Random, color: str, shape: str, size: str, pos: str) -> str:
    return rng.choice(captions_of(color, shape, size, pos))


def full_caption_of(color: str, shape: str, size: str, pos: str) -> str:
    """The caption naming every attribute ("a small red circle at the top left"): a sample's
    ``full_caption``, and what a generative model's caption of the sample should say."""
    return f"a {size} {color} {shape} {_where(pos)}"


def full_caption_attributes(caption: str) -> dict[str, str]:
    """``{"size", "color", "shape", "position"}`` of a full (retrieval) caption, the inverse
    of the caption every sample carries as ``full_caption``."""
    words = caption.split(" ", 4)
    if len(words) != 5 or words[0] != "a":
        raise ValueError(f"{caption!r} is not a full shapes caption")
    where = words[4]
    pos = "center" if where == "in the center" else where.removeprefix("at the ")
    if words[1] not in SIZES or words[2] not in COLORS or words[3] not in SHAPES \
            or pos not in POSITIONS:
        raise ValueError(f"{caption!r} is not a full shapes caption")
    return {"size": words[1], "color": words[2], "shape": words[3], "position": pos}


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.85, y * 0.85) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "diamond":
        pts = [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
               (-1, w), (-1, -w), (-w, -w)]
    else:
        raise ValueError(shape)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render(color: str, shape: str, size: str, pos: str, rng: random.Random,
           image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw one sample (supersampled 4x, then downsampled for smooth edges)."""
    ss = 4
    side = image_size * ss
    bg = rng.randint(10, 70)
    img = Image.new("RGB", (side, side), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[pos]
    jitter = 0.06
    cx = (fx + rng.uniform(-jitter, jitter)) * side
    cy = (fy + rng.uniform(-jitter, jitter)) * side
    r = SIZES[size] * side / 2 * rng.uniform(0.9, 1.1)
    base = np.array(COLORS[color], dtype=np.float64)
    tint = np.clip(base + rng.uniform(-20, 20), 0, 255).astype(int)
    fill = tuple(int(v) for v in tint)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        rot = rng.uniform(-0.15, 0.15)
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=fill)
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    arr = np.asarray(img).astype(np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-8, 9, size=arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def sample(split: str, index: int, image_size: int = IMAGE_SIZE) -> tuple[Image.Image, ShapeSample]:
    """Sample ``index`` of ``split`` (``train``, ``calibration`` or ``eval``), deterministic."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; allowed: {', '.join(SPLITS)}")
    rng = random.Random(SPLITS[split] * 1_000_003 + index * 7919 + 1)
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    size = rng.choice(list(SIZES))
    pos = rng.choice(list(POSITIONS))
    caption = _caption(rng, color, shape, size, pos)
    img = render(color, shape, size, pos, rng, image_size)
    return img, ShapeSample(color, shape, size, pos, caption, full_caption_of(color, shape, size, pos))


def vocabulary() -> list[str]:
    """Every word any shapes caption or prompt can use (for the embedded tokenizer)."""
    words = set("a of picture that is in the at shape".split())
    words |= set(COLORS) | set(SHAPES) | set(SIZES)
    for p in POSITIONS:
        words |= set(p.split())
    return sorted(words)


ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")


def questions_of(color: str, shape: str, size: str, pos: str) -> list[tuple[str, str]]:
    """Every (question, answer) template filled in for one sample, three per attribute in
    :data:`ATTRIBUTES` order (colour, shape, size, position): the questions true of it.
    Answers are one word (``"red"``, ``"circle"``, ``"small"``, ``"center"``) or a short
    phrase (``"top left"``); questions name other attributes as context so that one image
    carries several phrasings."""
    return [
        ("what color is the shape?", color),
        (f"what color is the {shape}?", color),
        (f"what is the color of the {size} shape?", color),
        ("what shape is it?", shape),
        (f"what shape is the {color} object?", shape),
        (f"which shape is {_where(pos)}?", shape),
        ("what size is the shape?", size),
        (f"is the {color} {shape} small or large?", size),
        (f"how big is the {shape}?", size),
        ("where is the shape?", pos),
        (f"where is the {color} {shape}?", pos),
        (f"in which part of the picture is the {size} {shape}?", pos),
    ]


@dataclass(frozen=True)
class VqaSample:
    question: str
    answer: str
    attribute: str  # which of ATTRIBUTES the question asks about
    sample: ShapeSample


_VQA_SALT = 104_729  # a question's RNG differs from its image's (same split and index)


def vqa_sample(split: str, index: int,
               image_size: int = IMAGE_SIZE) -> tuple[Image.Image, VqaSample]:
    """Sample ``index`` of ``split`` with one question about it, deterministic: the image and
    attributes are :func:`sample`'s (same split, same index, so splits stay disjoint), the
    question is drawn by its own seed, uniformly over the attributes, then over that
    attribute's templates of :func:`questions_of`."""
    img, s = sample(split, index, image_size)
    rng = random.Random((SPLITS[split] * 1_000_003 + index * 7919 + 1) * _VQA_SALT + 17)
    k = rng.randrange(len(ATTRIBUTES))
    per = len(questions_of(s.color, s.shape, s.size, s.position)) // len(ATTRIBUTES)
    q, a = questions_of(s.color, s.shape, s.size, s.position)[k * per + rng.randrange(per)]
    return img, VqaSample(q, a, ATTRIBUTES[k], s)


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a (generated) caption states: ``{"color", "shape", "size",
    "position"}``, each key present only where the caption names exactly one value for it.
    Unknown words are ignored; an attribute named with two different values ("a red blue
    circle") is left out, so it counts as wrong; "shape" alone names no shape. Positions are
    the two-word corners ("top left") or "center"; a lone "top" or "left" names none.

    >>> parse_caption("a small red circle at the top left")
    {'size': 'small', 'color': 'red', 'shape': 'circle', 'position': 'top left'}
    """
    words = [w.strip(".,!?;:") for w in text.lower().split()]
    found: dict[str, set[str]] = {}
    order: list[str] = []

    def add(key: str, value: str) -> None:
        if key not in found:
            found[key] = set()
            order.append(key)
        found[key].add(value)

    i = 0
    while i < len(words):
        w = words[i]
        pair = " ".join(words[i:i + 2])
        if pair in POSITIONS:
            add("position", pair)
            i += 2
            continue
        if w in POSITIONS:
            add("position", w)
        elif w in COLORS:
            add("color", w)
        elif w in SHAPES:
            add("shape", w)
        elif w in SIZES:
            add("size", w)
        i += 1
    return {k: next(iter(found[k])) for k in order if len(found[k]) == 1}


def vqa_vocabulary() -> list[str]:
    """Every word a shapes caption, question or answer can use (:func:`vocabulary` plus the
    question words), for generative models' tokenizers. :func:`vocabulary` stays as it is:
    the shipped tiny-clip's tokenizer is built from it."""
    words = set(vocabulary())
    for q, a in questions_of("red", "circle", "small", "top left"):
        words |= set(q.rstrip("?").split()) | set(a.split())
    return sorted(words)
