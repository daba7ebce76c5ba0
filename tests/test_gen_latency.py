"""Generation on ONNX Runtime with the KV cache in pre-allocated IOBinding buffers, seeded
sampling, PyTorch eager steps, the generative latency rows (vision / prefill / decode), the
report, bench and the gate carrying them."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
from llava_factory import make_tiny_llava_folder, prune_export_tiny_llava
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.data import generative_eval_data, load_eval
from vlcompress.errors import ConfigError
from vlcompress.exporters.generative import export_generative
from vlcompress.models import load_model
from vlcompress.runtime.gen_latency import (
    DECODE_TOKENS,
    check_timing_context,
    latency_inputs,
    time_generation,
    variant_folders,
)
from vlcompress.runtime.ort_generate import OrtGenerator, Sampling, prompt_inputs
from vlcompress.runtime.registry import LatencyConfig
from vlcompress.runtime.torch_generate import TorchGenerator

QUESTIONS = [None, "what color is it ?", "where is it ?", None, "how big is it ?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny LLaVA (SigLIP + Qwen2, GQA) exported dense and pruned (unvalidated: the
    export's own tests validate it), with left-padded inputs of five prompts."""
    root = tmp_path_factory.mktemp("genlat")
    vlm = load_model(str(make_tiny_llava_folder(root, seed=1, vision="siglip", text="qwen2")))
    export_generative(vlm, root / "dense", images=[], validate=False)
    pruned = copy.deepcopy(vlm)
    for layer in pruned.model.model.language_model.layers:  # a different, lighter decoder
        layer.mlp.down_proj.weight.data[:, ::2] = 0
    export_generative(pruned, root / "pruned", images=[], validate=False)
    images = list(load_eval("shapes", n=5, batch_size=5).images)
    enc = prompt_inputs(vlm.processor, [vlm.prompt(q) for q in QUESTIONS], images)
    assert enc["attention_mask"].min() == 0  # left-padded
    return {"root": root, "vlm": vlm, "pruned": pruned, "images": images, "enc": enc}


def _gen(enc, g, n, **kw):
    return g.generate(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], n, **kw)


def test_buffered_greedy_equals_torch_generate(tiny):
    vlm, enc = tiny["vlm"], tiny["enc"]
    ref = vlm.generate(tiny["images"], QUESTIONS, max_new_tokens=10)
    assert sum(map(len, ref)) >= 10
    assert _gen(enc, OrtGenerator(tiny["root"] / "dense"), 10) == ref
    assert _gen(enc, TorchGenerator(vlm), 10) == ref  # the eager steps are generate's


def test_steps_write_the_cache_into_the_preallocated_buffers(tiny):
    """IOBinding: the presents land in the state's own buffers (same memory every step, no new
    cache arrays), and each step's logits equal the plain-numpy decoder call's."""
    g, enc = OrtGenerator(tiny["root"] / "dense"), tiny["enc"]
    st = g.prefill(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], 4)
    buf, p = st.cache.ctypes.data, enc["input_ids"].shape[1]
    embeds = g.prompt_embeds(enc["input_ids"], enc["pixel_values"])
    mask = enc["attention_mask"]
    pos = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0)
    logits, past = g.decode_step(embeds, mask, pos, g.empty_past(5))
    np.testing.assert_allclose(st.logits, logits[:, -1], atol=1e-5)
    b, h, d = st.kv_shape
    k0 = st.cache[st.side, 0, : b * h * p * d].reshape(b, h, p, d)
    np.testing.assert_array_equal(k0, past["past.0.key"])
    for _ in range(3):
        tok = st.logits.argmax(-1)
        got = g.step(st, tok).copy()
        emb = g.sessions["embed"].run(None, {"input_ids": tok[:, None]})[0]
        mask = np.concatenate([mask, np.ones((5, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        logits, past = g.decode_step(emb, mask, pos, past)
        np.testing.assert_allclose(got, logits[:, -1], atol=1e-5)
        assert st.cache.ctypes.data == buf
    assert st.length == p + 3
    g.step(st, st.logits.argmax(-1))  # room for prompt + 4 tokens, then none
    with pytest.raises(ConfigError, match="no room"):
        g.step(st, st.logits.argmax(-1))


def test_prefill_from_image_embeddings_skips_the_vision_graph(tiny):
    """Given image embeddings, both prefills skip vision (ONNX Runtime never loads the graph)
    and give the logits of the pixel path."""
    enc, vlm = tiny["enc"], tiny["vlm"]
    g, t = OrtGenerator(tiny["root"] / "dense"), TorchGenerator(vlm)
    emb = t.image_embeds(enc["pixel_values"])
    st = g.prefill(enc["input_ids"], enc["attention_mask"], None, 2, image_embeds=emb)
    assert "vision" not in g.sessions
    ref = g.prefill(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], 2)
    np.testing.assert_allclose(st.logits, ref.logits, atol=1e-5)
    got = t.prefill(enc["input_ids"], enc["attention_mask"], None, 2, image_embeds=emb).logits
    np.testing.assert_allclose(got, t.prefill(enc["input_ids"], enc["attention_mask"],
                                              enc["pixel_values"], 2).logits, atol=1e-5)
    np.testing.assert_allclose(got, ref.logits, atol=1e-4)


def test_sampling_is_seeded_and_bounded(tiny):
    g, enc = OrtGenerator(tiny["root"] / "dense"), tiny["enc"]
    greedy = _gen(enc, g, 8)
    a = _gen(enc, g, 8, sampling=Sampling(temperature=2.0, seed=3))
    assert a == _gen(enc, g, 8, sampling=Sampling(temperature=2.0, seed=3))
    assert a != greedy and a != _gen(enc, g, 8, sampling=Sampling(temperature=2.0, seed=4))
    assert _gen(enc, g, 8, sampling=Sampling(top_k=1, seed=5)) == greedy
    assert _gen(enc, g, 8, sampling=Sampling(top_p=1e-6, seed=5)) == greedy
    # top-k 2: every drawn token is one of the two most likely
    logits = np.array([[0.0, 5.0, 4.0, -1.0]] * 200)
    drawn = Sampling(top_k=2, temperature=5.0).choose(logits, np.random.default_rng(0))
    assert set(drawn.tolist()) == {1, 2}
    drawn = Sampling(top_p=0.6).choose(np.log(np.array([[0.5, 0.3, 0.2]] * 200)),
                                       np.random.default_rng(0))
    assert set(drawn.tolist()) == {0, 1}  # 0.5 < 0.6: the second token is needed, not the third
    for bad, msg in ((dict(temperature=0), "--temperature"), (dict(top_k=-1), "--top-k"),
                     (dict(top_p=0), "--top-p")):
        with pytest.raises(ConfigError, match=msg):
            Sampling(**bad)


def test_timing_refuses_a_prompt_that_leaves_no_room(tiny):
    inputs = {1: {"input_ids": np.zeros((1, 100), np.int64)}}
    assert check_timing_context(inputs, 133) == 100
    with pytest.raises(ConfigError, match="above the context of m .128 tokens.; allowed: timed "
                                          "\\+ warm-up tokens <= 27"):
        check_timing_context(inputs, 128, model="m")
    with pytest.raises(ConfigError, match="with 1 warm-up"):
        check_timing_context(inputs, 133, warmup=1)
    with pytest.raises(ConfigError, match=f">= {DECODE_TOKENS}"):
        check_timing_context(inputs, 1000, new_tokens=8)


def test_generation_rows_interleave_every_variant(tiny, tmp_path):
    root = tmp_path / "run"
    for v in ("dense", "pruned"):
        shutil.copytree(tiny["root"] / v, root / v)
    shutil.copytree(tiny["root"] / "pruned", root / "pruned_copy")  # a third variant
    (root / "other").mkdir()  # no generation.json: not a variant
    folders = variant_folders(root)
    assert list(folders) == ["dense", "pruned", "pruned_copy"]
    vlm = tiny["vlm"]
    inputs = latency_inputs(vlm, generative_eval_data("shapes", n=2), (1, 2))
    gens = {("onnxruntime", k): OrtGenerator(f, 1) for k, f in folders.items()}
    gens[("torch", "dense")] = TorchGenerator(vlm)
    gens[("torch", "pruned")] = TorchGenerator(tiny["pruned"])
    rows = time_generation(gens, inputs, LatencyConfig(batch_sizes=(1, 2), warmup=1,
                                                       iterations=3), threads=1)
    cells = [(r["runtime"], r["tower"], r["batch"]) for r in rows]
    assert cells == [(rt, part, b) for b in (1, 2) for part in ("vision", "prefill", "decode")
                     for rt in ("onnxruntime", "torch")]
    for r in rows:
        n = DECODE_TOKENS if r["tower"] == "decode" else 3
        assert len(r["dense_samples_ms"]) == len(r["pruned_samples_ms"]) == n
        assert r["speedup"] == pytest.approx(r["dense_ms"]["p50"] / r["pruned_ms"]["p50"])
        assert r["prompt_tokens"] == inputs[1]["input_ids"].shape[1] and r["host_bound"] is None
        if r["tower"] == "decode":
            assert r["unit"] == "ms/token" and r["new_tokens"] == DECODE_TOKENS
            assert r["tokens_per_s"]["dense"] == pytest.approx(
                r["batch"] * 1000 / r["dense_ms"]["p50"])
        assert ("variants" in r) == (r["runtime"] == "onnxruntime")
    with pytest.raises(ConfigError, match="needs a pruned variant"):
        time_generation({("torch", "dense"): gens[("torch", "dense")]}, inputs,
                        LatencyConfig(batch_sizes=(1,)))


# -- prune-export, bench and the gate ---------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return prune_export_tiny_llava(tmp_path_factory.mktemp("genlatrun") / "run", "magnitude",
                                   "2:4", "--calibration-size", "4", "--eval-size", "2",
                                   "--max-new-tokens", "4", "--batch-sizes", "1",
                                   "--iterations", "3")


def test_prune_export_reports_prefill_and_decode(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    cells = {(r["runtime"], r["tower"], r["batch"]) for r in rep["latency"]}
    assert cells == {(rt, p, 1) for rt in ("onnxruntime", "torch")
                     for p in ("vision", "prefill", "decode")}
    assert all(r["speedup"] > 0 for r in rep["latency"])
    assert not any("not built" in n for n in rep["data"]["notes"])
    md = (run_dir / "report.md").read_text()
    assert "| decode (ms/token) | 1 |" in md and "| prefill | 1 |" in md


def test_bench_retimes_and_the_gate_fails_on_decode_alone(run_dir, tmp_path):
    res = CliRunner().invoke(app, ["bench", str(run_dir), "--no-accuracy", "--baseline",
                                   str(run_dir / "report.json"), "--iterations", "3",
                                   "--warmup", "1", "--threads", "1", "--report",
                                   str(tmp_path / "b.json"), "--max-latency-regression", "10"])
    assert res.exit_code == 0, res.output
    cur = json.loads((tmp_path / "b.json").read_text())
    names = {c["name"] for c in cur["gate"]["checks"]}
    assert "latency onnxruntime/cpu decode@1 relative" in names
    assert "latency torch/cpu prefill@1 relative" in names
    # the same report against itself with only decode's pruned samples 3x slower: one failure
    from vlcompress.gate import GateConfig, compare_reports

    slow = copy.deepcopy(cur)
    for r in slow["latency"]:
        if r["tower"] == "decode" and r["runtime"] == "onnxruntime":
            r["pruned_samples_ms"] = [3 * x for x in r["pruned_samples_ms"]]
    g = compare_reports(slow, cur, GateConfig(max_latency_regression=0.5), accuracy=False)
    assert g.exit_code == 1
    assert [c.name for c in g.failures] == ["latency onnxruntime/cpu decode@1 relative"]
    assert compare_reports(cur, cur, GateConfig(), accuracy=False).exit_code == 0


def test_bench_refuses_what_a_generative_run_cannot_time(run_dir, tmp_path):
    res = CliRunner().invoke(app, ["bench", str(run_dir), "--no-accuracy", "--runtime",
                                   "torch", "--report", str(tmp_path / "b.json")])
    assert res.exit_code == 2 and "does not apply to a generative run" in res.output
    assert not (tmp_path / "b.json").exists()


def test_generate_samples_with_a_seed(run_dir, tmp_path):
    img = tmp_path / "x.png"
    load_eval("shapes", n=1, batch_size=1).images[0].save(img)
    args = ["generate", str(run_dir), "--image", str(img), "--prompt", "what color is it ?"]
    a = CliRunner().invoke(app, [*args, "--sample", "--seed", "1", "--temperature", "3"])
    b = CliRunner().invoke(app, [*args, "--sample", "--seed", "1", "--temperature", "3"])
    assert a.exit_code == 0 and a.stdout == b.stdout and a.stdout.strip(), a.output
    bad = CliRunner().invoke(app, [*args, "--seed", "1"])
    assert bad.exit_code == 2 and "--seed 1 applies to sampling; add --sample" in bad.output
