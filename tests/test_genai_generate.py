"""ONNX Runtime GenAI as a second generation runtime (issue 28 item 2): our exported graphs
run in GenAI's multimodal pipeline through one adapter graph, batched (left padding turned into
GenAI's right padding) token for token equal to OrtGenerator, its seeded sampler drawing from
the distribution ours draws from; `vlcompress generate --runtime genai` answers from it.
Skipped with the reason where the `[genai]` extra is not installed (its absence is one line,
also tested)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llava_factory import make_generative_run
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.errors import ConfigError, MissingDependencyError
from vlcompress.optional_deps import require_onnxruntime_genai
from vlcompress.runtime.gen_inputs import PromptEncoder, read_image
from vlcompress.runtime.ort_generate import OrtGenerator, Sampling
from vlcompress.serve import generate_examples

try:
    require_onnxruntime_genai()
    NO_GENAI = None
except MissingDependencyError as exc:
    NO_GENAI = str(exc)
needs_genai = pytest.mark.skipif(NO_GENAI is not None, reason=str(NO_GENAI))


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    # Qwen2 decoders (the llama one is served in test_serve_generate); seed 2's random Qwen2
    # answers the end token at once, seed 3's answers at length
    return make_generative_run(tmp_path_factory.mktemp("genai"), text="qwen2", seeds=(1, 3))


@needs_genai
def test_embed_merge_places_image_features_as_llava_does(gen_run, tmp_path):
    import onnxruntime as ort

    from vlcompress.runtime.genai_generate import build_embed_merge

    build_embed_merge(gen_run / "pruned", tmp_path / "m.onnx")
    spec = json.loads((gen_run / "pruned" / "generation.json").read_text())
    img = spec["image_token_id"]
    ids = np.array([[0, 2, img, img, 5], [2, img, img, 6, 7]], np.int64)
    feats = np.random.default_rng(0).standard_normal((2, 2, 32)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(
        None, {"input_ids": ids, "image_features": feats})[0]
    text = ort.InferenceSession(str(gen_run / "pruned" / "embed.onnx")).run(
        None, {"input_ids": np.where(ids == img, 0, ids)})[0]
    want = text.copy()
    want[ids == img] = feats.reshape(-1, 32)  # in order, row-major: masked_scatter
    np.testing.assert_array_equal(got, want)
    empty = ort.InferenceSession(str(tmp_path / "m.onnx")).run(  # a decode step: no features
        None, {"input_ids": ids[:, -1:], "image_features": np.zeros((0, 4, 32), np.float32)})[0]
    np.testing.assert_array_equal(empty, text[:, -1:])


@pytest.fixture(scope="module")
def feeds(gen_run):
    files, prompts = generate_examples(4, seed=2)
    e = PromptEncoder(gen_run / "pruned" / "model", "llava", 128).encode(
        [read_image(f) for f in files], prompts)  # left-padded: prompts of different lengths
    return e["input_ids"], e["attention_mask"], e["pixel_values"]


@needs_genai
@pytest.mark.parametrize("variant", ["dense", "pruned"])
def test_genai_batch_equals_ortgenerator_and_rows_alone(gen_run, feeds, variant):
    from vlcompress.runtime.genai_generate import GenaiGenerator

    assert len(set(feeds[1].sum(-1).tolist())) > 1  # the batch is padded
    want = OrtGenerator(gen_run / variant).generate(*feeds, 10)
    gen = GenaiGenerator(gen_run / variant, threads=1)
    try:
        got = gen.generate(*feeds, 10)
        alone = [gen.generate(*(x[r:r + 1] for x in feeds), 10)[0] for r in range(4)]
    finally:
        gen.close()
    assert got == want and alone == want and sum(len(r) for r in want) > 8


@needs_genai
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_genai_runs_the_precision_variants(gen_run, feeds, tmp_path, precision):
    from vlcompress.exporters.generative_quant import make_fp16_variant, make_int8_variant
    from vlcompress.runtime.genai_generate import GenaiGenerator

    make = make_fp16_variant if precision == "fp16" else make_int8_variant
    make(gen_run / "pruned", tmp_path / precision)  # fp16: the KV cache in fp16 too
    want = OrtGenerator(tmp_path / precision).generate(*feeds, 8)
    gen = GenaiGenerator(tmp_path / precision, threads=1)
    try:
        assert gen.generate(*feeds, 8) == want
    finally:
        gen.close()


def last_position_copy(folder, out):
    """``folder``'s export with a decoder that returns the last position's logits only
    ([batch, 1, vocab]), as the exporter now writes it: the old graph's logits sliced."""
    import shutil

    import onnx
    from onnx import helper, numpy_helper

    out.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    m = onnx.load(str(out / "decoder.onnx"))
    g = m.graph
    for n in g.node:
        n.output[:] = ["logits_all" if x == "logits" else x for x in n.output]
    g.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), k) for k, v in
                          (("last_s", -1), ("last_e", 2**62), ("last_ax", 1))])
    g.node.append(helper.make_node("Slice", ["logits_all", "last_s", "last_e", "last_ax"],
                                   ["logits"]))
    out_logits = next(o for o in g.output if o.name == "logits")
    out_logits.type.tensor_type.shape.dim[1].ClearField("dim_param")
    out_logits.type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(m, str(out / "decoder.onnx"))
    return out


@needs_genai
def test_last_position_decoder_batched_behind_the_left_padding_adapter(gen_run, feeds, tmp_path):
    from vlcompress.runtime.genai_generate import GenaiGenerator

    want = OrtGenerator(gen_run / "pruned").generate(*feeds, 10)
    gen = GenaiGenerator(last_position_copy(gen_run / "pruned", tmp_path / "last"), threads=1)
    try:
        assert gen.last_logits_only
        assert gen.generate(*feeds, 10) == want  # mixed prompt lengths: right-padded for GenAI
        s = Sampling(1.3, 4, 1.0, seed=5)
        assert gen.generate(*feeds, 10, s) == gen.generate(*feeds, 10, s)
    finally:
        gen.close()


@needs_genai
def test_right_padding_and_what_genai_would_misread(gen_run, feeds):
    from vlcompress.runtime.genai_generate import GenaiGenerator

    gen = GenaiGenerator(gen_run / "pruned", threads=1)
    try:
        ids, mask = feeds[0], feeds[1]
        right = gen.right_padded(ids, mask)
        n = mask.sum(-1)
        assert right.shape == (4, int(n.max()))
        for r in range(4):
            assert right[r, :n[r]].tolist() == ids[r][mask[r] == 1].tolist()
            assert (right[r, n[r]:] == gen.spec["pad_token_id"]).all()
        with pytest.raises(ConfigError, match="not left-padded"):
            gen.right_padded(ids, mask[:, ::-1])
        tail = ids.copy()
        tail[:, -1] = gen.spec["pad_token_id"]
        with pytest.raises(ConfigError, match="ends with the pad token"):
            gen.right_padded(tail, mask)
        assert gen.right_padded(ids[:1], mask[:1]).shape == (1, int(n[0]))  # batch 1: unpadded
        with pytest.raises(ConfigError, match="takes 1..32 rows"):
            gen.right_padded(np.repeat(ids, 9, 0), np.repeat(mask, 9, 0))
        with pytest.raises(ConfigError, match=f"allowed: 0..{2**31 - 1}"):
            gen.start(*feeds, 4, Sampling(seed=2**31))
    finally:
        gen.close()


@needs_genai
def test_genai_sampling_draws_from_our_distribution(gen_run, feeds):
    from vlcompress.runtime.genai_generate import GenaiGenerator, draw_check, support_violations

    one = tuple(x[1:2] for x in feeds)
    ort = OrtGenerator(gen_run / "pruned")
    logits = ort.prefill(*one, 1).logits
    gen = GenaiGenerator(gen_run / "pruned", threads=1)
    try:
        for t, k, p in ((1.0, 0, 1.0), (0.8, 4, 1.0), (2.0, 0, 0.5), (1.5, 6, 0.7)):
            draws = []
            for seed in range(12):  # a batch of copies: each row drawn on its own
                rows = gen.generate(*(np.repeat(x, 32, 0) for x in one), 1,
                                    Sampling(t, k, p, seed=seed))
                draws += [r[0] if r else gen.spec["eos_token_id"] for r in rows]
            assert draw_check(Sampling(t, k, p).probs(logits)[0], draws)["ok"], (t, k, p)
            if (t, k, p) == (1.0, 0, 1.0):  # the check can fail: a colder target is far off
                assert not draw_check(Sampling(0.3).probs(logits)[0], draws)["ok"]
        s = Sampling(1.2, 3, 1.0, seed=11)
        rep = tuple(np.repeat(x, 6, 0) for x in one)
        seqs = gen.generate(*rep, 12, s)
        assert seqs == gen.generate(*rep, 12, s)  # seeded
        assert seqs != gen.generate(*rep, 12, Sampling(1.2, 3, 1.0, seed=12))
        forced = support_violations(ort, one, seqs, s)
        assert forced["tokens"] > 20 and forced["outside_support"] == 0
        # and the check sees a token top-k removed: the least likely one of the first step
        worst = int(np.argmin(logits[0]))
        assert support_violations(ort, one, [[worst]], s)["outside_support"] == 1
    finally:
        gen.close()


@needs_genai
def test_generate_cli_with_genai_runtime(gen_run, tmp_path):
    files, _ = generate_examples(1, seed=5)
    (tmp_path / "x.png").write_bytes(files[0])
    args = ["generate", str(gen_run), "--image", str(tmp_path / "x.png"), "--prompt",
            "describe the picture.", "--max-new-tokens", "6"]
    ort_res = CliRunner().invoke(app, args)
    genai_res = CliRunner().invoke(app, [*args, "--runtime", "genai"])
    assert ort_res.exit_code == 0 and genai_res.exit_code == 0, genai_res.output
    assert genai_res.stdout == ort_res.stdout and ort_res.stdout.strip()
    sampled = [CliRunner().invoke(app, [*args, "--runtime", "genai", "--sample", "--seed", "3",
                                        "--top-k", "5", "--temperature", "1.3"])
               for _ in range(2)]
    assert all(r.exit_code == 0 for r in sampled), sampled[0].output
    assert sampled[0].stdout == sampled[1].stdout and sampled[0].stdout.strip()
    res = CliRunner().invoke(app, [*args, "--runtime", "genai", "--sample", "--seed", "-1"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "allowed: 0..2147483647" in lines[0]


def test_unknown_runtime_and_missing_genai_are_one_line(gen_run, tmp_path, monkeypatch):
    import sys

    files, _ = generate_examples(1)
    (tmp_path / "x.png").write_bytes(files[0])
    args = ["generate", str(gen_run), "--image", str(tmp_path / "x.png"), "--prompt", "hi"]
    res = CliRunner().invoke(app, [*args, "--runtime", "tensorrt"])
    assert res.exit_code == 2 and "allowed: onnxruntime, genai" in res.output
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # as if not installed
    res = CliRunner().invoke(app, [*args, "--runtime", "genai"])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and "pip install vlcompress[genai]" in lines[0]
