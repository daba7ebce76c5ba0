import json

import numpy as np
import pytest

from vlcompress.data import folder_pairs, load_calibration, load_eval, shapes
from vlcompress.errors import DataError


def test_shapes_deterministic_and_splits_disjoint():
    a, sa = shapes.sample("train", 5)
    b, sb = shapes.sample("train", 5)
    assert sa == sb and np.array_equal(np.asarray(a), np.asarray(b))
    seen = {np.asarray(shapes.sample("train", i)[0]).tobytes() for i in range(200)}
    for split in ("calibration", "eval"):
        for i in range(200):
            assert np.asarray(shapes.sample(split, i)[0]).tobytes() not in seen


def test_shapes_classes_and_captions():
    assert len(shapes.CLASSES) >= 30
    caps = {shapes.sample("train", i)[1].caption for i in range(400)}
    assert "a red circle" in caps or any(c.startswith("a red circle") for c in caps)
    # captions vary in which attributes they name
    assert any(len(c.split()) == 3 for c in caps) and any(len(c.split()) >= 6 for c in caps)
    for i in range(50):
        _, s = shapes.sample("eval", i)
        assert s.color in s.full_caption and s.shape in s.full_caption
        assert shapes.CLASSES[s.label] == (s.color, s.shape)
        assert shapes.full_caption_attributes(s.full_caption) == {
            "size": s.size, "color": s.color, "shape": s.shape, "position": s.position}
    for bad in ("a red circle", "a huge red circle in the center", "a small red circle at the moon"):
        with pytest.raises(ValueError, match="not a full shapes caption"):
            shapes.full_caption_attributes(bad)


def test_captions_of_is_what_is_true_of_a_sample():
    for i in range(100):
        _, s = shapes.sample("train", i)
        true = shapes.captions_of(s.color, s.shape, s.size, s.position)
        assert s.caption in true and s.full_caption in true
    red_tl = set(shapes.captions_of("red", "circle", "small", "top left"))
    red_br = set(shapes.captions_of("red", "circle", "large", "bottom right"))
    assert "a red circle" in red_tl & red_br  # names neither size nor position
    assert "a red circle at the top left" in red_tl - red_br
    assert "a large red circle" in red_br - red_tl


def test_save_pairs_round_trip(tmp_path):
    from vlcompress.data import save_pairs, text_data

    src = load_eval(n=5)
    root = save_pairs(src, tmp_path / "pairs", src.retrieval_captions)
    back = folder_pairs(root)
    assert back.captions == src.retrieval_captions
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(back.images, src.images, strict=True))  # PNG is lossless
    with pytest.raises(DataError, match="4 captions for 5 images"):
        save_pairs(src, tmp_path / "x", src.captions[:4])
    txt = tmp_path / "s.txt"
    txt.write_text("a red circle\na blue star\n")
    with pytest.raises(DataError, match="text only"):
        save_pairs(text_data(txt), tmp_path / "y")


def test_load_calibration_batches():
    d = load_calibration(n=10, batch_size=4)
    sizes = [len(b) for b in d.batches()]
    assert sizes == [4, 4, 2] and d.num_batches == 3
    e = load_eval(n=8)
    assert e.class_prompts and len(e.labels) == 8


def _folder(tmp_path, n=3):
    for i in range(n):
        img, s = shapes.sample("calibration", i)
        img.save(tmp_path / f"{i}.png")
    lines = [json.dumps({"image": f"{i}.png", "caption": f"caption {i}", "label": i % 2}) for i in range(n)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.json").write_text(json.dumps(["a red circle", "a blue square"]))
    return tmp_path


def test_folder_pairs(tmp_path):
    d = folder_pairs(_folder(tmp_path), batch_size=2)
    assert len(d) == 3 and d.captions[1] == "caption 1" and d.labels == [0, 1, 0]
    assert d.class_prompts == ["a red circle", "a blue square"]
    assert len(load_calibration(str(tmp_path), n=2)) == 2


@pytest.mark.parametrize("setup,needle", [
    (lambda p: None, "captions.jsonl"),
    (lambda p: (p / "captions.jsonl").write_text(""), "empty"),
    (lambda p: (p / "captions.jsonl").write_text("{not json\n"), "captions.jsonl:1"),
    (lambda p: (p / "captions.jsonl").write_text('{"image": "x.png", "caption": "c"}\n'), "x.png"),
])
def test_folder_errors(tmp_path, setup, needle):
    setup(tmp_path)
    with pytest.raises(DataError, match=needle.replace(".", r"\.")):
        folder_pairs(tmp_path)


def test_corrupt_image_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 garbage")
    (tmp_path / "captions.jsonl").write_text('{"image": "bad.jpg", "caption": "c"}\n')
    with pytest.raises(DataError, match="bad.jpg"):
        folder_pairs(tmp_path)


def test_missing_source():
    with pytest.raises(DataError, match="does not exist"):
        load_calibration("/no/such/folder")


def test_questions_of_are_true_of_a_sample():
    qa = shapes.questions_of("red", "circle", "small", "top left")
    assert len(qa) == 4 * 3 and len({q for q, _ in qa}) == len(qa)
    assert [a for _, a in qa] == ["red"] * 3 + ["circle"] * 3 + ["small"] * 3 + ["top left"] * 3
    other = dict(shapes.questions_of("blue", "star", "large", "center"))
    assert other["what color is the shape?"] == "blue" and other["where is the shape?"] == "center"
    vocab = set(shapes.vqa_vocabulary())
    assert set(shapes.vocabulary()) < vocab and {"what", "where", "color"} <= vocab
    for c, s, z, p in [("orange", "cross", "large", "bottom right"), ("green", "diamond",
                                                                       "small", "center")]:
        for q, a in shapes.questions_of(c, s, z, p):
            assert set(q.rstrip("?").split()) | set(a.split()) <= vocab


def test_vqa_sample_deterministic_split_and_balanced():
    a, va = shapes.vqa_sample("eval", 3)
    b, vb = shapes.vqa_sample("eval", 3)
    assert va == vb and np.array_equal(np.asarray(a), np.asarray(b))
    img, s = shapes.sample("eval", 3)  # the same image and attributes as the caption sample
    assert va.sample == s and np.array_equal(np.asarray(a), np.asarray(img))
    attrs = {"color": s.color, "shape": s.shape, "size": s.size, "position": s.position}
    assert va.answer == attrs[va.attribute]
    assert (va.question, va.answer) in shapes.questions_of(s.color, s.shape, s.size, s.position)
    counts = {k: 0 for k in shapes.ATTRIBUTES}
    qs = set()
    for i in range(400):
        _, v = shapes.vqa_sample("train", i)
        counts[v.attribute] += 1
        qs.add(v.question)
    assert min(counts.values()) > 70  # ~100 each
    assert len(qs) > 30  # templates x attribute values vary
    with pytest.raises(ValueError, match="unknown shapes split"):
        shapes.vqa_sample("test", 0)


def test_parse_caption():
    p = shapes.parse_caption
    assert p("a small red circle at the top left") == {
        "size": "small", "color": "red", "shape": "circle", "position": "top left"}
    assert p("A Blue Star in the center.") == {"color": "blue", "shape": "star",
                                               "position": "center"}
    assert p("a green shape") == {"color": "green"}  # "shape" names no shape
    assert p("a red blue circle") == {"shape": "circle"}  # two colours: neither counts
    assert p("a red circle at the top of the left") == {"color": "red", "shape": "circle"}
    assert p("a red red circle") == {"color": "red", "shape": "circle"}  # repeated, one value
    assert p("zebra banana") == {} and p("") == {}
    for i in range(100):  # every full caption parses back to its sample's attributes
        _, s = shapes.sample("eval", i)
        assert p(s.full_caption) == shapes.full_caption_attributes(s.full_caption)
        assert p(s.caption).items() <= p(s.full_caption).items()


def test_save_vqa_round_trip(tmp_path):
    from PIL import Image

    from vlcompress.data import save_vqa

    samples = [shapes.vqa_sample("eval", i) for i in range(3)]
    imgs = [im for im, _ in samples]
    answers = [v.answer for _, v in samples]
    answers[1] = [answers[1], "other"]  # a list of accepted answers
    root = save_vqa(imgs, [v.question for _, v in samples], answers, tmp_path / "vqa")
    lines = [json.loads(x) for x in (root / "vqa.jsonl").read_text().splitlines()]
    assert [x["question"] for x in lines] == [v.question for _, v in samples]
    assert [x["answer"] for x in lines] == answers
    for x, im in zip(lines, imgs, strict=True):
        assert np.array_equal(np.asarray(Image.open(root / x["image"]).convert("RGB")),
                              np.asarray(im))
    with pytest.raises(DataError, match="2 questions and 3 answers for 3 images"):
        save_vqa(imgs, ["q", "q"], answers, tmp_path / "bad")
