"""Text-only data: .txt and image-less captions.jsonl load as PairData(images=None); a
text-only source is refused in one line for a model that needs images, before any work."""

import json

import pytest
from conftest import make_tiny_random_clip

from vlcompress.data import load_calibration, load_eval, load_train, source_kind, text_data
from vlcompress.errors import DataError


def test_txt_loads_skipping_blank_lines(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("a red circle\n\n  \na blue square at the top\nünïcode sentence\n", encoding="utf-8")
    d = load_calibration(f, n=10, batch_size=2)
    assert d.images is None and d.text_only and d.kind == "text"
    assert d.captions == ["a red circle", "a blue square at the top", "ünïcode sentence"]
    assert [len(b) for b in d.batches()] == [2, 1] and all(b.images is None for b in d.batches())
    assert len(d) == 3 and d.num_batches == 2 and source_kind(f) == "text"
    assert len(load_eval(f, n=2)) == 2 and len(load_train(str(f), n=1)) == 1


def test_imageless_captions_jsonl_loads(tmp_path):
    lines = [json.dumps({"caption": f"caption {i}"}) for i in range(3)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n\n")
    for src in (tmp_path, tmp_path / "captions.jsonl"):
        assert source_kind(src) == "text"
        d = load_train(src, n=8, batch_size=4)
        assert d.images is None and d.captions == ["caption 0", "caption 1", "caption 2"]
    assert source_kind("shapes") == "pairs"


@pytest.mark.parametrize("name,body,needle", [
    ("c.jsonl", '{"caption": "a"}\n{"caption": 3}\n', r"c\.jsonl:2"),
    ("c.jsonl", '{"caption": "a"}\n{"image": "x.png", "caption": "b"}\n', r"c\.jsonl:2"),
    ("c.jsonl", '{"caption": "a"}\nnot json\n', r"c\.jsonl:2"),
    ("e.txt", "\n\n", "empty"),
    ("c.csv", "a,b\n", "allowed"),
])
def test_text_errors_name_file_and_line(tmp_path, name, body, needle):
    f = tmp_path / name
    f.write_text(body)
    with pytest.raises(DataError, match=needle) as e:
        text_data(f) if name != "c.csv" else source_kind(f)
    assert "\n" not in str(e.value)


def test_non_utf8_txt_named(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine line\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad\.txt:2 is not UTF-8"):
        text_data(f)


def test_text_only_refused_for_image_model_in_one_line(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("a red circle\n")
    clip = make_tiny_random_clip()
    assert clip.needs_images and clip.check_data("shapes") == "pairs"
    with pytest.raises(DataError) as e:
        clip.check_data(f, "calibration")
    msg = str(e.value)
    assert "\n" not in msg and "text-only" in msg and "vision" in msg and "need images" in msg
    text_only = make_tiny_random_clip().select_towers("text")
    assert not text_only.needs_images and text_only.check_data(f) == "text"
    enc = text_only.encode(next(iter(load_calibration(f).batches())))
    assert set(enc) == {"input_ids", "attention_mask"}
    assert text_only.features(enc)["text"].shape[0] == 1
