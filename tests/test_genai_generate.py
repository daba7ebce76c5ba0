"""ONNX Runtime GenAI as a second generation runtime (issue 28 item 2): our exported graphs
run in GenAI's multimodal pipeline through one adapter graph, token for token equal to
OrtGenerator; `vlcompress generate --runtime genai` answers from it. Skipped with the reason
where the `[genai]` extra is not installed (its absence is one line, also tested)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llava_factory import make_generative_run
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.errors import MissingDependencyError
from vlcompress.optional_deps import require_onnxruntime_genai
from vlcompress.runtime.gen_inputs import PromptEncoder, read_image
from vlcompress.runtime.ort_generate import OrtGenerator
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


@needs_genai
@pytest.mark.parametrize("variant", ["dense", "pruned"])
def test_genai_tokens_equal_ortgenerator(gen_run, variant):
    from vlcompress.runtime.genai_generate import GenaiGenerator

    files, prompts = generate_examples(4, seed=2)
    enc = PromptEncoder(gen_run / "pruned" / "model", "llava", 128)
    e = enc.encode([read_image(f) for f in files], prompts)  # left-padded batch
    want = OrtGenerator(gen_run / variant).generate(e["input_ids"], e["attention_mask"],
                                                    e["pixel_values"], 10)
    gen = GenaiGenerator(gen_run / variant, threads=1)
    try:
        got = gen.generate(e["input_ids"], e["attention_mask"], e["pixel_values"], 10)
    finally:
        gen.close()
    assert got == want and sum(len(r) for r in want) > 8


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
