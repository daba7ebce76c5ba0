"""Generative export (vision/embed/decoder ONNX) against PyTorch, greedy generation on ONNX
Runtime against PyTorch's ``generate``, the ``generate`` command and its bad-input lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from llava_factory import make_tiny_llava_folder, prune_export_tiny_llava
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.data import load_eval
from vlcompress.errors import ExportError
from vlcompress.exporters.generative import DecoderGraph, export_generative, validate_generative
from vlcompress.models import load_model
from vlcompress.runtime.ort_generate import OrtGenerator

QUESTIONS = [None, "what color is it ?", "where is it ?", None, "how big is it ?"]


def _images(n, skip=0):
    return list(load_eval("shapes", n=n + skip, batch_size=n + skip).images)[skip:]


@pytest.mark.parametrize("vision,text", [("clip", "llama"), ("siglip", "qwen2")])
def test_random_llava_export_matches_torch_logits_and_greedy_tokens(tmp_path, vision, text):
    vlm = load_model(str(make_tiny_llava_folder(tmp_path, seed=1, vision=vision, text=text)))
    res = export_generative(vlm, tmp_path / "onnx", images=_images(5), questions=QUESTIONS,
                            max_new_tokens=8)
    v = res.validation
    assert v["token_exact"] == 1.0 and v["prompts"] == 5
    assert max(v["max_abs_diff"].values()) < 1e-4 and v["max_abs_diff"]["decoder decode logits"] > 0
    # the tokens compared are real generations, not empty ones
    gen = OrtGenerator(tmp_path / "onnx")
    from vlcompress.runtime.ort_generate import prompt_inputs

    enc = prompt_inputs(vlm.processor, [vlm.prompt(q) for q in QUESTIONS], _images(5))
    toks = gen.generate(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], 8)
    assert sum(map(len, toks)) >= 10
    assert enc["attention_mask"].min() == 0  # the batch was left-padded
    assert toks == vlm.generate(_images(5), QUESTIONS, max_new_tokens=8)


def test_decoder_graph_is_the_model_with_a_cache(tmp_path):
    """The wrapper's prefill logits equal the HF model's own forward (no padding)."""
    vlm = load_model(str(make_tiny_llava_folder(tmp_path, seed=2)))
    m = vlm.model
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    emb = m.model.language_model.embed_tokens(ids)
    n = m.config.text_config.num_hidden_layers
    past = [torch.zeros(1, 2, 0, 8) for _ in range(2 * n)]
    with torch.no_grad():
        ours = DecoderGraph(m)(emb, torch.ones(1, 5, dtype=torch.long),
                               torch.arange(5)[None], *past)
        ref = m.model.language_model(inputs_embeds=emb)
        ref = m.lm_head(ref.last_hidden_state)
        every = DecoderGraph(m)(emb, torch.ones(1, 5, dtype=torch.long),
                                torch.arange(5)[None], *past, logits_to_keep=0)
        two = DecoderGraph(m)(emb, torch.ones(1, 5, dtype=torch.long),
                              torch.arange(5)[None], *past, logits_to_keep=torch.tensor(2))
    assert ours[0].shape == (1, 1, ref.shape[-1])  # the last position's logits by default
    assert torch.allclose(ours[0], ref[:, -1:], atol=1e-5)
    assert torch.allclose(every[0], ref, atol=1e-5)
    assert torch.allclose(two[0], ref[:, -2:], atol=1e-5)
    assert ours[1].shape == (1, 2, 5, 8)  # GQA: num_key_value_heads in the cache


def _without_logits_to_keep(src, dst):
    """The export as written before ``logits_to_keep``: its value baked in as 0 (every
    position's logits) and no such input."""
    import shutil

    import onnx

    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / "decoder.onnx"))
    (init,) = [t for t in proto.graph.initializer if t.name == "logits_to_keep"]
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(0, np.int64), "logits_to_keep"))
    (inp,) = [i for i in proto.graph.input if i.name == "logits_to_keep"]
    proto.graph.input.remove(inp)
    onnx.save(proto, str(dst / "decoder.onnx"))


def test_decoder_onnx_keeps_the_last_position_and_old_exports_still_generate(tmp_path):
    """decoder.onnx returns the last position's logits unless fed logits_to_keep (one graph
    for prefill and decode); validation checks both against the language model's own
    forward; an export whose decoder returns every position (the former format) generates
    the same tokens, and the teacher-forced ONNX logits are the same from both."""
    from vlcompress.eval.generative_ort import ort_logits
    from vlcompress.runtime.ort_generate import prompt_inputs

    vlm = load_model(str(make_tiny_llava_folder(tmp_path, seed=5, vision="siglip", text="qwen2")))
    res = export_generative(vlm, tmp_path / "last", images=_images(3), questions=QUESTIONS[:3],
                            max_new_tokens=6)
    diffs = res.validation["max_abs_diff"]
    assert diffs["decoder prefill logits vs language model"] < 1e-4
    assert diffs["decoder prefill logits, every position"] < 1e-4
    _without_logits_to_keep(tmp_path / "last", tmp_path / "every")
    enc = prompt_inputs(vlm.processor, [vlm.prompt(q) for q in QUESTIONS[:3]], _images(3))
    last, every = OrtGenerator(tmp_path / "last"), OrtGenerator(tmp_path / "every")
    assert last.keeps_logits and not every.keeps_logits
    assert [i.name for i in last.sessions["decoder"].get_inputs()] == \
        [i.name for i in every.sessions["decoder"].get_inputs()]  # optional: not listed
    p = enc["input_ids"].shape[1]
    args = (enc["input_ids"], enc["attention_mask"], enc["pixel_values"], 4)
    st_last, st_every = last.prefill(*args), every.prefill(*args)
    assert abs(st_last.logits - st_every.logits).max() < 1e-4
    emb, pos = last.prompt(enc["input_ids"], enc["attention_mask"], enc["pixel_values"])
    one, _ = last.decode_step(emb, enc["attention_mask"], pos, last.empty_past(3))
    assert one.shape[:2] == (3, 1)
    # the fidelity's call: every position, from either format
    full = [ort_logits(g, enc["input_ids"], enc["attention_mask"], enc["pixel_values"])
            for g in (last, every)]
    assert full[0].shape[:2] == (3, p) and abs(full[0] - full[1]).max() < 1e-4
    assert abs(full[0][:, -1] - st_last.logits).max() < 1e-4
    toks = [g.generate(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], 6)
            for g in (last, every)]
    assert toks[0] == toks[1] == vlm.generate(_images(3), QUESTIONS[:3], max_new_tokens=6)


def test_validation_names_every_mismatch_in_one_error(tmp_path):
    vlm = load_model(str(make_tiny_llava_folder(tmp_path, seed=3)))
    export_generative(vlm, tmp_path / "onnx", images=_images(2), validate=False)
    with torch.no_grad():  # the PyTorch twin drifts away from the exported graphs
        vlm.model.lm_head.weight.mul_(-1.0)
        vlm.model.model.multi_modal_projector.linear_2.bias.add_(1.0)
    with pytest.raises(ExportError) as err:
        validate_generative(vlm, tmp_path / "onnx", images=_images(3), max_new_tokens=4)
    msg = str(err.value)
    for part in ("vision max abs diff", "decoder prefill logits", "decoder decode logits",
                 "greedy generation differs from PyTorch on 3 of 3 prompts"):
        assert part in msg, msg


def test_sliding_window_decoder_is_refused_by_name(tmp_path):
    from vlcompress.errors import ModelError
    from vlcompress.exporters.generative import check_exportable

    vlm = load_model(str(make_tiny_llava_folder(tmp_path, text="qwen2")))
    check_exportable(vlm)
    vlm.model.config.text_config.use_sliding_window = True
    vlm.model.config.text_config.sliding_window = 4
    with pytest.raises(ModelError, match="uses sliding-window attention"):
        check_exportable(vlm)


def test_pruned_export_equals_its_torch_twin(tmp_path):
    from vlcompress.prune import prune

    vlm = load_model(str(make_tiny_llava_folder(tmp_path, seed=4)))
    prune(vlm, "magnitude", 0.5, "2:4")
    res = export_generative(vlm, tmp_path / "onnx", images=_images(4), questions=QUESTIONS[:4],
                            max_new_tokens=6)
    assert res.validation["token_exact"] == 1.0
    from vlcompress.exporters.onnx import onnx_sparsity

    sp = onnx_sparsity(tmp_path / "onnx" / "decoder.onnx")
    assert sp["model.language_model.layers.0.mlp.down_proj.weight"] == 0.5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """prune-export of the shipped tiny-llava (sparsegpt 2:4): dense/ and pruned/ exports."""
    return prune_export_tiny_llava(tmp_path_factory.mktemp("genrun") / "run", "sparsegpt", "2:4",
                                   "--calibration-size", "8", "--eval-size", "4",
                                   "--max-new-tokens", "12", "--batch-sizes", "1",
                                   "--iterations", "3")


def test_prune_export_writes_validated_generative_exports(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    gen = rep["export"]["generative"]
    for v in ("dense", "pruned"):
        assert gen[v]["validation"]["token_exact"] == 1.0 and gen[v]["validation"]["prompts"] >= 4
        for part in ("vision", "embed", "decoder"):
            assert gen[v]["paths"][part] == f"{v}/{part}.onnx"
            assert (run_dir / v / f"{part}.onnx").is_file()


def test_generate_cli_answers_from_the_exports(run_dir, tmp_path):
    image = _images(1, skip=30)[0]
    img = tmp_path / "x.png"
    image.save(img)
    vlm = load_model(str(run_dir / "pruned" / "model"))
    want = vlm.decode(vlm.generate([image], ["describe the picture."],
                                   max_new_tokens=12))[0]
    res = CliRunner().invoke(app, ["generate", str(run_dir), "--image", str(img), "--prompt",
                                   "describe the picture.", "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == want and len(want.split()) >= 3
    dense = CliRunner().invoke(app, ["generate", str(run_dir), "--image", str(img), "--prompt",
                                     "what color is it ?", "--dense"])
    assert dense.exit_code == 0 and dense.stdout.strip(), dense.output


@pytest.mark.parametrize("case,message", [
    ("retrieval", "generate needs a generative run"),
    ("image", "cannot be read"),
    ("max_new", "--max-new-tokens 500 is above the context of tiny-llava (128 tokens)"),
    ("prompt", "exceeds the context of tiny-llava (128 tokens)"),
])
def test_generate_bad_input_is_one_line(run_dir, tmp_path, case, message):
    img = tmp_path / "x.png"
    _images(1)[0].save(img)
    target, args = run_dir, ["--image", str(img), "--prompt", "what color is it ?"]
    if case == "retrieval":
        target = tmp_path / "clip-run"
        target.mkdir()
        (target / "report.json").write_text(json.dumps({"model": {"name": "tiny-clip",
                                                                  "family": "clip"}}))
    elif case == "image":
        (tmp_path / "bad.png").write_bytes(b"not an image")
        args[1] = str(tmp_path / "bad.png")
    elif case == "max_new":
        args += ["--max-new-tokens", "500"]
    else:
        args[3] = "red " * 200
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(app, ["generate", str(target), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_generator_refuses_a_folder_without_an_export(tmp_path):
    from vlcompress.errors import ConfigError

    with pytest.raises(ConfigError, match="holds no generative ONNX export"):
        OrtGenerator(tmp_path)
