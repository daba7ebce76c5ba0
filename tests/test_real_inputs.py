"""Real checkpoints and inputs as users bring them, built offline in the hub's exact layout:
CLIP (BPE: vocab.json + merges.txt + tokenizer.json), SigLIP (a sentencepiece spiece.model
trained here), BLIP (BertTokenizer vocab.txt, BlipImageProcessor at 384); image folders with
every common mode and size; sharded safetensors and pytorch_model.bin; and every error path
through the CLI (exit 2, one line, nothing left behind)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vlcompress.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
WORDS = ("a photo of the red blue green circle square triangle dog cat on in small big "
         "läuft schnell hund café naïve").split()
CAPTIONS = ["A photo of a red circle.", "Ein Hund läuft — schnell!", "猫が寝ている。",
            'a "quoted" caption, with commas; (and) [brackets]', "café, naïve & co.",
            "a big blue square", "the small green triangle?", "a dog on a cat 🐶"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary siblings (``.name.tmp-...``) anywhere under ``folder``."""
    return sorted(str(p) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------------------------
# fixtures: images as people have them, checkpoints in the hub's layout
# --------------------------------------------------------------------------------------------
def _jpeg_exif_portrait(path: Path):
    im = Image.new("RGB", (80, 40), (200, 30, 30))  # stored landscape, shown portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    im.save(path, "JPEG", exif=exif)


def make_image_folder(root: Path, *, n_captions: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        "rgb.jpg": lambda p: Image.new("RGB", (64, 48), (10, 200, 30)).save(p, "JPEG"),
        "rgba.png": lambda p: Image.new("RGBA", (30, 90), (10, 20, 200, 128)).save(p),
        "gray.png": lambda p: Image.new("L", (20, 20), 128).save(p),
        "palette.png": lambda p: Image.new("RGB", (50, 30), (1, 2, 3)).convert(
            "P", palette=Image.Palette.ADAPTIVE).save(p, transparency=0),
        "cmyk.jpg": lambda p: Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(p, "JPEG"),
        "sub/huge.jpg": lambda p: Image.new("RGB", (4000, 3000), (90, 90, 20)).save(p, "JPEG",
                                                                                  quality=50),
        "sub/deeper/portrait.jpg": _jpeg_exif_portrait,
        "sub/tall.png": lambda p: Image.new("RGB", (20, 400), (0, 0, 0)).save(p),
    }
    names = list(files)
    for name, make in files.items():
        make(root / name)
    with (root / "captions.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n_captions):
            f.write(json.dumps({"image": names[i % len(names)], "caption": CAPTIONS[i % len(CAPTIONS)]},
                               ensure_ascii=i % 2 == 0) + "\n")
    return root


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_bpe(folder: Path) -> None:
    """``vocab.json`` + ``merges.txt`` as openai/clip-* ship them (byte-level BPE, ``</w>``
    word ends), then ``tokenizer.json`` written by the tokenizer itself."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>", "r e", "re d</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(str(folder))
    tok.save_pretrained(str(folder))  # adds tokenizer.json, tokenizer_config.json


def make_clip_folder(folder: Path, *, image_size: int = 224, patch: int = 32) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    write_clip_bpe(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=patch),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(folder))
    return folder


def make_siglip_folder(folder: Path) -> Path:
    spm = pytest.importorskip("sentencepiece")
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS * 20 + [" ".join(WORDS)] * 20),
                                   model_writer=model, vocab_size=60, model_type="unigram",
                                   character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   pad_piece="</s>", eos_piece="<eos>",
                                   hard_vocab_limit=False)
    (folder / "spiece.model").write_bytes(model.getvalue())
    tok = SiglipTokenizer(vocab_file=str(folder / "spiece.model"), eos_token="<eos>",
                          pad_token="</s>", unk_token="<unk>", model_max_length=16)
    tok.save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=224, patch_size=32))
    SiglipModel(cfg).save_pretrained(str(folder))
    SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(str(folder))
    return folder


def make_blip_folder(folder: Path) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), ".", ",", "!", "?",
              "##s", "##ed", "##ing", *"abcdefghijklmnopqrstuvwxyz",
              *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(pieces)) + "\n", encoding="utf-8")
    tok = BertTokenizer.from_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                         encoder_hidden_size=32, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                         sep_token_id=tok.sep_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=384, patch_size=64,
                           initializer_range=0.02),
        image_text_hidden_size=16)
    BlipForImageTextRetrieval(cfg).save_pretrained(str(folder))
    BlipImageProcessor(size={"height": 384, "width": 384}).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs") / "photos")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_clip_folder(tmp_path_factory.mktemp("hub") / "clip")


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------
def test_image_folder_as_people_have_it(images):
    from vlcompress.data import load_calibration
    from vlcompress.data.pairs import MAX_SHORT_SIDE

    data = load_calibration(images, n=8, batch_size=4)
    assert len(data) == 8 and all(im.mode == "RGB" for im in data.images)
    by_cap = dict(zip(data.captions, data.images, strict=True))
    assert set(data.captions) == set(CAPTIONS)  # punctuation, non-ASCII, emoji kept verbatim
    huge = data.images[5]  # sub/huge.jpg, 4000 x 3000: shrunk on load, aspect kept
    assert min(huge.size) == MAX_SHORT_SIDE and abs(huge.width / huge.height - 4 / 3) < 0.01
    portrait = data.images[6]  # EXIF orientation 6: shown 40 x 80
    assert portrait.size == (40, 80)
    assert data.images[7].size == (20, 400) and data.images[2].size == (20, 20)
    assert by_cap["A photo of a red circle."].size == (64, 48)


def test_clip_hub_folder_end_to_end(clip_dir, images, tmp_path):
    """The hub's CLIP layout (BPE vocab.json + merges.txt + tokenizer.json, resize + center
    crop 224): ids from the config, then prune-export through the CLI on a messy folder."""
    from vlcompress.models import load_model

    assert {"vocab.json", "merges.txt", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in clip_dir.iterdir()}
    vlm = load_model(clip_dir)
    ids = vlm.encode_texts(["the photo of red"])["input_ids"][0].tolist()
    cfg = vlm.model.config.text_config
    assert ids[0] == cfg.bos_token_id and ids[-1] == cfg.eos_token_id
    px = vlm.encode_images([Image.new("RGB", (300, 200))])
    assert tuple(px.shape[-2:]) == (224, 224)
    out = tmp_path / "run"
    res = run("prune-export", "--model", clip_dir, "--calibration", images, "--calibration-size", 8,
              "--eval-size", 8, "--method", "wanda", "--pattern", "2:4", "--batch-sizes", "1",
              "--iterations", 2, "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["method"] == "wanda" and leftovers(tmp_path) == []


def test_siglip_sentencepiece_folder(tmp_path, images):
    from vlcompress.models import load_model

    folder = make_siglip_folder(tmp_path / "siglip")
    vlm = load_model(folder)
    assert type(vlm.tokenizer).__name__.startswith("Siglip")
    enc = vlm.encode_texts(["a photo of the red circle"])
    assert enc["input_ids"].shape[1] == 16  # SigLIP pads to max_length, as trained
    res = run("prune", "--model", folder, "--calibration", images, "--calibration-size", 8,
              "--method", "wanda", "--pattern", "unstructured", "--sparsity", 0.5,
              "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "out").tokenizer is not None


def test_blip_vocab_txt_folder(tmp_path, images):
    from vlcompress.models import load_model

    folder = make_blip_folder(tmp_path / "blip")
    vlm = load_model(folder)
    assert type(vlm.tokenizer).__name__ == "BertTokenizer"
    assert tuple(vlm.encode_images([Image.new("RGB", (50, 70))]).shape[-2:]) == (384, 384)
    res = run("prune", "--model", folder, "--calibration", images, "--calibration-size", 8,
              "--method", "magnitude", "--pattern", "2:4", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output


def test_bert_folder_prune_export_on_sentences(tmp_path):
    """A BERT text encoder in the hub's layout (as all-MiniLM-L6-v2 ships: vocab.txt,
    tokenizer.json, no image processor) pruned and exported on a .txt of sentences."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path / "bert"
    make_blip_folder(folder)  # only for its vocab.txt + tokenizer files
    for f in folder.iterdir():
        if f.name not in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                          "special_tokens_map.json"):
            f.unlink()
    tok = BertTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)
              ).save_pretrained(str(folder))
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(CAPTIONS * 3) + "\n", encoding="utf-8")
    res = run("prune-export", "--model", folder, "--calibration", sentences, "--calibration-size", 16,
              "--eval-size", 16, "--batch-sizes", "1", "--iterations", 2, "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["calibration"] == f"{sentences} (n=16)"
    assert list((tmp_path / "run" / "pruned").rglob("*.onnx"))
    assert leftovers(tmp_path) == []


def test_sharded_safetensors_and_pytorch_bin(clip_dir, tmp_path):
    from vlcompress.models import load_model

    dense = load_model(clip_dir)
    ref = {k: v.clone() for k, v in dense.model.state_dict().items()}
    sharded = copy_folder(clip_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    dense.model.save_pretrained(str(sharded), max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    binary = copy_folder(clip_dir, tmp_path / "bin")
    (binary / "model.safetensors").unlink()
    torch.save(dense.model.state_dict(), binary / "pytorch_model.bin")
    for folder in (sharded, binary):
        got = load_model(folder).model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.items()), folder


# --------------------------------------------------------------------------------------------
# errors: exit 2, one line, nothing left behind
# --------------------------------------------------------------------------------------------
def _prune_export(model, calib, out, *extra):
    return run("prune-export", "--model", model, "--calibration", calib, "--calibration-size", 8,
               "--eval-size", 8, "--batch-sizes", "1", "--iterations", 2, "--out", out, *extra)


@pytest.mark.parametrize("remove,needle", [
    (("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"), "no tokenizer files"),
    (("preprocessor_config.json",), "no image processor files"),
])
def test_model_folder_without_processors(clip_dir, images, tmp_path, remove, needle):
    folder = copy_folder(clip_dir, tmp_path / "m")
    for f in remove:
        (folder / f).unlink()
    one_line_error(_prune_export(folder, images, tmp_path / "out"), needle, str(folder))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_truncated_corrupt_and_mismatched_weights(clip_dir, images, tmp_path):
    trunc = copy_folder(clip_dir, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(_prune_export(trunc, images, tmp_path / "o1"), "truncated", "model.safetensors")
    garbage = copy_folder(clip_dir, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    one_line_error(_prune_export(garbage, images, tmp_path / "o2"), "corrupt")
    binf = copy_folder(clip_dir, tmp_path / "bin")
    (binf / "model.safetensors").unlink()
    (binf / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    one_line_error(_prune_export(binf, images, tmp_path / "o3"), "pytorch_model.bin", "corrupt")
    shard = copy_folder(clip_dir, tmp_path / "shard")
    (shard / "model.safetensors").unlink()
    (shard / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    one_line_error(_prune_export(shard, images, tmp_path / "o4"), "model-00001-of-00002", "does not exist")
    # a config whose architecture is supported but whose weights do not match it
    mism = copy_folder(clip_dir, tmp_path / "mism")
    cfg = json.loads((mism / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (mism / "config.json").write_text(json.dumps(cfg))
    one_line_error(_prune_export(mism, images, tmp_path / "o5"), "do not match", "allowed")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
    assert leftovers(tmp_path) == []


def test_captions_not_utf8_names_file_and_line(images, tmp_path, clip_dir):
    folder = copy_folder(images, tmp_path / "latin1")
    lines = (folder / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({"image": "rgb.jpg", "caption": "café"}, ensure_ascii=False)
    raw = [ln.encode("latin-1") if i == 2 else ln.encode("utf-8") for i, ln in enumerate(lines)]
    (folder / "captions.jsonl").write_bytes(b"\n".join(raw) + b"\n")  # line 3 alone is Latin-1
    line = one_line_error(_prune_export(clip_dir, folder, tmp_path / "out"), "captions.jsonl:3",
                          "not UTF-8")
    assert str(folder) in line
    text = tmp_path / "s.txt"
    text.write_bytes(b"fine\nalso fine\n\xff\xfe bad\n")
    one_line_error(_prune_export(clip_dir, text, tmp_path / "o2", "--tower", "text"), "s.txt:3",
                   "not UTF-8")
    assert leftovers(tmp_path) == []


def test_unwritable_outputs(tmp_path):
    one_line_error(run("prune-export", "--out", "/proc/vlc-test/out"), "/proc/vlc-test/out")
    one_line_error(run("prune-export", "--out", "/proc/vlc-out"), "--out", "/proc/vlc-out")
    for opt in ("--summary", "--junit"):
        extra = ("--baseline", tmp_path / "b.json") if opt == "--junit" else ()
        one_line_error(run("bench", tmp_path / "nope", opt, "/proc/vlc/x.md", *extra), opt, "/proc/vlc")


@pytest.mark.parametrize("args,needles", [
    (("prune-export", "--calibration-size", "many"), ("--calibration-size", "'many'", "integer")),
    (("prune-export", "--eval-size", "1.5"), ("--eval-size", "'1.5'", "integer")),
    (("prune-export", "--iterations", "x"), ("--iterations", "'x'", "integer")),
    (("bench", "run", "--max-accuracy-drop", "lots"), ("--max-accuracy-drop", "'lots'", "number")),
    (("recover", "run", "--steps", "ten"), ("--steps", "'ten'", "integer")),
    (("recover", "run", "--lr", "fast"), ("--lr", "'fast'", "number")),
    (("prune-export", "--no-such-option"), ("--no-such-option",)),
    (("no-such-command",), ("no-such-command",)),
])
def test_parse_errors_are_one_line(args, needles):
    one_line_error(run(*args), *needles)


def test_markup_like_text_printed_literally(tmp_path):
    line = one_line_error(run("prune-export", "--model", "/no/such/[x]/[/b]/[bold red]m"),
                          "[x]", "[/b]", "[bold red]m")
    assert line.startswith("error:")
    bad = tmp_path / "[red]cal[b].txt"
    bad.write_text("")
    one_line_error(run("prune", "--calibration", bad, "--out", tmp_path / "o"), "[red]cal[b].txt")


# --------------------------------------------------------------------------------------------
# signals and stale temporary folders
# --------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temporary_folder_never_blocks_or_pollutes(tmp_path):
    from vlcompress.atomic import atomic_dir, remove_stale

    out = tmp_path / "run"
    stale = tmp_path / f".run.tmp-{_dead_pid()}-deadbeef"
    stale.mkdir()
    (stale / "half.onnx").write_bytes(b"x" * 10)
    mine = tmp_path / f".run.tmp-{os.getppid()}-cafebabe"  # a live writer's: kept
    mine.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("ok")
    assert (out / "a.txt").read_text() == "ok"
    assert not stale.exists() and mine.exists()
    assert remove_stale(out) == []


@pytest.mark.parametrize("sig", [
    signal.SIGTERM,
    # slow: a second real process (~15 s); SIGINT takes the KeyboardInterrupt path SIGTERM shares
    pytest.param(signal.SIGINT, marks=pytest.mark.slow),
])
def test_signal_during_prune_export_removes_temporary(tmp_path, sig):
    """A real process, killed while its output folder is being built: exit 128+sig or 130,
    one line, and no temporary folder left."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlcompress", "prune-export", "--calibration-size", "16",
         "--eval-size", "720", "--batch-sizes", "1", "--iterations", "200", "--out", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob(".run.tmp-*")):
        if proc.poll() is not None:
            pytest.fail(f"finished before the signal: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.05)
    assert list(tmp_path.glob(".run.tmp-*")), "no temporary folder appeared"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (130, 128 + int(sig)), (proc.returncode, stderr)
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert leftovers(tmp_path) == [] and not out.exists()


def _wait_for(proc, ready, what: str, timeout: float = 300.0) -> None:
    """Poll until ``ready()`` (the child is inside the command, its handlers installed); on
    failure the child is killed (never left running)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not ready():
            if proc.poll() is not None:
                pytest.fail(f"finished before the signal: {proc.returncode} {proc.stderr.read()}")
            time.sleep(0.05)
        assert ready(), f"{what} never happened in {timeout:.0f}s"
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


def _cli(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "vlcompress", *map(str, args)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _maps(pid: int, needle: str) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow  # a real prune-export, then bench in a subprocess: ~30 s idle, minutes loaded
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_sigterm_during_bench_writes_nothing(tmp_path):
    """SIGTERM while ``bench`` measures a real run folder: exit 143, one 'interrupted' line,
    no report, no temporary file. The signal is sent once onnxruntime is loaded (bench imports
    it lazily, inside the command: the handlers are in place)."""
    run_dir = tmp_path / "run"
    res = run("prune-export", "--method", "magnitude", "--calibration-size", "8", "--eval-size",
              "16", "--batch-sizes", "1", "--iterations", "2", "--out", run_dir)
    assert res.exit_code == 0, res.output
    before = sorted(p.name for p in run_dir.iterdir())
    proc = _cli(tmp_path, "bench", run_dir, "--no-accuracy", "--batch-sizes", "1",
                "--iterations", "1000000", "--summary", tmp_path / "s.md")
    _wait_for(proc, lambda: _maps(proc.pid, "onnxruntime_pybind11_state"), "onnxruntime load")
    time.sleep(0.5)  # into the timing loop
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no bench-report.json
    assert not (tmp_path / "s.md").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # a real prune-export, then recover in a subprocess past its first checkpoint
def test_sigterm_during_recover_keeps_checkpoint_only(tmp_path):
    """SIGTERM while ``recover`` trains: exit 143, one 'interrupted' line naming the
    checkpoint, no recovered/ model and no temporary file; the checkpoint it keeps resumes."""
    from test_recover import _run_dir

    run_dir = _run_dir(tmp_path)
    ck = run_dir / "recover" / "last.pt"
    proc = _cli(tmp_path, "recover", run_dir, "--steps", "1000000", "--size", "8",
                "--batch-size", "4", "--eval-size", "16")
    _wait_for(proc, ck.is_file, "the first checkpoint (step 25)")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "interrupted" in stderr and "recover/" in stderr
    assert not (run_dir / "recovered").exists() and not (run_dir / "recover.json").exists()
    assert leftovers(tmp_path) == []
    ckpt = torch.load(ck, weights_only=False)
    assert ckpt["step"] >= 25


# --------------------------------------------------------------------------------------------
# the README's order: install, run the main job in the checkout, then the tests
# --------------------------------------------------------------------------------------------
def test_each_test_runs_in_its_own_empty_folder():
    """tests/conftest.py's autouse fixture: a fresh empty working folder outside the checkout,
    so the README's main job (which writes ``vlcompress-out/`` in the checkout) cannot change
    a test's result, and a command's default ``--out`` lands in the test's own folder."""
    cwd = Path.cwd().resolve()
    assert list(cwd.iterdir()) == []
    assert ROOT not in (cwd, *cwd.parents)


def test_ci_runs_the_readme_main_job_before_the_tests():
    """.ci/run keeps the README's order true: the main job as written (no arguments), in the
    checkout, then the README's test command."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert "vlcompress prune-export" in lines and "python -m pytest" in lines
    assert lines.index("vlcompress prune-export") < lines.index("python -m pytest")
    assert not any(ln.startswith("cd ") for ln in
                   lines[lines.index('cd "$(dirname "$0")/.."') + 1:
                         lines.index("vlcompress prune-export")])


# --------------------------------------------------------------------------------------------
# options that another choice makes meaningless: refused before any work
# --------------------------------------------------------------------------------------------
MEANINGLESS = [
    (["prune-export", "--pattern", "2:4", "--units", "heads"], "--units heads", "structured"),
    (["prune-export", "--pattern", "unstructured", "--round-to", "16"], "--round-to 16",
     "structured"),
    (["prune", "--pattern", "2:4", "--units", "heads"], "--units heads", "structured"),
    (["prune-export", "--pattern", "structured", "--skip-incompatible"],
     "--skip-incompatible", "N:M"),
    (["prune", "--pattern", "unstructured", "--skip-incompatible"], "--skip-incompatible", "N:M"),
    (["prune-export", "--train-size", "100"], "--train-size 100", "--recover-steps"),
    (["prune-export", "--train-data", "shapes"], "--train-data shapes", "--recover-steps"),
    (["bench", "RUN", "--no-latency", "--batch-sizes", "4"], "--batch-sizes 4", "--no-latency"),
    (["bench", "RUN", "--no-latency", "--runtime", "torch"], "--runtime torch", "--no-latency"),
    (["bench", "RUN", "--no-latency", "--iterations", "5"], "--iterations 5", "--no-latency"),
    (["bench", "RUN", "--no-latency", "--threads", "2"], "--threads 2", "--no-latency"),
    (["bench", "RUN", "--no-accuracy", "--eval-size", "10"], "--eval-size 10", "--no-accuracy"),
    (["bench", "RUN", "--max-latency-regression", "0.2"], "--max-latency-regression 0.2",
     "--baseline"),
    (["bench", "RUN", "--latency-quantile", "0.5"], "--latency-quantile 0.5", "--baseline"),
    (["bench", "RUN", "--metrics", "i2t_r1"], "--metrics i2t_r1", "--baseline"),
    (["bench", "RUN", "--threads", "0"], "--threads 0", "positive integer"),
    (["bench", "RUN", "--threads", "2", "--runtime", "torch"], "--threads 2", "onnxruntime"),
    (["sweep", "--no-latency", "--batch-sizes", "4"], "--batch-sizes 4", "--no-latency"),
    (["sweep", "--no-latency", "--fp16"], "--fp16", "--no-latency"),
    (["sweep", "--patterns", "2:4", "--sparsities", "0.3"], "--sparsities 0.3", "N:M"),
    (["sweep", "--eval-size", "0"], "--eval-size 0", "positive integer"),
    (["recover", "RUN", "--batch-size", "0"], "--batch-size 0", "positive integer"),
    (["recover", "RUN", "--size", "0"], "--size 0", "positive integer"),
    (["recover", "RUN", "--eval-size", "0"], "--eval-size 0", "positive integer"),
]


@pytest.mark.parametrize("args,value,allowed", MEANINGLESS,
                         ids=[" ".join(a) for a, _, _ in MEANINGLESS])
def test_meaningless_or_bad_option_refused_before_work(args, value, allowed, tmp_path,
                                                       monkeypatch):
    """One line naming the value and what it needs, exit 2, no model loaded, nothing
    written (the run folder as it was, the working folder empty)."""
    import vlcompress.models as models

    def no_work(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(models, "load_model", no_work)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report.json").write_text(json.dumps(
        {"model": {"name": "tiny-clip"}, "prune": {"pattern": "2:4"}, "export": {}}))
    before = sorted(p.name for p in run_dir.iterdir())
    one_line_error(run(*[str(run_dir) if a == "RUN" else a for a in args]), value, allowed)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert list(Path.cwd().iterdir()) == []
