"""Serving BLIP captioning / VQA runs (issue 28 item 5): `export-triton` writes one
Python-backend generation model per variant that runs BlipOrtGenerator on the variant's
vision / [question] / decoder ONNX; each row of a batch gets the answer it gets alone (caption
starts left-padded, VQA questions grouped by length, never padded); bad requests are refused
one per line; `serve-check` compares the real server's tokens with the direct run.

The runs are built in seconds from tiny random BLIPs (dense and "pruned" of different seeds,
so their answers differ). The model file runs in-process with a stand-in for Triton's stub
module (test_serve_generate's); the end-to-end server test is slow here (each model's stub
imports transformers: 20-50 s to ready under the shared load)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from blip_caption_factory import make_tiny_blip_caption_folder
from test_serve import NO_CLIENT, NO_SERVER
from test_serve_generate import _load_generate_model, assert_serve_check_catches_a_swapped_decoder
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.exporters.triton import TritonRepo, export_triton, model_config_text
from vlcompress.optional_deps import triton_model_config_pb2
from vlcompress.runtime.gen_inputs import BlipPromptEncoder, read_image
from vlcompress.runtime.ort_generate_blip import BlipOrtGenerator
from vlcompress.serve import answer_texts, answer_tokens, generate_examples, generate_feeds

runner = CliRunner()
MAX_NEW = 6


def make_blip_run(root, *, vqa: bool = False, variants=("dense", "pruned")):
    """A BLIP run folder as prune-export writes it: <variant>/ exports (export_blip, not
    validated here; tests/test_blip_caption.py validates them), pruned/model, report.json."""
    from vlcompress.data import load_eval
    from vlcompress.exporters.generative_blip import export_blip
    from vlcompress.models import load_model

    run = root / "run"
    images = load_eval("shapes", n=2, batch_size=2).images
    for variant, seed in zip(variants, (1, 2), strict=False):
        folder = make_tiny_blip_caption_folder(root / variant, seed=seed, vqa=vqa)
        export_blip(load_model(str(folder)), run / variant, images=images,
                    questions=["what color is it ?"] * 2 if vqa else None, max_new_tokens=4,
                    validate=False)
    shutil.copytree(folder, run / "pruned" / "model")
    family = "blip-vqa" if vqa else "blip-caption"
    (run / "report.json").write_text(json.dumps({
        "model": {"name": family, "family": family, "generative": True},
        "config": {"max_new_tokens": MAX_NEW, "batch_sizes": [1, 4]},
        "export": {"paths": {"model": "pruned/model"}}}))
    return run


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    return make_blip_run(tmp_path_factory.mktemp("blipcap"))


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory):
    return make_blip_run(tmp_path_factory.mktemp("blipvqa"), vqa=True, variants=("pruned",))


@pytest.fixture(scope="module")
def caption_repo(caption_run, tmp_path_factory):
    return export_triton(caption_run, tmp_path_factory.mktemp("capr") / "repo")


@pytest.fixture(scope="module")
def vqa_repo(vqa_run, tmp_path_factory):
    return export_triton(vqa_run, tmp_path_factory.mktemp("vqar") / "repo")


@pytest.fixture(scope="module")
def pruned_vlm(caption_run):
    from vlcompress.models import load_model

    return load_model(str(caption_run / "pruned" / "model"))


def test_blip_repository_is_one_blip_generation_model_per_variant(caption_run, caption_repo,
                                                                  vqa_repo):
    assert caption_repo.backend == "python" and caption_repo.device == "cpu"
    assert [m.name for m in caption_repo.models] == ["dense_generate", "pruned_generate"]
    for m in caption_repo.models:
        one = caption_repo.path / m.name / "1"
        spec = json.loads((one / "generation.json").read_text())
        assert {"vision", "decoder"} <= set(spec["files"]) and "question" not in spec["files"]
        for f in spec["files"].values():  # the variant's own graphs
            assert (one / f).read_bytes() == (caption_run / m.variant / f).read_bytes()
        assert "BlipOrtGenerator" in (one / "model.py").read_text()
        assert (one / "processor" / "tokenizer.json").is_file()
        assert m.parameters["kind"] == "blip-caption" and m.max_batch_size == 4
        ins = {t.name: t for t in m.inputs}
        assert ins["prompt"].optional and ins["image"].optional  # caption start: optional
        assert ins["pixel_values"].dims == [3, 32, 32]
    vqa = vqa_repo.models[0]
    assert [m.name for m in vqa_repo.models] == ["pruned_generate"]
    assert vqa.parameters["kind"] == "blip-vqa"
    assert (vqa_repo.path / vqa.name / "1" / "question.onnx").is_file()
    assert TritonRepo.load(vqa_repo.path).models[0].parameters == vqa.parameters
    readme = (caption_repo.path / "README.md").read_text()
    assert "BlipOrtGenerator" in readme and "caption's start" in readme
    assert "the question, required" in (vqa_repo.path / "README.md").read_text()


@pytest.mark.skipif(NO_CLIENT is not None, reason=str(NO_CLIENT))
def test_blip_generation_config_parses_with_tritons_protobuf(caption_repo):
    from google.protobuf import text_format

    m = caption_repo.models[1]
    text = (caption_repo.path / m.name / "config.pbtxt").read_text()
    assert text == model_config_text(m, "python", "cpu")
    cfg = text_format.Parse(text, triton_model_config_pb2().ModelConfig())
    assert {i.name: i.optional for i in cfg.input} == {
        "prompt": True, "image": True, "pixel_values": True, "max_new_tokens": True}
    assert cfg.parameters["kind"].string_value == "blip-caption"


@pytest.mark.parametrize("args,message", [
    (["--backend", "onnxruntime"], "--backend onnxruntime cannot serve the generative run"),
    (["--device", "gpu"], "--device gpu is not available for a generative run"),
    (["--variants", "dense,fp16"], "variant 'fp16' is not in run"),
])
def test_blip_export_refusals_are_one_line(caption_run, tmp_path, args, message):
    res = runner.invoke(app, ["export-triton", str(caption_run), "--out", str(tmp_path / "r"),
                              *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "r").exists()


def _count_calls(monkeypatch, generator):
    calls = []
    real = generator.generate
    monkeypatch.setattr(generator, "generate",
                        lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    return calls


def test_caption_model_batches_requests_each_row_as_alone_and_as_pytorch(
        caption_run, caption_repo, pruned_vlm, monkeypatch):
    """Several requests in one execute: no prompt (the run's caption prompt), a caption start,
    an empty start, pixels, a request of two rows, different limits; and malformed ones. The
    valid rows are ONE generate call; each row equals BlipOrtGenerator on it alone, and
    PyTorch's generate with that caption start."""
    model = _load_generate_model(monkeypatch, caption_repo, "pruned_generate")
    files, _ = generate_examples(5, seed=3)
    enc = model.encoder
    ctx = model.context  # the tiny BLIP's max_position_embeddings
    px = enc.encode([read_image(files[1])], ["a picture of the"])[0]["pixel_values"][None]
    requests = [
        generate_feeds(None, images=[files[0]], max_new_tokens=MAX_NEW),
        generate_feeds(["a picture of the"], pixel_values=px, max_new_tokens=3),
        generate_feeds([""], images=[files[2]], max_new_tokens=MAX_NEW),
        generate_feeds(["the shape", "a picture of"], images=files[3:5]),  # default limit
        generate_feeds(None, images=[b"not an image"]),
        generate_feeds(["a picture of"]),  # neither image nor pixels
        generate_feeds(None, images=[files[0]], max_new_tokens=ctx + 1),
        generate_feeds([" ".join(["shape"] * (ctx - 4))], images=[files[0]],
                       max_new_tokens=MAX_NEW),
    ]
    calls = _count_calls(monkeypatch, model.generator)
    res = model.execute(requests)
    assert len(calls) == 1 and calls[0][0][0].shape[0] == 5  # the five valid rows, one call
    assert res[4].error and "cannot be read" in res[4].error
    assert res[5].error and "exactly one of 'image'" in res[5].error
    assert res[6].error and f"max_new_tokens {ctx + 1} is outside 1..{ctx}" in res[6].error
    assert res[7].error and "exceeds the context" in res[7].error
    assert all("\n" not in res[i].error for i in range(4, 8))
    direct = BlipOrtGenerator(caption_run / "pruned")
    rows = [(0, 0, files[0], None, MAX_NEW), (1, 0, None, "a picture of the", 3),
            (2, 0, files[2], "", MAX_NEW), (3, 0, files[3], "the shape", MAX_NEW),
            (3, 1, files[4], "a picture of", MAX_NEW)]
    lengths = set()
    for req, row, file, prompt, limit in rows:
        r = (enc.encode([read_image(file)], [prompt]) if file is not None
             else enc.encode_pixels(px, [prompt]))
        lengths.add(len(r[0]["start"]))
        feeds = enc.batch(r)
        want = direct.generate(feeds["input_ids"], feeds["attention_mask"],
                               feeds["pixel_values"], limit)[0]
        got = answer_tokens(res[req].outputs)[row]
        assert got == want and len(got) <= limit, (req, row)
        assert answer_texts(res[req].outputs)[row] == enc.decode(want)
        if file is not None:  # the PyTorch model with this caption start
            pruned_vlm.prompts["caption"] = "a picture of" if prompt is None else prompt
            torch_tokens = pruned_vlm.generate([read_image(file)], max_new_tokens=limit)[0]
            assert got == torch_tokens, (req, row)
    pruned_vlm.prompts["caption"] = "a picture of"
    assert len(lengths) > 1  # the batch was left-padded
    assert sum(len(answer_tokens(res[i].outputs)[0]) for i in range(3)) > 3  # real answers


def test_caption_answer_equals_vlcompress_generate(caption_run, caption_repo, monkeypatch,
                                                   tmp_path):
    """The served caption is the text `vlcompress generate` prints from the run's files."""
    model = _load_generate_model(monkeypatch, caption_repo, "dense_generate")
    files, _ = generate_examples(1, seed=6)
    (tmp_path / "x.png").write_bytes(files[0])
    res = model.execute([generate_feeds(["a picture of"], images=files, max_new_tokens=5)])
    cli = runner.invoke(app, ["generate", str(caption_run), "--image", str(tmp_path / "x.png"),
                              "--prompt", "a picture of", "--max-new-tokens", "5", "--dense"])
    assert cli.exit_code == 0, cli.output
    assert answer_texts(res[0].outputs)[0] == cli.stdout.strip()


def test_vqa_model_groups_questions_by_length_and_refuses_missing_questions(
        vqa_run, vqa_repo, monkeypatch):
    """Questions of different lengths in one execute are generated in one call per length
    (BLIP attends question padding, so padding would change answers); each row equals
    PyTorch's answer to that question alone. A request without a question, or with a blank
    one, gets its own one-line error."""
    from vlcompress.models import load_model

    model = _load_generate_model(monkeypatch, vqa_repo, "pruned_generate")
    files, _ = generate_examples(4, seed=1)
    qs = ["what color is it ?", "what shape is it ?", "where is the shape in the picture ?",
          "is it green ?"]
    requests = [generate_feeds(qs[:2], images=files[:2], max_new_tokens=MAX_NEW),
                generate_feeds([qs[2]], images=[files[2]], max_new_tokens=4),
                generate_feeds(None, images=[files[3]]),
                generate_feeds(["   "], images=[files[3]]),
                generate_feeds([qs[3]], images=[files[3]])]
    calls = _count_calls(monkeypatch, model.generator)
    res = model.execute(requests)
    assert "input 'prompt' (the question) is missing" in res[2].error
    assert "blank question" in res[3].error
    lengths = {len(model.encoder.tokenizer(q)["input_ids"]) for q in qs}
    assert len(calls) == len(lengths) > 1
    for _, k in calls:  # no question is padded
        assert k["question_mask"].all()
    vlm = load_model(str(vqa_run / "pruned" / "model"))
    for req, row, file, q, limit in [(0, 0, files[0], qs[0], MAX_NEW), (0, 1, files[1], qs[1],
                                                                        MAX_NEW),
                                     (1, 0, files[2], qs[2], 4), (4, 0, files[3], qs[3], MAX_NEW)]:
        want = vlm.generate([read_image(file)], [q], max_new_tokens=limit)[0]
        assert answer_tokens(res[req].outputs)[row] == want, (req, row)


def test_blip_encoder_refuses_wrong_pixels_and_kinds(caption_run):
    spec = json.loads((caption_run / "pruned" / "generation.json").read_text())
    enc = BlipPromptEncoder(caption_run / "pruned" / "model", "blip-caption", spec)
    with pytest.raises(Exception, match=r"allowed: float32 \[batch, 3, 32, 32\]"):
        enc.encode_pixels(np.zeros((1, 3, 16, 16), np.float32), [None])
    with pytest.raises(Exception, match="is not a BLIP export"):
        BlipPromptEncoder(caption_run / "pruned" / "model", "x", {**spec, "kind": "llava"})


@pytest.mark.slow  # two generation stubs import transformers: 20-60 s to ready here
@pytest.mark.skipif(NO_SERVER is not None, reason=str(NO_SERVER))
def test_serve_check_generates_blip_through_the_real_server(caption_repo, vqa_repo,
                                                            caption_run, tmp_path):
    for repo, models in ((caption_repo, 2), (vqa_repo, 1)):
        res = runner.invoke(app, ["serve-check", str(repo.path), "--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert out["passed"] and len(out["rows"]) == 3 * models
        for r in out["rows"]:
            assert "BlipOrtGenerator" in r["reference"] and "alone" in r["reference"]
            if r["kind"] == "refusal":
                assert r["refused"] == r["bad_requests"] >= 3
            else:
                assert r["rows_equal"] == r["rows"] == 4 and r["new_tokens"] > 0
    assert_serve_check_catches_a_swapped_decoder(caption_run, tmp_path)


def test_vlcompress_generate_on_vqa_answers_as_served_and_refuses_a_blank_question(
        vqa_run, vqa_repo, monkeypatch, tmp_path):
    """`vlcompress generate` on a BLIP VQA run shares the served model's front end: the same
    answer; a blank question is one line, exit 2."""
    model = _load_generate_model(monkeypatch, vqa_repo, "pruned_generate")
    files, _ = generate_examples(1, seed=5)
    (tmp_path / "x.png").write_bytes(files[0])
    q = "what shape is it ?"
    res = model.execute([generate_feeds([q], images=files, max_new_tokens=5)])
    cli = runner.invoke(app, ["generate", str(vqa_run), "--image", str(tmp_path / "x.png"),
                              "--prompt", q, "--max-new-tokens", "5"])
    assert cli.exit_code == 0, cli.output
    assert answer_texts(res[0].outputs)[0] == cli.stdout.strip()
    bad = runner.invoke(app, ["generate", str(vqa_run), "--image", str(tmp_path / "x.png"),
                              "--prompt", " "])
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.exit_code == 2 and len(lines) == 1 and "blank question" in lines[0], bad.output
