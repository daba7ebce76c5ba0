"""The bundled "shapes" image-caption data, generated procedurally and deterministically.

Each image is one coloured shape (circle, square, ...) of some size at some position on a
noisy dark background. Captions name a varying subset of its attributes ("a red circle",
"a large red circle at the top left", "a small purple shape", ...) so that short zero-shot
prompts like "a red circle" are in distribution. Splits are disjoint by construction: every
sample is drawn from its own RNG seeded by (split, index), with a different split salt.
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


def captions_of(color: str, shape: str, size: str, pos: str) -> tuple[str, ...]:
    """Every caption template filled in for one sample: the captions that are true of it.

    A sample's ``caption`` is one of these (drawn by its seed); its ``full_caption`` is the
    one naming every attribute. Training uses the set to tell which captions in a batch
    describe which images (a caption naming only colour and shape is true of every image of
    that colour and shape)."""
    where = "in the center" if pos == "center" else f"at the {pos}"
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


def _full_caption(color: str, shape: str, size: str, pos: str) -> str:
    where = "in the center" if pos == "center" else f"at the {pos}"
    return f"a {size} {color} {shape} {where}"


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
    return img, ShapeSample(color, shape, size, pos, caption, _full_caption(color, shape, size, pos))


def vocabulary() -> list[str]:
    """Every word any shapes caption or prompt can use (for the embedded tokenizer)."""
    words = set("a of picture that is in the at shape".split())
    words |= set(COLORS) | set(SHAPES) | set(SIZES)
    for p in POSITIONS:
        words |= set(p.split())
    return sorted(words)
