"""The blip2 family (BLIP-2 with an OPT decoder): loading a hub-layout folder, its parts and
sequences, every method on every part, ECoFLaP's allocation across vision and language,
structured slicing of the OPT decoder and the ViT, and the three-graph ONNX export, on tiny
random BLIP-2 models built offline."""

from __future__ import annotations

import json

import pytest
import torch
from blip2_factory import make_tiny_blip2_folder
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.data import load_calibration, load_eval
from vlcompress.errors import ModelError
from vlcompress.models import load_model, peek_model

QUESTIONS = [None, "what color is it ?", "where is it ?", None, "how big is it ?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_blip2_folder(tmp_path_factory.mktemp("blip2"), seed=1)


@pytest.fixture(scope="module")
def calib():
    return load_calibration("shapes", n=4, batch_size=2)


def _images(n):
    return list(load_eval("shapes", n=n, batch_size=n).images)


def test_parts_layers_and_sequences(tmp_path, calib):
    vlm = load_model(str(make_tiny_blip2_folder(tmp_path, cross_every=2)))
    assert vlm.family == "blip2" and vlm.towers == ("vision", "bridge", "language")
    by = {m: [ly for ly in vlm.prunable_layers() if ly.modality == m] for m in vlm.towers}
    assert len(by["vision"]) == 3 * 4 and len(by["language"]) == 2 * 6
    # Q-Former layer 0 cross-attends (4 more linears), layer 1 does not; the projection is
    # a block of its own; the text-branch MLP (never run in captioning) is not listed
    assert len(by["bridge"]) == 10 + 6 + 1
    assert by["bridge"][-1].name == "language_projection" and by["bridge"][-1].block == 2
    assert not any(".intermediate.dense" in ly.name for ly in by["bridge"])
    batch = next(iter(calib.batches()))
    enc = vlm.encode(batch)
    tok = vlm.tokenizer
    assert int((enc["input_ids"][0] == tok.convert_tokens_to_ids("<image>")).sum()) == 6
    assert int(enc["input_ids"][0][6]) == tok.bos_token_id  # image tokens, then BOS
    nxt = enc["input_ids"][0][1:][enc["target_mask"][0][:-1]]
    assert tok.decode(nxt, skip_special_tokens=True).split() == batch.captions[0].split()
    assert int(nxt[-1]) == vlm.eos_token_id
    assert vlm.prompt("what color is it ?") == "Question: what color is it ? Answer:"
    assert float(vlm.loss(enc).detach()) > 0


def test_generation_depends_on_the_image_and_the_prompt(folder):
    """The tiny model is a real test of the export: its greedy tokens vary along a sequence,
    with the image and with the question."""
    vlm = load_model(str(folder))
    toks = vlm.generate(_images(5), QUESTIONS, max_new_tokens=8)
    assert len({tuple(t) for t in toks}) >= 4 and max(len(set(t)) for t in toks) >= 3


def test_refusals_are_one_line(folder, tmp_path):
    cfg = json.loads((folder / "config.json").read_text())
    for key, value, msg in (("text_config", {"model_type": "t5"}, "language model is 't5'; "
                                                                  "allowed: opt"),
                            ("image_token_index", None, "no image_token_index")):
        bad = tmp_path / f"bad_{key}"
        bad.mkdir()
        for f in folder.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        c = dict(cfg)
        c[key] = value
        (bad / "config.json").write_text(json.dumps(c))
        with pytest.raises(ModelError, match=msg):
            peek_model(str(bad))
    other = tmp_path / "other_q"
    other.mkdir()
    for f in folder.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    pc = json.loads((folder / "processor_config.json").read_text())
    pc["num_query_tokens"] = 5
    (other / "processor_config.json").write_text(json.dumps(pc))
    with pytest.raises(ModelError, match="processor adds 5 image tokens, the model has 6"):
        load_model(str(other))


@pytest.mark.parametrize("parts", [("vision", "bridge", "language"), ("bridge", "language")])
def test_blockwise_captures_qformer_and_decoder_inputs(folder, calib, parts):
    """The engine walks the projection, the ViT, the Q-Former (cross-attending to the ViT's
    output) and the decoder (image tokens scattered from the Q-Former): with nothing pruned,
    every layer's input statistics equal a whole-model pass's. Both the Q-Former and the
    decoder read another tower; the decoder must still wait for the Q-Former."""
    from vlcompress.blockwise import run_blockwise
    from vlcompress.calibrate import collect_stats

    vlm = load_model(str(folder))
    layers = [ly for ly in vlm.prunable_layers() if ly.modality in parts]
    ref = collect_stats(vlm, calib, layers)
    got = {}
    run = run_blockwise(vlm, calib, layers, lambda b, st: got.update(st))
    assert set(got) == set(ref) and run.order[0] == "language_projection"
    for name, s in ref.items():
        assert got[name].tokens == s.tokens, name
        torch.testing.assert_close(got[name].sq_sum, s.sq_sum, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "multiflow", "ecoflap"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_method_prunes_vision_and_language(folder, calib, method, pattern):
    from vlcompress.prune import prune

    vlm = load_model(str(folder))
    q = vlm.model.get_submodule("qformer.encoder.layer.0.attention.attention.query").weight.clone()
    res = prune(vlm, method, pattern=pattern, calibration=calib, scope=("vision", "language"),
                method_options={"zo_pairs": 4} if method == "ecoflap" else None)
    assert set(res.per_modality) == {"vision", "language"} and abs(res.achieved - 0.5) < 0.01
    for ly in vlm.prunable_layers():
        assert bool((ly.weight == 0).any()) == (ly.modality != "bridge"), ly.name
    assert torch.equal(q, vlm.model.get_submodule(
        "qformer.encoder.layer.0.attention.attention.query").weight)  # the bridge stays
    if pattern == "2:4":
        w = vlm.model.get_submodule("language_model.model.decoder.layers.1.fc2").weight
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2


def test_ecoflap_allocates_one_budget_across_vision_and_language(folder, calib):
    """As in ECoFLaP's BLIP-2 code: the blocks of the ViT and of the language model share one
    budget (zeroth-order block scores, each block capped at sparsity + 0.1)."""
    from vlcompress.prune import prune

    vlm = load_model(str(folder))
    res = prune(vlm, "ecoflap", 0.5, calibration=calib, scope=("vision", "language"),
                method_options={"zo_pairs": 4})
    blocks = res.to_dict()["details"]["blocks"]
    assert set(blocks) == {"vision.0", "vision.1", "vision.2", "language.0", "language.1"}
    sp = [b["sparsity"] for b in blocks.values()]
    assert max(sp) <= 0.6 + 1e-9 and max(sp) - min(sp) > 0.01  # not uniform
    sizes = {}
    for ly in vlm.prunable_layers():
        sizes[f"{ly.modality}.{ly.block}"] = sizes.get(f"{ly.modality}.{ly.block}", 0) + ly.weight.numel()
    overall = sum(blocks[k]["sparsity"] * sizes[k] for k in blocks) / sum(sizes[k] for k in blocks)
    assert abs(overall - 0.5) < 1e-6 and abs(res.achieved - 0.5) < 0.01
    assert res.per_modality["vision"] != pytest.approx(res.per_modality["language"], abs=1e-3)


def test_structured_slices_opt_and_vit_reloads_and_exports(folder, calib, tmp_path):
    from vlcompress.exporters.generative import export_generative
    from vlcompress.prune import prune

    vlm = load_model(str(folder))
    prune(vlm, "wanda", 0.5, "structured", calibration=calib, scope=("vision", "language"))
    layer = vlm.model.get_submodule("language_model.model.decoder.layers.0")
    assert layer.self_attn.num_heads == 2 and layer.self_attn.k_proj.out_features == 16
    assert layer.fc1.out_features == 32 and layer.fc2.in_features == 32
    assert vlm.model.get_submodule("vision_model.encoder.layers.0.self_attn.qkv").out_features == 48
    enc = vlm.encode(next(iter(calib.batches())))
    vlm.save(tmp_path / "saved")
    again = load_model(str(tmp_path / "saved"))
    torch.testing.assert_close(again.logits(enc), vlm.logits(enc))
    res = export_generative(again, tmp_path / "onnx", images=_images(4), questions=QUESTIONS[:4],
                            max_new_tokens=6)
    assert res.validation["token_exact"] == 1.0
    spec = json.loads((tmp_path / "onnx" / "generation.json").read_text())
    assert spec["num_key_value_heads"] == 2  # OPT slices its key/value heads with the queries


def test_export_is_token_exact_dense_and_pruned(folder, calib, tmp_path):
    from vlcompress.exporters.generative import export_generative
    from vlcompress.exporters.generative_opt import OptDecoderGraph
    from vlcompress.prune import prune

    vlm = load_model(str(folder))
    m = vlm.model
    emb = m.language_model.get_input_embeddings()(torch.tensor([[2, 5, 6, 7, 8]]))
    with torch.no_grad():  # the wrapper is OPT's forward (learned positions at +2)
        args = (emb, torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None],
                *[torch.zeros(1, 4, 0, 8)] * 4)
        ref = m.language_model(inputs_embeds=emb).logits
        # the last position's logits by default, every position's at logits_to_keep=0
        torch.testing.assert_close(OptDecoderGraph(m)(*args)[0], ref[:, -1:])
        torch.testing.assert_close(OptDecoderGraph(m)(*args, logits_to_keep=0)[0], ref)
    for name in ("dense", "pruned"):
        if name == "pruned":
            prune(vlm, "sparsegpt", pattern="2:4", calibration=calib)
        res = export_generative(vlm, tmp_path / name, images=_images(5), questions=QUESTIONS,
                                max_new_tokens=8)
        v = res.validation
        assert v["token_exact"] == 1.0 and v["prompts"] == 5, name
        assert max(v["max_abs_diff"].values()) < 1e-4 and v["max_abs_diff"]["vision"] > 0


def test_prune_export_cli_and_generate(folder, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", str(folder), "--method",
                                   "sparsegpt", "--pattern", "2:4", "--out", str(out),
                                   "--calibration-size", "4", "--eval-size", "3",
                                   "--max-new-tokens", "6", "--batch-sizes", "1",
                                   "--iterations", "2"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["family"] == "blip2" and rep["prune"]["scope"] == ["vision", "language"]
    assert "bridge" in rep["prune"]["dense_parts"]
    assert any(n.startswith("bridge kept dense") for n in rep["data"]["notes"])
    assert rep["export"]["generative"]["pruned"]["validation"]["token_exact"] == 1.0
    assert "token_kl" in rep["accuracy"]["fidelity"]
    img = tmp_path / "x.png"
    _images(1)[0].save(img)
    vlm = load_model(str(out / "pruned" / "model"))
    want = vlm.decode(vlm.generate(_images(1), ["what color is it ?"], max_new_tokens=6))[0]
    gen = CliRunner().invoke(app, ["generate", str(out), "--image", str(img), "--prompt",
                                   "what color is it ?", "--max-new-tokens", "6"])
    assert gen.exit_code == 0, gen.output
    assert gen.stdout.strip() == want


def test_structured_bridge_refused_before_work(folder, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune-export", "--model", str(folder), "--method", "wanda",
                                   "--pattern", "structured", "--parts", "bridge", "--out",
                                   str(out)])
    assert res.exit_code == 2 and not out.exists()
    assert "cannot slice --parts bridge" in res.output and "allowed parts: vision, language" \
        in res.output and len(res.output.strip().splitlines()) == 1
