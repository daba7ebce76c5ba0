"""BLIP captioning and VQA (``blip-caption``, ``blip-vqa``): picked from the config's
architectures, loaded from hub-layout folders, every part pruned by every method, the
block engine calibrating each stack on the inputs the model feeds it, structured slicing of
the decoder (heads, neurons, cross-attention) with reload, ONNX export with a KV cache
token-exact against PyTorch, and prune-export end to end. Tiny random models built offline
(tests/blip_caption_factory.py)."""

from __future__ import annotations

import json

import pytest
import torch
from blip_caption_factory import make_tiny_blip_caption_folder, make_tiny_blip_caption_model
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.data import load_calibration, load_eval, save_pairs, save_vqa
from vlcompress.models import load_model, peek_model
from vlcompress.prune import prune

RUN = ["--calibration-size", "4", "--eval-size", "4", "--max-new-tokens", "4", "--batch-sizes",
       "1", "--iterations", "3"]
QUESTIONS = ["what color is it ?", "where is it", "what shape is the small picture ?", "size"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("blipcap")
    pairs = load_eval("shapes", n=4, batch_size=4)
    return {"caption": make_tiny_blip_caption_folder(root),
            "vqa": make_tiny_blip_caption_folder(root, vqa=True),
            # prune-export times decode: 32 tokens + 5 warm-up past a 4-token prompt
            "caption64": make_tiny_blip_caption_folder(root, name="cap64", context=64),
            "vqa64": make_tiny_blip_caption_folder(root, vqa=True, name="vqa64", context=64),
            "caps": save_pairs(pairs, root / "caps", captions=pairs.retrieval_captions),
            "vqadata": save_vqa(pairs.images, ["what color is it ?"] * 4,
                                [[c.split()[1], "a " + c.split()[1]] for c in pairs.captions],
                                root / "vqadata")}


@pytest.fixture(scope="module")
def calib():
    return load_calibration("shapes", n=8, batch_size=4)


def test_family_comes_from_the_architectures(folders, tmp_path):
    from vlcompress.models.blip import BLIP
    from vlcompress.models.blip_caption import BlipCaption, BlipVqa

    cap, vqa = load_model(str(folders["caption"])), load_model(str(folders["vqa"]))
    assert type(cap) is BlipCaption and cap.towers == ("vision", "language")
    assert type(vqa) is BlipVqa and vqa.towers == ("vision", "text", "language")
    assert json.loads((folders["caption"] / "config.json").read_text())["model_type"] == "blip"
    # the same model type with the retrieval architecture stays the retrieval family
    from transformers import BlipForImageTextRetrieval

    ret = tmp_path / "ret"
    BlipForImageTextRetrieval(cap.model.config).save_pretrained(ret)
    cap.processor.save_pretrained(ret)
    assert type(load_model(str(ret))) is BLIP
    info = peek_model("blip-image-captioning-base")
    assert info.family == "blip-caption" and info.generative and info.structured
    assert peek_model("blip-vqa-base").towers == ("vision", "text", "language")


def test_parts_layers_and_sequences(folders, calib):
    vlm = load_model(str(folders["caption"]))
    layers = vlm.prunable_layers()
    assert {ly.modality for ly in layers} == {"vision", "language"}
    names = [ly.name for ly in layers]
    assert "text_decoder.bert.encoder.layer.1.crossattention.self.key" in names  # cross-attn
    assert "vision_model.encoder.layers.0.self_attn.qkv" in names
    assert not any("cls.predictions" in n or "embeddings" in n for n in names)
    enc = vlm.encode(next(iter(calib.batches())))
    ids, tm = enc["input_ids"], enc["target_mask"]
    assert (ids[:, 0] == vlm.bos_id).all()  # [DEC] starts every sequence, as BLIP trains
    plen = vlm._prompt_len()  # "[DEC] a picture of"
    assert plen == 4 and not tm[:, :plen - 1].any() and tm[:, plen - 1].all()
    # the last target position predicts [SEP]
    last = tm.long().cumsum(1).argmax(1)
    assert (ids[torch.arange(len(ids)), last + 1] == vlm.sep_id).all()
    assert vlm.loss(enc).item() > 0


def test_generation_left_padding_equals_one_by_one(folders, calib):
    vlm = load_model(str(folders["caption"]))
    images = list(next(iter(calib.batches())).images)
    batched = vlm.generate(images, max_new_tokens=5)
    assert batched == [vlm.generate([im], max_new_tokens=5)[0] for im in images]
    assert len({tuple(t) for t in batched}) > 1  # the decoder reads the image
    with pytest.raises(Exception, match="answers no questions"):
        vlm.generate(images[:1], ["what color is it ?"])
    vqa = load_model(str(folders["vqa"]))
    ans = vqa.generate(images[:2], QUESTIONS[:2], max_new_tokens=3)
    assert len(ans) == 2 and all(len(a) <= 3 for a in ans)


@pytest.mark.parametrize("kind", ["caption", "vqa"])
def test_blockwise_captures_each_stack_after_the_one_it_reads(folders, calib, kind):
    """With nothing pruned, the block engine's statistics equal a whole-model pass's: the
    decoder is captured after the vision encoder (captioning) and after the question
    encoder (VQA), so it reads their real outputs."""
    from vlcompress.blockwise import run_blockwise
    from vlcompress.calibrate import collect_stats

    vlm = load_model(str(folders[kind]))
    layers = vlm.prunable_layers()
    ref = collect_stats(vlm, calib, layers)
    got = {}
    run_blockwise(vlm, calib, layers, lambda b, st: got.update(st))
    assert set(got) == set(ref)
    for name, s in ref.items():
        assert got[name].tokens == s.tokens, name
        torch.testing.assert_close(got[name].sq_sum, s.sq_sum, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["caption", "vqa"])
@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("wanda", "2:4"),
                                            ("sparsegpt", "2:4"), ("multiflow", "unstructured"),
                                            ("ecoflap", "unstructured")])
def test_every_method_prunes_every_part(folders, calib, kind, method, pattern):
    vlm = load_model(str(folders[kind]))
    res = prune(vlm, method, 0.5, pattern, calibration=calib)
    assert set(res.per_modality) == set(vlm.towers)
    assert abs(res.achieved - 0.5) < 0.02
    assert all(v > 0.2 for v in res.per_modality.values())
    for ly in vlm.prunable_layers():
        assert bool((ly.weight == 0).any()), ly.name
    if pattern == "2:4":
        w = vlm.model.text_decoder.bert.encoder.layer[1].crossattention.self.query.weight
        assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all()


@pytest.mark.parametrize("kind", ["caption", "vqa"])
@pytest.mark.parametrize("method,opts", [
    ("upop", {"search_steps": 2, "retrain_steps": 1}),
    ("efficientvlm", {"train_steps": 3, "retrain_steps": 1, "gate_lr": 2.0, "lambda_lr": 5.0}),
])
def test_structured_slices_decoder_and_cross_attention_and_reloads(folders, calib, kind,
                                                                   method, opts, tmp_path):
    from vlcompress.models.surgery import find_blocks, read_manifest

    vlm = load_model(str(folders[kind]))
    dense_params = vlm.num_parameters()[0]
    units = {(b.stack, b.layout.name) for b in find_blocks(vlm)}
    assert ("text_decoder.bert.encoder.layer", "blip-text-cross") in units
    assert ("text_decoder.bert.encoder.layer", "blip-text") in units
    res = prune(vlm, method, 0.5, "structured", calibration=calib, method_options=opts)
    assert set(res.per_modality) == set(vlm.towers) and res.achieved > 0.02
    assert vlm.num_parameters()[0] < dense_params  # sliced, not masked
    vlm.save(tmp_path / "m")
    man = read_manifest(tmp_path / "m")
    assert "text_decoder.bert.encoder.layer" in man["stacks"]
    again = load_model(str(tmp_path / "m"))
    assert type(again) is type(vlm) and again.num_parameters()[0] == vlm.num_parameters()[0]
    enc = vlm.encode(next(iter(calib.batches())))
    torch.testing.assert_close(again.logits(enc), vlm.logits(enc))
    images = list(next(iter(calib.batches())).images)
    qs = QUESTIONS if kind == "vqa" else None
    assert again.generate(images, qs, max_new_tokens=4) == vlm.generate(images, qs,
                                                                          max_new_tokens=4)


@pytest.mark.parametrize("kind", ["caption", "vqa"])
def test_export_is_token_exact_dense_and_sliced(folders, calib, kind, tmp_path):
    from vlcompress.exporters.generative_blip import export_blip
    from vlcompress.runtime.ort_generate import read_spec

    vlm = load_model(str(folders[kind]))
    images = [im for b in calib.batches() for im in b.images]
    qs = (QUESTIONS * 2) if kind == "vqa" else None
    res = export_blip(vlm, tmp_path / "dense", images=images, questions=qs, max_new_tokens=6)
    v = res.validation
    assert v["token_exact"] == 1.0 and v["prompts"] == 8
    spec = read_spec(tmp_path / "dense")
    assert spec["kind"] == f"blip-{kind}" and spec["num_heads"] == [4, 4]
    assert set(spec["files"]) == ({"vision", "question", "cross_kv", "decoder"} if kind == "vqa"
                                  else {"vision", "cross_kv", "decoder"})
    # the cross-attention keys / values are the decoder's inputs (computed once per request by
    # cross_kv.onnx), not recomputed from the encoder states at every step
    import onnx

    dec_inputs = [i.name for i in onnx.load(str(tmp_path / "dense" / "decoder.onnx")).graph.input]
    assert "encoder_hidden_states" not in dec_inputs
    assert [n for n in dec_inputs if n.startswith("cross.")] == [
        f"cross.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    prune(vlm, "upop", 0.5, "structured", calibration=calib,
          method_options={"search_steps": 2, "retrain_steps": 1})
    res = export_blip(vlm, tmp_path / "pruned", images=images, questions=qs, max_new_tokens=6)
    assert res.validation["token_exact"] == 1.0
    spec = read_spec(tmp_path / "pruned")
    layers = vlm.model.text_decoder.bert.encoder.layer
    assert spec["num_heads"] == [int(ly.attention.self.num_attention_heads) for ly in layers]
    assert spec["cross_heads"] == [ly.crossattention.self.key.out_features // 8 for ly in layers]
    assert spec["num_heads"] != [4, 4] or spec["cross_heads"] != [4, 4]  # something was sliced


def test_export_validation_catches_a_wrong_graph(folders, calib, tmp_path):
    """A decoder graph that disagrees with the model (weights changed after the export)
    fails validation in one ExportError naming the mismatches."""
    from vlcompress.errors import ExportError
    from vlcompress.exporters.generative_blip import export_blip, validate_blip

    vlm = load_model(str(folders["caption"]))
    images = list(next(iter(calib.batches())).images)
    export_blip(vlm, tmp_path / "e", images=images, max_new_tokens=4, validate=False)
    with torch.no_grad():
        vlm.model.text_decoder.bert.encoder.layer[0].crossattention.output.dense.weight.mul_(3)
    with pytest.raises(ExportError, match="decoder prefill logits"):
        validate_blip(vlm, tmp_path / "e", images=images, max_new_tokens=4)


def test_prune_export_sparsegpt_24_on_user_captions(folders, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", str(folders["caption64"]),
                                   "--method", "sparsegpt", "--pattern", "2:4", "--calibration",
                                   str(folders["caps"]), "--out", str(out), "--triton", "python",
                                   *RUN])
    assert res.exit_code == 0, res.output
    assert "vision.onnx, cross_kv.onnx, decoder.onnx" in res.output
    # --triton python: OUT/triton serves both variants with the BLIP generation model
    repo = json.loads((out / "triton" / "vlcompress_triton.json").read_text())
    assert [(m["name"], m["parameters"]["kind"]) for m in repo["models"]] == [
        ("dense_generate", "blip-caption"), ("pruned_generate", "blip-caption")]
    assert "BlipOrtGenerator" in (out / "triton" / "pruned_generate" / "1" / "model.py").read_text()
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["family"] == "blip-caption" and rep["prune"]["scope"] == ["vision",
                                                                                   "language"]
    acc = rep["accuracy"]
    assert set(acc["metrics"]) == {"cider", "attribute_accuracy"}
    assert acc["fidelity"]["token_kl"] > 0
    for variant in ("dense", "pruned"):
        gen = rep["export"]["generative"][variant]
        assert gen["validation"]["token_exact"] == 1.0
        assert json.loads((out / variant / "generation.json").read_text())["kind"] == \
            "blip-caption"
    # latency: vision / prefill / decode of both variants on ONNX Runtime and PyTorch eager
    rows = rep["latency"]
    assert {(r["runtime"], r["tower"], r["batch"]) for r in rows} == {
        (rt, p, 1) for rt in ("onnxruntime", "torch") for p in ("vision", "prefill", "decode")}
    assert all(r["speedup"] > 0 for r in rows)
    dec = next(r for r in rows if r["tower"] == "decode" and r["runtime"] == "onnxruntime")
    assert dec["unit"] == "ms/token" and dec["new_tokens"] >= 32
    assert len(dec["pruned_samples_ms"]) >= 32 and dec["tokens_per_s"]["pruned"] > 0
    assert dec["prompt_tokens"] == 4  # [DEC] a picture of
    assert not any("not built" in n for n in rep["data"]["notes"])
    # bench re-times it; the gate reads decode alone
    res = CliRunner().invoke(app, ["bench", str(out), "--no-accuracy", "--baseline",
                                   str(out / "report.json"), "--iterations", "3", "--warmup", "1",
                                   "--threads", "1", "--report", str(tmp_path / "b.json"),
                                   "--max-latency-regression", "10"])
    assert res.exit_code == 0, res.output
    names = {c["name"] for c in json.loads((tmp_path / "b.json").read_text())["gate"]["checks"]}
    assert {"latency onnxruntime/cpu decode@1 relative",
            "latency torch/cpu prefill@1 relative"} <= names
    again = load_model(str(out / "pruned" / "model"))
    assert again.family == "blip-caption" and again.prompts["caption"] == "a picture of"
    # `generate` answers from the exported files what the pruned PyTorch model generates
    from PIL import Image

    img = sorted(p for p in (folders["caps"]).rglob("*.png"))[0]
    res = CliRunner().invoke(app, ["generate", str(out), "--image", str(img), "--prompt",
                                   "a picture of", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    with Image.open(img) as im:
        want = again.decode(again.generate([im.convert("RGB")], max_new_tokens=5))[0]
    assert res.output.strip() == want
    # ONNX Runtime GenAI cannot run BLIP's decoder: one line, whether or not the extra is there
    res = CliRunner().invoke(app, ["generate", str(out), "--image", str(img), "--prompt",
                                   "a picture of", "--runtime", "genai"])
    assert res.exit_code == 2 and "cannot run the blip-caption export" in res.output, res.output
    assert "cross-attends" in res.output and "Traceback" not in res.output


def test_prune_export_structured_vqa_parts_and_bad_data(folders, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", str(folders["vqa64"]), "--method",
                                   "upop", "--pattern", "structured", "--parts", "text,language",
                                   "--calibration", str(folders["vqadata"]), "--out", str(out),
                                   "--method-option", "search_steps=2",
                                   "--method-option", "retrain_steps=1", *RUN])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["accuracy"]["metrics"]) == {"vqa_accuracy"}
    assert set(rep["prune"]["per_modality"]) == {"text", "language"}
    # VQA is timed too: the prefill runs the question encoder; the decoder starts from [DEC]
    prefill = [r for r in rep["latency"] if r["tower"] == "prefill"]
    assert {r["runtime"] for r in prefill} == {"onnxruntime", "torch"}
    assert all(r["prompt_tokens"] == 1 and r["speedup"] > 0 for r in prefill)
    assert (out / "pruned" / "question.onnx").is_file()
    assert load_model(str(out / "pruned" / "model")).num_parameters()[0] < \
        load_model(str(folders["vqa64"])).num_parameters()[0]
    # questions for a captioning model: one line, nothing written
    bad = tmp_path / "bad"
    res = CliRunner().invoke(app, ["prune-export", "--model", str(folders["caption"]),
                                   "--calibration", str(folders["vqadata"]), "--out", str(bad)])
    assert res.exit_code == 2 and "answering no questions" in res.output, res.output
    assert "Traceback" not in res.output and not bad.exists()
    res = CliRunner().invoke(app, ["prune-export", "--model", str(folders["caption"]),
                                   "--triton", "onnxruntime", "--out", str(bad)])
    assert res.exit_code == 2 and "allowed: --triton python" in res.output, res.output
    assert not bad.exists()


def test_tokenizer_ids_follow_the_text_config():
    model, tok = make_tiny_blip_caption_model()
    tc = model.config.text_config
    assert tok.pad_token_id == tc.pad_token_id and tok.sep_token_id == tc.sep_token_id
    assert tok.bos_token_id == tc.bos_token_id and len(tok) == tc.vocab_size
    ids = tok("a picture of")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tc.sep_token_id


@pytest.mark.parametrize("kind", ["caption", "vqa"])
def test_step_entry_points_generate_what_pytorch_generates(folders, calib, kind, tmp_path):
    """The PyTorch eager generator the latency times (prefill / step on transformers' cache)
    and the ONNX generator's prefill / step (IOBinding buffers, cross keys / values bound
    once) give ``BlipCaption.generate``'s tokens; a step past the capacity is refused."""
    from vlcompress.errors import ConfigError
    from vlcompress.exporters.generative_blip import export_blip
    from vlcompress.runtime.ort_generate_blip import BlipOrtGenerator, blip_inputs, open_generator
    from vlcompress.runtime.torch_generate import BlipTorchGenerator, torch_generator

    vlm = load_model(str(folders[kind]))
    images = list(next(iter(calib.batches())).images)
    qs = QUESTIONS if kind == "vqa" else None
    export_blip(vlm, tmp_path / "e", images=images, questions=qs, validate=False)
    want = vlm.generate(images, qs, max_new_tokens=6)
    feed = blip_inputs(vlm.tokenizer, vlm.image_processor, images, bos_id=vlm.bos_id,
                       prompt=vlm.prompts["caption"],
                       questions=[vlm.prompt(q) for q in qs] if qs else None)
    q = {k: feed[k] for k in ("question_ids", "question_mask") if k in feed}
    tg = torch_generator(vlm)
    assert isinstance(tg, BlipTorchGenerator)
    og = open_generator(tmp_path / "e", threads=1)
    assert isinstance(og, BlipOrtGenerator)
    for gen in (tg, og):
        assert gen.generate(feed["input_ids"], feed["attention_mask"], feed["pixel_values"], 6,
                            **q) == want
    st = og.prefill(feed["input_ids"], feed["attention_mask"], feed["pixel_values"], 1, **q)
    ref = tg.prefill(feed["input_ids"], feed["attention_mask"], feed["pixel_values"], 1, **q)
    torch.testing.assert_close(torch.from_numpy(st.logits), torch.from_numpy(ref.logits),
                               atol=1e-4, rtol=1e-3)
    og.step(st, st.logits.argmax(-1))
    with pytest.raises(ConfigError, match="no room for another step"):
        og.step(st, st.logits.argmax(-1))


def test_prune_export_captioner_on_default_shapes_leaves_questions_out(folders, tmp_path):
    """The bundled shapes data holds captions and questions; a captioner is scored on the
    captions and the report says the questions were left out (it used to die mid-run)."""
    from vlcompress.data import generative_eval_data, skipped_questions

    assert [d.kind for d in generative_eval_data("shapes", n=4, questions=False)] != \
        [d.kind for d in generative_eval_data("shapes", n=4)]
    assert skipped_questions("shapes") and not skipped_questions(folders["caps"])
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", str(folders["caption64"]),
                                   "--method", "magnitude", "--out", str(out), *RUN])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["accuracy"]["metrics"]) == {"cider", "attribute_accuracy"}
    assert any("questions (vqa) left out" in n for n in rep["data"]["notes"]), rep["data"]["notes"]
