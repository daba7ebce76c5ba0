"""The tiny-clip training loss: which captions count as an image's positives."""

import importlib.util
import math
from pathlib import Path

import torch

from vlcompress.data import shapes

_spec = importlib.util.spec_from_file_location(
    "train_tiny_clip", Path(__file__).parents[1] / "scripts" / "train_tiny_clip.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


def _batch():
    attrs = [("red", "circle", "small", "top left"), ("red", "circle", "large", "bottom right"),
             ("blue", "star", "small", "center")]
    caps = ["a red circle at the top left", "a red circle", "a blue star in the center"]
    truths = [frozenset(shapes.captions_of(*a)) for a in attrs]
    return caps, truths


def test_true_caption_positives():
    caps, truths = _batch()
    pos = train.positives(caps, truths)
    # image 0 (top left) is described by its own caption and by image 1's "a red circle";
    # image 1 (bottom right) is not described by "... at the top left".
    assert pos.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_same_text_positives_are_the_old_loss():
    caps, _ = _batch()
    assert train.positives(caps + ["a red circle"], None).tolist() == [
        [1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 1, 0, 1]]


def test_loss_prefers_the_true_ranking():
    caps, truths = _batch()
    pos = train.positives(caps, truths)
    good = torch.where(pos.bool(), 5.0, -5.0)
    assert train.multi_positive_clip_loss(good, pos) < train.multi_positive_clip_loss(-good, pos)
    # the minimum: the one row (image 0) and one column (caption 1) with two positives each
    # split their mass evenly, cross-entropy ln 2 each, averaged over 3 rows and 3 columns
    assert abs(train.multi_positive_clip_loss(good, pos).item() - math.log(2) / 3) < 1e-3


def test_training_writes_the_shipped_recovery_recipe():
    import json

    from vlcompress.models.registry import bundled_models

    (tiny,) = [e for e in bundled_models() if e.name == "tiny-clip"]
    card = json.loads((tiny.path / "vlcompress.json").read_text())
    assert card["recover_recipe"] == train.RECOVER_RECIPE
