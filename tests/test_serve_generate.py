"""Serving a generative run (issue 28 item 5): `export-triton` writes one Python-backend
generation model per variant, its model file batches requests into one left-padded generate
call and answers each as the direct OrtGenerator run would, and `serve-check` compares the
real server's tokens one for one with that direct run (exit 1 on a mismatch).

The run is built in seconds from two tiny random LLaVAs (dense and "pruned" differ in their
weights, so their answers differ). The model file is exercised in-process with a stand-in for
Triton's stub module; the end-to-end server test needs the `[serve]` extra and is slow here
(each model's stub imports transformers: 20-50 s to ready under the shared load)."""

from __future__ import annotations

import json
import shutil
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
from llava_factory import make_generative_run
from test_serve import NO_CLIENT, NO_SERVER
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.exporters.triton import TritonRepo, export_triton, model_config_text
from vlcompress.optional_deps import triton_model_config_pb2
from vlcompress.runtime.gen_inputs import PromptEncoder, read_image
from vlcompress.runtime.ort_generate import OrtGenerator
from vlcompress.serve import answer_texts, answer_tokens, generate_examples, generate_feeds

runner = CliRunner()


MAX_NEW = 8


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    return make_generative_run(tmp_path_factory.mktemp("genserve"), max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def gen_repo(gen_run, tmp_path_factory):
    return export_triton(gen_run, tmp_path_factory.mktemp("genrepo") / "repo")


def test_generative_repository_is_one_python_generation_model_per_variant(gen_run, gen_repo):
    assert gen_repo.backend == "python" and gen_repo.device == "cpu"  # the default for generative
    assert [m.name for m in gen_repo.models] == ["dense_generate", "pruned_generate"]
    for m in gen_repo.models:
        one = gen_repo.path / m.name / "1"
        spec = json.loads((one / "generation.json").read_text())
        for f in spec["files"].values():  # the variant's own graphs
            assert (one / f).read_bytes() == (gen_run / m.variant / f).read_bytes()
        assert (one / "processor" / "tokenizer.json").is_file()
        assert not list((one / "processor").glob("*.safetensors"))  # no weights copied
        assert "OrtGenerator" in (one / "model.py").read_text()
        assert m.max_batch_size == 4 and m.parameters["max_new_tokens"] == str(MAX_NEW)
        ins = {t.name: t for t in m.inputs}
        assert ins["pixel_values"].dims == [3, 32, 32] and ins["image"].optional
        assert not ins["prompt"].optional and ins["prompt"].numpy == "uint8"
    again = TritonRepo.load(gen_repo.path)
    assert again.models[1].parameters == gen_repo.models[1].parameters
    readme = (gen_repo.path / "README.md").read_text()
    assert "pruned_generate" in readme and "serve-check" in readme


@pytest.mark.skipif(NO_CLIENT is not None, reason=str(NO_CLIENT))
def test_generation_config_parses_with_tritons_protobuf(gen_repo):
    from google.protobuf import text_format

    pb = triton_model_config_pb2()
    m = gen_repo.models[1]
    text = (gen_repo.path / m.name / "config.pbtxt").read_text()
    assert text == model_config_text(m, "python", "cpu")
    cfg = text_format.Parse(text, pb.ModelConfig())
    assert cfg.backend == "python" and cfg.max_batch_size == 4
    assert {i.name: i.optional for i in cfg.input} == {
        "prompt": False, "image": True, "pixel_values": True, "max_new_tokens": True}
    # prompts and files of different lengths may share a batch (the model pads them)
    assert {i.name for i in cfg.input if i.allow_ragged_batch} == {"prompt", "image"}
    assert [o.name for o in cfg.output] == ["text", "token_ids", "num_tokens"]
    assert cfg.parameters["max_new_tokens"].string_value == str(MAX_NEW)
    assert cfg.parameters["model_name"].string_value == "llava"
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0


@pytest.mark.parametrize("args,message", [
    (["--backend", "onnxruntime"], "--backend onnxruntime cannot serve the generative run"),
    (["--device", "gpu"], "--device gpu is not available for a generative run"),
    (["--variants", "dense,int8"], "variant 'int8' is not in run"),
])
def test_generative_export_refusals_are_one_line(gen_run, tmp_path, args, message):
    res = runner.invoke(app, ["export-triton", str(gen_run), "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "r").exists()


class _Tensor:
    """The stub's tensor as the model file uses it: DLPack in and out."""

    def __init__(self, name, a):
        self.name, self.a = name, np.asarray(a)

    def __dlpack__(self, *args, **kw):
        return self.a.__dlpack__(*args, **kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()

    @classmethod
    def from_dlpack(cls, name, a):
        return cls(name, np.from_dlpack(a).copy())


def _load_generate_model(monkeypatch, repo, name):
    import importlib.util

    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor
    pb.InferenceResponse = lambda output_tensors=(), error=None: SimpleNamespace(
        outputs={t.name: t.a for t in output_tensors}, error=error)
    pb.TritonError = lambda msg: msg
    pb.get_input_tensor_by_name = lambda r, n: _Tensor(n, r[n]) if n in r else None
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    path = repo.path / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("vlc_generate_model_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = next(x for x in repo.models if x.name == name)
    cfg = {"parameters": {k: {"string_value": str(v)} for k, v in
                          {**m.parameters, "intra_op_threads": "1"}.items()}}
    model = mod.TritonPythonModel()
    model.initialize({"model_config": json.dumps(cfg), "model_repository": str(repo.path / name),
                      "model_version": "1", "model_instance_kind": "CPU"})
    return model


def test_generation_model_batches_requests_and_answers_as_the_direct_run(gen_run, gen_repo,
                                                                         monkeypatch):
    """Dynamic batching hands execute several requests: image bytes and pixels, different
    prompts (left padding) and max_new_tokens, a request of two rows, and malformed ones. The
    valid rows run as ONE generate call, and each row equals OrtGenerator run on it alone
    with its own limit; each malformed request gets its own error."""
    model = _load_generate_model(monkeypatch, gen_repo, "pruned_generate")
    files, prompts = generate_examples(5, seed=3)
    enc = PromptEncoder(gen_run / "pruned" / "model", "llava", model.context)
    px = enc.encode([read_image(files[1])], [prompts[1]])["pixel_values"]
    requests = [generate_feeds([prompts[0]], images=[files[0]], max_new_tokens=MAX_NEW),
                generate_feeds([prompts[1]], pixel_values=px, max_new_tokens=3),
                generate_feeds([prompts[2]]),  # neither image nor pixels
                generate_feeds(prompts[3:5], images=files[3:5]),  # two rows, the default limit
                generate_feeds([prompts[0]], images=[b"not an image"]),
                generate_feeds([prompts[0]], images=[files[0]], max_new_tokens=10_000)]
    calls = []
    real = model.generator.generate
    monkeypatch.setattr(model.generator, "generate", lambda *a: calls.append(a) or real(*a))
    res = model.execute(requests)
    assert len(calls) == 1 and calls[0][0].shape[0] == 4  # the four valid rows, one call
    assert res[2].error and "exactly one of 'image'" in res[2].error
    assert res[4].error and "cannot be read" in res[4].error
    assert res[5].error and "max_new_tokens 10000 is outside 1..128" in res[5].error
    direct = OrtGenerator(gen_run / "pruned")
    rows = [(0, 0, files[0], prompts[0], MAX_NEW), (1, 0, None, prompts[1], 3),
            (3, 0, files[3], prompts[3], MAX_NEW), (3, 1, files[4], prompts[4], MAX_NEW)]
    for req, row, file, prompt, limit in rows:
        e = (enc.encode([read_image(file)], [prompt]) if file is not None
             else enc.encode_pixels(px, [prompt]))
        want = direct.generate(e["input_ids"], e["attention_mask"], e["pixel_values"], limit)[0]
        got = answer_tokens(res[req].outputs)[row]
        assert got == want and len(got) <= limit, (req, row)
        assert answer_texts(res[req].outputs)[row] == enc.decode(want)
    assert res[0].outputs["token_ids"].shape == (1, len(answer_tokens(res[0].outputs)[0]) or 1)
    assert sum(len(answer_tokens(res[i].outputs)[0]) for i in (0, 1)) > 3  # real answers


@pytest.mark.slow  # two generation stubs import transformers: 20-50 s to ready here
@pytest.mark.skipif(NO_SERVER is not None, reason=str(NO_SERVER))
def test_serve_check_generates_through_the_real_server(gen_run, gen_repo, tmp_path):
    res = runner.invoke(app, ["serve-check", str(gen_repo.path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["passed"] and len(out["rows"]) == 6  # batch, concurrent, refusals per model
    for r in out["rows"]:
        assert "OrtGenerator" in r["reference"]
        if r["kind"] == "refusal":  # unreadable image, no image, too many tokens: one line each
            assert r["refused"] == r["bad_requests"] == 3
        else:
            assert r["rows_equal"] == r["rows"] == 4 and r["new_tokens"] > 0
    assert_serve_check_catches_a_swapped_decoder(gen_run, tmp_path)


def assert_serve_check_catches_a_swapped_decoder(run, tmp_path):
    """A served pruned model whose decoder is the dense one fails serve-check, exit code 1."""
    bad = export_triton(run, tmp_path / "bad", variants="pruned")
    served = bad.path / "pruned_generate" / "1" / "decoder.onnx"
    served.unlink()  # a hard link to the run's file: replaced, never written through
    shutil.copyfile(run / "dense" / "decoder.onnx", served)
    res = runner.invoke(app, ["serve-check", str(bad.path)])
    assert res.exit_code == 1, res.output
    assert "MISMATCH" in res.output and "direct" in res.output


def _prune_export_args(tmp_path):
    from llava_factory import make_tiny_llava_folder

    model = make_tiny_llava_folder(tmp_path, seed=1)
    return ["prune-export", "--model", str(model), "--method", "magnitude", "--pattern",
            "unstructured", "--calibration-size", "4", "--eval-size", "4", "--max-new-tokens", "4"]


def test_prune_export_triton_other_than_python_is_refused_before_work(tmp_path):
    res = runner.invoke(app, [*_prune_export_args(tmp_path), "--out", str(tmp_path / "bad"),
                              "--triton", "onnxruntime"])
    assert res.exit_code == 2 and not (tmp_path / "bad").exists()
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "allowed: --triton python" in lines[0], res.output


@pytest.mark.slow  # a whole prune-export (evaluations, exports, validation): ~1 min here
def test_prune_export_triton_python_writes_the_generation_repository(tmp_path):
    """`prune-export --triton python` on a generative model writes OUT/triton, the same
    repository export-triton writes."""
    res = runner.invoke(app, [*_prune_export_args(tmp_path), "--out", str(tmp_path / "run"),
                              "--triton", "python"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["export"]["triton"]["models"] == ["dense_generate", "pruned_generate"]
    repo = TritonRepo.load(tmp_path / "run" / "triton")
    assert repo.backend == "python" and repo.run_dir == ".."
    assert (tmp_path / "run" / "triton" / "pruned_generate" / "1" / "decoder.onnx").is_file()
