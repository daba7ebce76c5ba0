"""fp16 and int8 variants of the generative export (exporters/generative_quant.py): the graphs
they hold, validation per precision against PyTorch (and its failure), the evaluation from
the files on ONNX Runtime, prune-export --fp16 / --quantize int8 end to end, the bad-input
lines."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from llava_factory import make_tiny_llava_folder
from onnx import TensorProto, numpy_helper
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.data import load_eval, save_pairs
from vlcompress.errors import ConfigError, ExportError
from vlcompress.eval.generative import generative_fidelity, run_generative
from vlcompress.eval.generative_ort import ort_run_generative
from vlcompress.exporters.generative import export_generative
from vlcompress.exporters.generative_quant import (
    build_variant,
    check_generative_precision,
    make_fp16_variant,
    make_int8_variant,
    validate_variant,
)
from vlcompress.models import load_model
from vlcompress.models.visual_tokens import reduced_tokens, tower_tokens
from vlcompress.runtime.ort_generate import OrtGenerator, prompt_inputs
from vlcompress.runtime.registry import get_runtime

QUESTIONS = [None, "what color is it ?", "where is it ?", None, "how big is it ?"]


def _images(n, skip=0):
    return list(load_eval("shapes", n=n + skip, batch_size=n + skip).images)[skip:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gq")
    vlm = load_model(str(make_tiny_llava_folder(root, seed=1, vision="siglip", text="qwen2")))
    export_generative(vlm, root / "pruned", images=_images(2), questions=QUESTIONS[:2],
                      max_new_tokens=4)
    return vlm, root


def _types(path, names):
    m = onnx.load(str(path))
    vis = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)}
    return {n: vis[n] for n in names}


def test_fp16_variant_has_an_fp16_cache_and_is_within_its_tolerance(exported):
    vlm, root = exported
    info = make_fp16_variant(root / "pruned", root / "pruned_fp16")
    folder = root / "pruned_fp16"
    spec = json.loads((folder / "generation.json").read_text())
    assert spec["precision"] == "fp16" and spec["kv_dtype"] == "float16"
    assert info["files"]["decoder"]["bytes"] < (root / "pruned" / "decoder.onnx").stat().st_size
    F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
    t = _types(folder / "decoder.onnx", ["past.0.key", "present.1.value", "inputs_embeds",
                                         "logits"])
    assert t == {"past.0.key": F16, "present.1.value": F16, "inputs_embeds": F32, "logits": F32}
    dec = onnx.load(str(folder / "decoder.onnx"))
    assert not [n for n in dec.graph.node if n.op_type == "Cast" and n.input[0].startswith("past.")]
    assert {i.data_type for i in dec.graph.initializer if i.data_type in (F16, F32)} >= {F16}
    v = validate_variant(vlm, folder, images=_images(5, 3), questions=QUESTIONS,
                         max_new_tokens=6)
    assert v["precision"] == "fp16" and v["prompts"] == 5
    for part in ("decoder prefill logits", "decoder decode logits"):
        assert v["logits"][part]["min_cosine"] >= 0.999 and v["logits"][part]["top1"] >= 0.95
        assert v["logits"][part]["min_cosine"] < 1.0  # fp16 really rounded something
    # the generator carries the fp16 cache step to step
    gen = OrtGenerator(folder)
    assert gen.empty_past(2)["past.0.key"].dtype == np.float16
    enc = prompt_inputs(vlm.processor, [vlm.prompt(q) for q in QUESTIONS], _images(5, 3))
    toks = gen.generate(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], 6)
    assert sum(map(len, toks)) >= 10


def test_int8_variant_quantizes_the_weight_matmuls_only(exported):
    vlm, root = exported
    info = make_int8_variant(root / "pruned", root / "pruned_int8")
    folder = root / "pruned_int8"
    spec = json.loads((folder / "generation.json").read_text())
    assert spec["quantize"] == "int8" and spec["kv_dtype"] == "float32"
    dec = onnx.load(str(folder / "decoder.onnx"))
    ops = [n.op_type for n in dec.graph.node]
    # 2 layers x (q, k, v, o, gate, up, down) + the LM head
    assert ops.count("MatMulInteger") == 2 * 7 + 1, info["files"]["decoder"]
    assert "MatMul" in ops  # attention's activation x activation products stay float
    vis = onnx.load(str(folder / "vision.onnx"))
    assert "Conv" in [n.op_type for n in vis.graph.node]  # the patch embedding stays float
    assert (folder / "embed.onnx").read_bytes() == (root / "pruned" / "embed.onnx").read_bytes()
    v = validate_variant(vlm, folder, images=_images(5, 3), questions=QUESTIONS,
                         max_new_tokens=6)
    assert v["precision"] == "int8" and 0 <= v["greedy_agreement"] <= 1
    assert v["logits"]["decoder decode logits"]["min_cosine"] >= 0.98


def test_validation_fails_on_a_wrong_decoder(exported, tmp_path):
    """A decoder whose LM head is off by a random matrix is refused, naming the figure."""
    vlm, root = exported
    make_int8_variant(root / "pruned", tmp_path / "bad_int8")
    path = tmp_path / "bad_int8" / "decoder.onnx"
    m = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for t in m.graph.initializer:
        if t.data_type == TensorProto.INT8 and "lm_head" in t.name:
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(rng.integers(-127, 127, a.shape).astype(np.int8),
                                               t.name))
    onnx.save(m, str(path))
    with pytest.raises(ExportError, match="decoder prefill logits cosine"):
        validate_variant(vlm, tmp_path / "bad_int8", images=_images(1), max_new_tokens=2)


def test_ort_evaluation_of_the_fp32_files_is_pytorchs(exported):
    """The evaluation from the files (generation and next-token log-probs through ONNX Runtime)
    equals the PyTorch evaluation on an fp32 export (token-exact, validated)."""
    vlm, root = exported
    data = load_eval("shapes", n=4, batch_size=4)
    ref = run_generative(vlm, data, max_new_tokens=5)
    got = ort_run_generative(OrtGenerator(root / "pruned"), vlm, data, max_new_tokens=5)
    assert got.tokens == ref.tokens and got.texts == ref.texts and got.n == ref.n
    assert len(got.logprobs) == len(ref.logprobs) > 0
    for a, b in zip(got.logprobs, ref.logprobs, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-3)
    f = generative_fidelity(ref, got)
    assert f["greedy_agreement"] == 1.0 and f["token_kl"] < 1e-5


def test_token_variant_gets_precision_twins_sharing_the_twins_text_graphs(exported):
    """A --visual-tokens variant's fp16 / int8 twin: its own vision graph in that precision,
    the embed and decoder of the full-token twin's precision folder, validated with the K
    tokens; evaluated from the files with K-token prompts (the fp32 token export's evaluation
    equals PyTorch's with the reduction, so the ONNX path places tokens as PyTorch does)."""
    vlm, root = exported
    k = max(1, tower_tokens(vlm.model.config) // 4)
    export_generative(vlm, root / "pruned_tokens", images=_images(2), questions=QUESTIONS[:2],
                      max_new_tokens=4, visual_tokens=k, reuse=root / "pruned")
    data = load_eval("shapes", n=4, batch_size=4)
    with reduced_tokens(vlm.model, vlm.processor, k):
        ref = run_generative(vlm, data, max_new_tokens=5)
    got = ort_run_generative(OrtGenerator(root / "pruned_tokens"), vlm, data, max_new_tokens=5)
    assert got.tokens == ref.tokens and len(got.logprobs) == len(ref.logprobs) > 0
    for a, b in zip(got.logprobs, ref.logprobs, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-3)
    with pytest.raises(ConfigError, match="borrows its embed graph"):
        make_int8_variant(root / "pruned_tokens", root / "nowhere")
    for precision, make in (("fp16", make_fp16_variant), ("int8", make_int8_variant)):
        twin = root / f"pruned_{precision}_twin"
        make(root / "pruned", twin)
        info = build_variant(vlm, root / "pruned_tokens", precision, images=_images(4, 3),
                             questions=QUESTIONS[:4], max_new_tokens=6, visual_tokens=k,
                             shared=twin)
        folder = root / f"pruned_tokens_{precision}"
        spec = json.loads((folder / "generation.json").read_text())
        assert spec["files"] == {"vision": "vision.onnx", "embed": f"../{twin.name}/embed.onnx",
                                 "decoder": f"../{twin.name}/decoder.onnx"}
        assert info["paths"]["decoder"] == f"{twin.name}/decoder.onnx"
        assert spec["image_tokens"] == k and spec["visual_tokens"]["kept"] == k
        assert spec["quantize"] == precision and sorted(p.name for p in folder.iterdir()) == \
            ["generation.json", "vision.onnx"]
        vis = onnx.load(str(folder / "vision.onnx"))
        ops = [n.op_type for n in vis.graph.node]
        assert ("MatMulInteger" in ops) == (precision == "int8")
        v = info["validation"]
        assert v["precision"] == precision and v["prompts"] == 4
        assert 0.5 <= v["logits"]["vision"]["kept_agreement"] <= 1.0
        assert v["logits"]["vision"]["min_cosine"] >= (0.999 if precision == "fp16" else 0.98)
        gen = OrtGenerator(folder)
        assert gen.kv_dtype == (np.float16 if precision == "fp16" else np.float32)
        run = ort_run_generative(gen, vlm, data, max_new_tokens=5)
        assert sum(map(len, run.tokens)) > 0
        assert generative_fidelity(ref, run)["greedy_agreement"] >= 0.5


def test_refusals_name_what_is_allowed():
    cpu = get_runtime("onnxruntime", "cpu")
    assert check_generative_precision("int8", "dynamic", False, cpu) == "int8"
    assert check_generative_precision("none", "static", True, cpu) == "fp16"
    assert check_generative_precision("none", "static", False, cpu) is None
    for args, msg in [(("fp8", "static", False, cpu), "--quantize fp8 is not available"),
                      (("fp16", "static", False, cpu), "allowed: --fp16"),
                      (("int8", "static", False, cpu), "--quantize-method static is not built"),
                      (("int8", "dynamic", True, cpu), "drop --fp16"),
                      (("int8", "dynamic", False, get_runtime("onnxruntime", "cuda")),
                       "runs on onnxruntime/cpu")]:
        with pytest.raises(ConfigError, match=msg):
            check_generative_precision(*args)


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gqrun")
    model = make_tiny_llava_folder(root)
    pairs = load_eval("shapes", n=4, batch_size=4)
    caps = save_pairs(pairs, root / "caps", captions=pairs.retrieval_captions)
    return model, caps


# one latency cell, few iterations: these tests check the exported variants, not timings
RUN = ["--calibration-size", "4", "--eval-size", "4", "--max-new-tokens", "4", "--method",
       "sparsegpt", "--pattern", "2:4", "--batch-sizes", "1", "--iterations", "2"]


@pytest.mark.parametrize("flags,p", [(["--quantize", "int8", "--quantize-method", "dynamic"],
                                      "int8"), (["--fp16"], "fp16")])
def test_prune_export_writes_validated_variants_and_their_accuracy(run_inputs, tmp_path, flags, p):
    model, caps = run_inputs
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", str(model), "--calibration",
                                   str(caps), "--out", str(out), *RUN, *flags])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    ex = rep["export"]["generative"]
    assert set(ex) == {"dense", "pruned", f"dense_{p}", f"pruned_{p}"}
    for v in (f"dense_{p}", f"pruned_{p}"):
        assert (out / v / "generation.json").is_file()
        assert all((out / f).is_file() for f in ex[v]["paths"].values())
        assert ex[v]["validation"]["precision"] == p
    q = rep["quantize"]
    assert q["quantize"] == p and q["method"] == ("dynamic" if p == "int8" else "cast")
    acc = q["accuracy"]["variants"]
    assert set(acc) == {"dense", "pruned", f"dense_{p}", f"pruned_{p}"}
    assert set(acc[f"pruned_{p}"]["metrics"]) == {"cider", "attribute_accuracy"}
    assert 0 <= acc[f"pruned_{p}"]["fidelity"]["greedy_agreement"] <= 1
    assert acc["dense"]["fidelity"]["token_kl"] == 0.0
    assert "Accuracy of the exported files" in (out / "report.md").read_text()


@pytest.mark.parametrize("flags,message", [
    (["--quantize", "int8"], "--quantize-method static is not built for a generative decoder"),
    (["--quantize", "fp16"], "allowed: --fp16"),
    (["--quantize", "int8", "--quantize-method", "dynamic", "--fp16"], "drop --fp16"),
])
def test_bad_precision_input_is_one_line(run_inputs, tmp_path, flags, message):
    model, caps = run_inputs
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", str(model), "--calibration",
                                   str(caps), "--out", str(out), *flags])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output and not out.exists()


def test_fp16_cache_on_a_graph_that_reads_it_in_fp32_is_refused():
    """A past read by an fp32 node cannot become fp16 in place: one ExportError, not a file
    ONNX Runtime would refuse later."""
    from onnx import helper

    from vlcompress.exporters.generative_quant import kv_cache_fp16

    f32 = TensorProto.FLOAT
    g = helper.make_graph([helper.make_node("Add", ["past.0.key", "x"], ["y"]),
                           helper.make_node("Identity", ["y"], ["present.0.key"])], "g",
                          [helper.make_tensor_value_info("past.0.key", f32, [1]),
                           helper.make_tensor_value_info("x", f32, [1])],
                          [helper.make_tensor_value_info("present.0.key", f32, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ExportError, match="does not type-check"):
        kv_cache_fp16(m)


@pytest.mark.parametrize("vqa", [False, True])
def test_blip_fp16_variant_keeps_both_caches_in_fp16_and_validates(tmp_path, vqa):
    """A BLIP export's fp16 twin: every graph fp16, the self-attention cache and the cross
    keys / values carried in fp16 (cross_kv.onnx writes them, decoder.onnx reads them), within
    its tolerance of the fp32 PyTorch model, greedy tokens reported."""
    from blip_caption_factory import make_tiny_blip_caption_folder

    from vlcompress.exporters.generative_blip import export_blip
    from vlcompress.runtime.ort_generate_blip import open_generator

    vlm = load_model(str(make_tiny_blip_caption_folder(tmp_path, vqa=vqa)))
    images = _images(4)
    qs = ["what color is it ?", "where is it", "size", "what shape ?"] if vqa else None
    export_blip(vlm, tmp_path / "e", images=images, questions=qs, max_new_tokens=5)
    info = make_fp16_variant(tmp_path / "e", tmp_path / "e16")
    assert set(info["files"]) == ({"vision", "question", "cross_kv", "decoder"} if vqa
                                  else {"vision", "cross_kv", "decoder"})
    f16 = TensorProto.FLOAT16
    dec = onnx.load(str(tmp_path / "e16" / "decoder.onnx")).graph
    kv = {i.name: i.type.tensor_type.elem_type for i in dec.input
          if i.name.startswith(("past.", "cross."))}
    assert kv and set(kv.values()) == {f16}
    cross = onnx.load(str(tmp_path / "e16" / "cross_kv.onnx")).graph
    assert {o.type.tensor_type.elem_type for o in cross.output} == {f16}
    assert {o.type.tensor_type.elem_type for o in dec.output if o.name == "logits"} == {
        TensorProto.FLOAT}
    v = validate_variant(vlm, tmp_path / "e16", images=images, questions=qs, max_new_tokens=5)
    assert v["precision"] == "fp16" and v["logits"]["decoder decode logits"]["top1"] >= 0.95
    assert {"cross kv", "decoder prefill logits"} <= set(v["logits"])
    gen = open_generator(tmp_path / "e16")
    assert gen.kv_dtype == np.float16
    # a BLIP int8 twin quantizes every graph's weight MatMuls (all of its graphs are MatMul work)
    info = make_int8_variant(tmp_path / "e", tmp_path / "e8")
    assert all(info["files"][p]["quantized_layers"] for p in info["files"])
    with pytest.raises(ConfigError, match="not a part of a generative export"):
        make_int8_variant(tmp_path / "e", tmp_path / "bad", parts=("embed",))


def test_prune_export_of_blip_caption_writes_an_int8_variant_timed_beside_fp32(tmp_path):
    """prune-export --quantize int8 of a BLIP captioner: dense_int8/ and pruned_int8/
    validated, their accuracy measured from the files, and their decode / prefill timed in
    the same interleaving (the rows' variants)."""
    from blip_caption_factory import make_tiny_blip_caption_folder

    model = make_tiny_blip_caption_folder(tmp_path, context=64)  # room to time 32 tokens
    pairs = load_eval("shapes", n=4, batch_size=4)
    caps = save_pairs(pairs, tmp_path / "caps", captions=pairs.retrieval_captions)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", str(model), "--calibration",
                                   str(caps), "--out", str(out), *RUN, "--quantize", "int8",
                                   "--quantize-method", "dynamic", "--batch-sizes", "1",
                                   "--iterations", "3"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    ex = rep["export"]["generative"]
    assert set(ex) == {"dense", "pruned", "dense_int8", "pruned_int8"}
    assert ex["pruned_int8"]["validation"]["precision"] == "int8"
    assert set(ex["pruned_int8"]["paths"]) == {"vision", "cross_kv", "decoder"}
    acc = rep["quantize"]["accuracy"]["variants"]
    assert set(acc["pruned_int8"]["metrics"]) == {"cider", "attribute_accuracy"}
    assert 0 <= acc["pruned_int8"]["fidelity_to_float_twin"]["greedy_agreement"] <= 1
    decode = next(r for r in rep["latency"]
                  if r["tower"] == "decode" and r["runtime"] == "onnxruntime")
    assert set(decode["variants"]) == {"dense", "pruned", "dense_int8", "pruned_int8"}
    assert decode["variants"]["pruned_int8"]["speedup"] > 0
