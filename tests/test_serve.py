"""Triton model repositories (vlcompress.exporters.triton) and the real tritonserver
(vlcompress.serve). Configs parse with Triton's own ModelConfig protobuf wherever tritonclient
is installed; the server tests need the ``[serve]`` extra and skip with the reason otherwise.
The server starts in about 3-6 s here, so a few end-to-end server starts are in the fast
suite: serve-check against a real run (a tiny random CLIP, exported and pruned in seconds)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.errors import ConfigError, MissingDependencyError, OutputError, ServeError
from vlcompress.exporters.triton import batching_rule, export_triton
from vlcompress.optional_deps import require_tritonserver, triton_model_config_pb2

runner = CliRunner()


def _have(fn) -> str | None:
    try:
        fn()
    except MissingDependencyError as exc:
        return str(exc)
    return None


NO_CLIENT = _have(triton_model_config_pb2)
NO_SERVER = _have(require_tritonserver) or NO_CLIENT
needs_client = pytest.mark.skipif(NO_CLIENT is not None, reason=str(NO_CLIENT))
needs_server = pytest.mark.skipif(NO_SERVER is not None, reason=str(NO_SERVER))

ROWS = [  # a run's latency table (ms): batching pays for the pruned text tower only
    {"runtime": "onnxruntime", "tower": "vision", "batch": 1, "dense_ms": {"p50": 1.0},
     "pruned_ms": {"p50": 0.5}},
    {"runtime": "onnxruntime", "tower": "vision", "batch": 8, "dense_ms": {"p50": 12.0},
     "pruned_ms": {"p50": 4.8}},
    {"runtime": "onnxruntime", "tower": "text", "batch": 1, "dense_ms": {"p50": 0.2},
     "pruned_ms": {"p50": 0.02}},
    {"runtime": "onnxruntime", "tower": "text", "batch": 8, "dense_ms": {"p50": 1.2},
     "pruned_ms": {"p50": 0.1}},
]


def _tower_onnx(path, tower: str, *, vocab: int = 32, width: int = 64, seed: int = 0):
    """A small real ONNX graph with a tower's exact interface (tiny-clip's names, dtypes and
    symbolic axes): vision = mean over pixels' channels then a projection; text = masked mean of
    token embeddings. Built in milliseconds, so the serving tests need no torch export."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    if tower == "vision":
        w = numpy_helper.from_array(rng.standard_normal((48 * 48, width)).astype("float32"), "w")
        axes = numpy_helper.from_array(np.array([1], dtype="int64"), "axes")
        shape = numpy_helper.from_array(np.array([0, 48 * 48], dtype="int64"), "shape")
        nodes = [helper.make_node("ReduceMean", ["pixel_values", "axes"], ["m"], keepdims=0),
                 helper.make_node("Reshape", ["m", "shape"], ["flat"]),
                 helper.make_node("MatMul", ["flat", "w"], ["embeds"])]
        inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                ["batch", 3, 48, 48])]
        inits = [w, axes, shape]
    else:
        emb = numpy_helper.from_array(rng.standard_normal((vocab, width)).astype("float32"), "emb")
        axes = numpy_helper.from_array(np.array([1], dtype="int64"), "axes")
        last = numpy_helper.from_array(np.array([-1], dtype="int64"), "last")
        nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
                 helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
                 helper.make_node("Unsqueeze", ["mf", "last"], ["m3"]),
                 helper.make_node("Mul", ["e", "m3"], ["em"]),
                 helper.make_node("ReduceSum", ["em", "axes"], ["s"], keepdims=0),
                 helper.make_node("ReduceSum", ["mf", "axes"], ["n"], keepdims=1),
                 helper.make_node("Div", ["s", "n"], ["embeds"])]
        inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
                  for n in ("input_ids", "attention_mask")]
        inits = [emb, axes, last]
    out = [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["batch", width])]
    graph = helper.make_graph(nodes, tower, inputs, out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as prune-export lays it out: <dense|pruned>/<tower>.onnx, a latency table
    in report.json, the pruned model's config (its vocabulary bounds the token ids)."""
    root = tmp_path_factory.mktemp("run")
    for i, v in enumerate(("dense", "pruned")):
        (root / v).mkdir()
        for t in ("vision", "text"):
            _tower_onnx(root / v / f"{t}.onnx", t, seed=i)
    (root / "pruned" / "model").mkdir()
    (root / "pruned" / "model" / "config.json").write_text(
        json.dumps({"model_type": "clip", "text_config": {"vocab_size": 32}}))
    report = {"config": {"runtime": {"name": "onnxruntime", "device": "cpu"}}, "latency": ROWS}
    (root / "report.json").write_text(json.dumps(report))
    return root


def test_batching_rule_from_the_latency_table():
    mb, pref, delay, rule = batching_rule([r for r in ROWS if r["tower"] == "vision"], "pruned_ms")
    assert (mb, pref, delay) == (8, [], 500)  # 4.8/8 = 0.6 ms per item > 0.5: no preferred size
    mb, pref, delay, _ = batching_rule([r for r in ROWS if r["tower"] == "vision"], "dense_ms")
    assert (pref, delay) == ([], 1000)
    mb, pref, delay, _ = batching_rule([r for r in ROWS if r["tower"] == "text"], "dense_ms")
    assert (pref, delay) == ([8], 200)
    assert batching_rule([r for r in ROWS if r["tower"] == "text"], "pruned_ms")[2] == 50  # clamped
    assert batching_rule([], "dense_ms")[:3] == (None, [], 100)
    assert "queue delay" in rule


@needs_client
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt", "python"])
def test_configs_parse_with_tritons_protobuf(run_dir, tmp_path, backend):
    from google.protobuf import text_format

    if backend == "tensorrt":  # the engines a --engine trt run writes (bytes not read here)
        for v in ("dense", "pruned"):
            for t in ("vision", "text"):
                (run_dir / v / f"{t}.engine").write_bytes(b"plan")
    try:
        repo = export_triton(run_dir, tmp_path / "repo", backend=backend)
    finally:
        for f in run_dir.glob("*/*.engine"):
            f.unlink()
    pb = triton_model_config_pb2()
    names = sorted(m.name for m in repo.models)
    assert names == ["dense_text", "dense_vision", "pruned_text", "pruned_vision"]
    for m in repo.models:
        cfg = text_format.Parse((tmp_path / "repo" / m.name / "config.pbtxt").read_text(),
                                pb.ModelConfig())
        assert cfg.name == m.name and cfg.max_batch_size == 8
        if backend == "tensorrt":
            assert cfg.platform == "tensorrt_plan"
            assert (tmp_path / "repo" / m.name / "1" / "model.plan").is_file()
            assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        else:
            assert cfg.backend == backend
            assert (tmp_path / "repo" / m.name / "1" / "model.onnx").is_file()
            assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
        ins = {i.name: (pb.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input}
        if m.tower == "vision":
            assert ins == {"pixel_values": ("TYPE_FP32", [3, 48, 48])}
        else:
            assert ins == {"input_ids": ("TYPE_INT64", [-1]), "attention_mask": ("TYPE_INT64", [-1])}
        assert [(o.name, list(o.dims)) for o in cfg.output] == [("embeds", [64])]
        want = batching_rule([r for r in ROWS if r["tower"] == m.tower], f"{m.variant}_ms")
        assert list(cfg.dynamic_batching.preferred_batch_size) == want[1]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == want[2]
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert all(f'client.infer("{n}"' in readme for n in names)


def test_bad_inputs_through_the_cli(run_dir, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    r = runner.invoke(app, ["export-triton", str(empty), "--out", str(tmp_path / "r1")])
    assert r.exit_code == 2 and "has no ONNX files" in r.output and not (tmp_path / "r1").exists()
    r = runner.invoke(app, ["export-triton", str(run_dir), "--out", str(tmp_path / "r2"),
                            "--backend", "tensorrt"])
    assert r.exit_code == 2 and "--backend tensorrt needs the run's TensorRT engines" in r.output
    assert not (tmp_path / "r2").exists()
    r = runner.invoke(app, ["export-triton", str(run_dir), "--out", str(tmp_path / "r3"),
                            "--backend", "triton"])
    assert r.exit_code == 2 and "allowed: onnxruntime, tensorrt, python" in r.output
    (tmp_path / "r4").mkdir()
    (tmp_path / "r4" / "keep.txt").write_text("x")
    r = runner.invoke(app, ["export-triton", str(run_dir), "--out", str(tmp_path / "r4")])
    assert r.exit_code == 2 and "non-empty folder" in r.output
    assert os.listdir(tmp_path / "r4") == ["keep.txt"]
    r = runner.invoke(app, ["serve-check", str(run_dir)])  # a run, not a repository
    assert r.exit_code == 2 and "export-triton --out" in r.output
    r = runner.invoke(app, ["prune-export", "--triton", "tensorrt", "--out", str(tmp_path / "r5")])
    assert r.exit_code == 2 and "--engine trt" in r.output and not (tmp_path / "r5").exists()
    # the API refuses the same way
    with pytest.raises(ConfigError):
        export_triton(run_dir, tmp_path / "r6", backend="tensorrt", device="cpu")
    with pytest.raises(OutputError):
        export_triton(run_dir, tmp_path / "r4")


def test_missing_serve_extra_is_one_line(run_dir, tmp_path, monkeypatch):
    import importlib.util

    export_triton(run_dir, tmp_path / "repo", backend="python")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytriton" else real(name, *a))
    r = runner.invoke(app, ["serve-check", str(tmp_path / "repo")])
    assert r.exit_code == 2
    assert "pip install vlcompress[serve]" in r.output and "Traceback" not in r.output


@needs_server
def test_port_in_use_is_replaced_and_said(tmp_path):
    from vlcompress.serve import TritonServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        srv = TritonServer(tmp_path, port=taken)
        port = srv._pick_port()
    assert port != taken and f"port {taken} is in use" in srv.notes[0]


@needs_server
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_other_backends_load_up_to_the_missing_backend(real_run, tmp_path, backend):
    """This server has the Python backend only: an onnxruntime or tensorrt repository is
    parsed and fails exactly at Triton's missing-backend message, which serve-check quotes."""
    from vlcompress.serve import serve_check

    if backend == "tensorrt":
        for v in ("dense", "pruned"):
            for t in ("vision", "text"):
                (real_run / v / f"{t}.engine").write_bytes(b"plan")
    try:
        export_triton(real_run, tmp_path / "repo", backend=backend, variants="dense,pruned")
    finally:
        for f in real_run.glob("*/*.engine"):
            f.unlink()
    with pytest.raises(ServeError, match=f"unable to find backend library for backend '{backend}'"):
        serve_check(tmp_path / "repo", ready_timeout=60)


@needs_server
@pytest.mark.slow  # a real tiny-clip prune-export (pruning, two exports, latency): minutes here
def test_prune_export_triton_serves_the_run(tmp_path):
    from vlcompress import prune_export
    from vlcompress.serve import serve_check

    report = prune_export(model="tiny-clip", method="magnitude", pattern="structured",
                          sparsity=0.5, out=str(tmp_path / "run"), iterations=3, eval_size=32,
                          calibration_size=32, triton="python")
    assert report["export"]["triton"]["models"] == ["dense_vision", "dense_text", "pruned_vision",
                                                    "pruned_text"]
    res = serve_check(tmp_path / "run" / "triton")
    assert res.passed and len(res.rows) == 8 and all(r["max_abs_diff"] <= 1e-4 for r in res.rows)
    assert {r["reference"] for r in res.rows} == {"PyTorch dense model", "PyTorch pruned model"}


# ---------------------------------------------------------------------------------------------
# a real run: PyTorch models + their ONNX, served and compared (issue 25, items 1-5 and 14)
# ---------------------------------------------------------------------------------------------
VISION_B1 = [  # vision measured at batch 1 only (max_batch_size 1: issue 25 item 1)
    {"runtime": "onnxruntime", "tower": "vision", "batch": 1, "dense_ms": {"p50": 0.4},
     "pruned_ms": {"p50": 0.3}}]
TEXT_SLOW = [  # text: a 200 ms batch-1 p50 gives the longest queue delay (100 ms): requests merge
    {"runtime": "onnxruntime", "tower": "text", "batch": b, "dense_ms": {"p50": 200.0 * b},
     "pruned_ms": {"p50": 200.0 * b}} for b in (1, 8)]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A run folder as prune-export writes it, from a tiny random CLIP: dense/ and pruned/
    ONNX, pruned/model, report.json naming the dense model (saved outside the run, as a hub
    model would be), and dense_int8/ + pruned_int8/ listed in the report's quantize section."""
    from conftest import make_tiny_random_clip

    from vlcompress.data import load_calibration
    from vlcompress.exporters.onnx import export_model
    from vlcompress.exporters.quantize import quantize_onnx
    from vlcompress.pipeline import export_examples
    from vlcompress.prune import prune

    root = tmp_path_factory.mktemp("real")
    run = root / "run"
    vlm = make_tiny_random_clip()
    vlm.save(root / "dense-model")
    calib = load_calibration("shapes", n=8, batch_size=8)
    ex, ck = export_examples(calib)
    export_model(vlm, run / "dense", ex, ck)
    prune(vlm, "magnitude", 0.5, "unstructured", calibration=calib)
    vlm.save(run / "pruned" / "model")
    export_model(vlm, run / "pruned", ex, ck)
    files = {}
    for v in ("dense", "pruned"):
        files[v] = {}
        for t in ("vision", "text"):
            quantize_onnx(run / v / f"{t}.onnx", run / f"{v}_int8" / f"{t}.onnx", "int8",
                          method="dynamic")
            files[v][t] = {"path": f"{v}_int8/{t}.onnx"}
    report = {"model": {"name": str(root / "dense-model"), "source": str(root / "dense-model")},
              "config": {"runtime": {"name": "onnxruntime", "device": "cpu"}, "batch_sizes": [1, 8]},
              "export": {"precision": {"dense": "fp32", "pruned": "fp32"}},
              "latency": VISION_B1 + TEXT_SLOW,
              "quantize": {"quantize": "int8", "method": "dynamic", "files": files}}
    (run / "report.json").write_text(json.dumps(report))
    return run


def _copy_run(run: Path, dst: Path, **report_changes) -> Path:
    shutil.copytree(run, dst)
    rep = json.loads((dst / "report.json").read_text())
    rep.update(report_changes)
    (dst / "report.json").write_text(json.dumps(rep))
    return dst


def test_serve_tolerances_check_shapes_before_values():
    """Issue 25 item 2: a shape mismatch is a failure that says so (never a broadcast), and the
    tolerance follows the served precision."""
    import numpy as np

    from vlcompress.serve import SERVE_TOLERANCES, _agreement

    ref = {"embeds": np.ones((2, 8), dtype="float32")}
    a = _agreement({"embeds": np.ones((1, 8), dtype="float32")}, ref, "fp32")  # would broadcast
    assert not a["ok"] and "shape [1, 8]" in a["error"] and "[2, 8]" in a["error"]
    assert not _agreement({}, ref, "fp32")["ok"]
    near = {"embeds": ref["embeds"] + 3e-3}
    assert not _agreement(near, ref, "fp32")["ok"] and _agreement(near, ref, "fp16")["ok"]
    rng = np.random.default_rng(0)
    noisy = {"embeds": ref["embeds"] + 0.05 * rng.standard_normal((2, 8))}
    assert not _agreement(noisy, ref, "fp16")["ok"] and _agreement(noisy, ref, "int8")["ok"]
    flipped = {"embeds": -ref["embeds"]}
    assert not _agreement(flipped, ref, "int8")["ok"]  # int8 is judged by the cosine
    assert set(SERVE_TOLERANCES) >= {"fp32", "fp16", "int8", "fp8"}


def test_tensorrt_profiles_cover_batch_one_and_the_config_matches(run_dir, tmp_path):
    """Issue 25 item 3: a run measured at batch 8 alone builds engines whose profiles accept
    1..8 (the dynamic batcher forms any batch from 1), and the Triton config's max_batch_size
    is that profile maximum. Checked up to the TensorRT boundary: the plan, the config."""
    from google.protobuf import text_format

    from vlcompress.exporters.tensorrt import plan_build, profile_batch_range

    src = run_dir / "dense" / "vision.onnx"
    plan = plan_build(src, sparse=False, batch_sizes=(8,), strongly_typed=False)
    assert [p["pixel_values"] for p in plan.profiles] == [((1, 3, 48, 48), (8, 3, 48, 48),
                                                           (8, 3, 48, 48))]
    plan = plan_build(src, sparse=False, batch_sizes=(16, 4), strongly_typed=False)
    assert [p["pixel_values"][0][0] for p in plan.profiles] == [1, 1]
    assert [p["pixel_values"][2][0] for p in plan.profiles] == [16, 16]
    assert profile_batch_range([8]) == (1, 8)
    run = tmp_path / "run8"
    rows = [dict(r, batch=8) for r in ROWS if r["batch"] == 8]
    _copy_run(run_dir, run, latency=rows, config={"batch_sizes": [8]})
    for v in ("dense", "pruned"):
        for t in ("vision", "text"):
            (run / v / f"{t}.engine").write_bytes(b"plan")
    repo = export_triton(run, tmp_path / "repo", backend="tensorrt")
    if NO_CLIENT is None:
        pb = triton_model_config_pb2()
        for m in repo.models:
            cfg = text_format.Parse((tmp_path / "repo" / m.name / "config.pbtxt").read_text(),
                                    pb.ModelConfig())
            assert cfg.max_batch_size == profile_batch_range([8])[1] == 8
            assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert all(m.max_batch_size == 8 and "1..8" in m.rule for m in repo.models)


def test_quantized_run_serves_its_variants_or_refuses(real_run, tmp_path):
    """Issue 25 item 4: a --quantize run's repository serves the quantized variants the run
    produced (from the files its report lists); an fp8 run on a backend that cannot serve fp8
    is refused in one line naming the variants, before anything is written."""
    repo = export_triton(real_run, tmp_path / "repo", backend="python")
    names = sorted(m.name for m in repo.models)
    assert names == sorted(f"{v}_{t}" for v in ("dense", "pruned", "dense_int8", "pruned_int8")
                           for t in ("vision", "text"))
    q = {m.name: m for m in repo.models}["pruned_int8_vision"]
    assert (q.precision, q.reference, q.reference_onnx) == ("int8", "pruned", "pruned_int8/vision.onnx")
    assert (tmp_path / "repo" / "pruned_int8_vision" / "1" / "model.onnx").samefile(
        real_run / "pruned_int8" / "vision.onnx") or \
        (tmp_path / "repo" / "pruned_int8_vision" / "1" / "model.onnx").read_bytes() == \
        (real_run / "pruned_int8" / "vision.onnx").read_bytes()
    only = export_triton(real_run, tmp_path / "floats", backend="python", variants="dense,pruned")
    assert {m.variant for m in only.models} == {"dense", "pruned"}
    # an fp8 run: the python backend refuses, naming the variants; tensorrt serves them
    fp8 = tmp_path / "fp8-run"
    rep = json.loads((real_run / "report.json").read_text())
    files = {v: {t: {"path": f"{v}_fp8/{t}.onnx"} for t in ("vision", "text")}
             for v in ("dense", "pruned")}
    _copy_run(real_run, fp8, quantize={"quantize": "fp8", "files": files},
              config={**rep["config"], "batch_sizes": [1, 8]})
    for v in ("dense", "pruned"):
        shutil.copytree(fp8 / f"{v}_int8", fp8 / f"{v}_fp8")
    r = runner.invoke(app, ["export-triton", str(fp8), "--out", str(tmp_path / "r8"),
                            "--backend", "python"])
    assert r.exit_code == 2 and "dense_fp8, pruned_fp8" in r.output
    assert "--backend tensorrt" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r8").exists()
    for v in ("dense", "pruned", "dense_fp8", "pruned_fp8"):
        for t in ("vision", "text"):
            (fp8 / v / f"{t}.engine").write_bytes(b"plan")
    trt = export_triton(fp8, tmp_path / "r8t", backend="tensorrt")
    assert {m.variant for m in trt.models} == {"dense", "pruned", "dense_fp8", "pruned_fp8"}
    assert (tmp_path / "r8t" / "pruned_fp8_vision" / "1" / "model.plan").is_file()


@needs_server
def test_serve_check_sends_what_each_model_accepts_and_batches(real_run, tmp_path):
    """Issue 25 items 1, 2, 4: batch-1 models get batch-1 requests; concurrent single requests
    go through the dynamic batcher (the server merges them: fewer executions than requests),
    each answer checked against the run's PyTorch model (int8 variants too)."""
    export_triton(real_run, tmp_path / "repo", backend="python")
    r = runner.invoke(app, ["serve-check", str(tmp_path / "repo"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    rows = {(row["model"], row["kind"]): row for row in res["rows"]}
    assert res["passed"] and len(rows) == 16
    assert rows[("pruned_vision", "batch")]["batch"] == 1  # max_batch_size 1
    assert rows[("dense_text", "batch")]["batch"] == 4
    assert all(row["reference"] == f"PyTorch {row['variant'].split('_')[0]} model"
               for row in res["rows"])
    text = rows[("pruned_text", "concurrent")]
    assert text["requests"] == 4 and text["inferences"] == 4 and text["executions"] < 4
    assert rows[("pruned_vision", "batch")]["max_abs_diff"] <= 1e-4
    assert rows[("pruned_int8_vision", "batch")]["precision"] == "int8"


@needs_server
def test_serve_check_compares_with_the_runs_pytorch_model(real_run, tmp_path):
    """Issue 25 item 2: a repository whose pruned model serves the dense ONNX agrees with
    onnxruntime on that same file, but not with the run's pruned PyTorch model: caught."""
    from vlcompress.serve import serve_check

    export_triton(real_run, tmp_path / "repo", backend="python", variants="dense,pruned")
    served = tmp_path / "repo" / "pruned_vision" / "1" / "model.onnx"
    served.unlink()  # a hard link to the run's file: replace, never write through
    shutil.copyfile(real_run / "dense" / "vision.onnx", served)
    res = serve_check(tmp_path / "repo", ready_timeout=60)
    bad = {r["model"] for r in res.rows if not r["passed"]}
    assert not res.passed and bad == {"pruned_vision"}


@needs_server
def test_one_malformed_request_fails_alone_in_a_dynamic_batch(real_run, tmp_path):
    """Issue 25 item 5: a token id outside the vocabulary in one of four co-batched requests
    fails that request only; the other three are answered, and answered right."""
    import numpy as np

    from vlcompress.exporters.triton import TritonRepo
    from vlcompress.serve import (
        TritonServer,
        _agreement,
        _model_counts,
        _References,
        concurrent_infer,
        example_inputs,
    )

    export_triton(real_run, tmp_path / "repo", backend="python", variants="pruned")
    repo = TritonRepo.load(tmp_path / "repo")
    m = {x.name: x for x in repo.models}["pruned_text"]
    feeds = [example_inputs(m, batch=1, seed=i) for i in range(4)]
    feeds[2]["input_ids"] = np.full_like(feeds[2]["input_ids"], m.vocab_size + 5)
    refs = _References(repo)
    import tritonclient.http as httpclient

    with TritonServer(repo.path, ready_timeout=60) as srv:
        client = httpclient.InferenceServerClient(srv.url)
        answers = concurrent_infer(srv.url, m, feeds)
        inferences, executions = _model_counts(client, m.name, at_least=4)
        client.close()
    assert isinstance(answers[2], Exception) and "outside the vocabulary" in str(answers[2])
    for i in (0, 1, 3):
        assert isinstance(answers[i], dict), answers[i]
        assert _agreement(answers[i], refs.outputs(m, feeds[i]), "fp32")["ok"]
    assert inferences == 4 and executions < 4  # the four arrived together and were merged


def test_load_worker_whose_warmup_fails_does_not_hang(run_dir, tmp_path):
    """Issue 25 item 5: drive_load against a port nobody serves: every warm-up fails, the
    start is aborted and drive_load raises at once (it used to wait at the barrier forever)."""
    from vlcompress.exporters.triton import TritonRepo
    from vlcompress.serve import drive_load, example_inputs, free_port

    if NO_CLIENT is not None:
        pytest.skip(NO_CLIENT)
    export_triton(run_dir, tmp_path / "repo", backend="python")
    m = TritonRepo.load(tmp_path / "repo").models[0]
    out: list = []

    def go():
        try:
            drive_load(f"127.0.0.1:{free_port()}", m, example_inputs(m, batch=1), concurrency=3,
                       seconds=1.0)
        except ServeError as exc:
            out.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "drive_load hung at the start barrier"
    assert out and "warm-up failed" in str(out[0])


def _load_model_py(monkeypatch):
    """The python-backend model file, imported with a stand-in for the module only Triton's
    stub provides (its tensors and responses are not used by the code under test)."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils",
                        types.ModuleType("triton_python_backend_utils"))
    path = Path(__file__).resolve().parents[1] / "vlcompress" / "exporters" / "_triton_model.py"
    spec = importlib.util.spec_from_file_location("vlc_triton_model_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_instance_without_cuda_provider_refuses(monkeypatch, run_dir, tmp_path):
    """Issue 25 item 14: a KIND_GPU instance whose onnxruntime lacks the CUDA provider fails
    to load, saying so, instead of serving on the CPU unannounced; requests are checked one
    by one (the token-id bound of the vocabulary included)."""
    import numpy as np

    mod = _load_model_py(monkeypatch)
    with pytest.raises(RuntimeError, match="no CUDAExecutionProvider"):
        mod.providers_for("GPU", "0", ["CPUExecutionProvider"])
    assert mod.providers_for("CPU", "0", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert mod.providers_for("GPU", "1", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] \
        == ("CUDAExecutionProvider", {"device_id": 1})
    repo = export_triton(run_dir, tmp_path / "repo", backend="python", device="gpu")
    m = {x.name: x for x in repo.models}["pruned_text"]
    cfg = {"input": [{"name": t.name, "data_type": t.data_type, "dims": t.dims} for t in m.inputs],
           "output": [{"name": t.name, "data_type": t.data_type, "dims": t.dims} for t in m.outputs],
           "max_batch_size": m.max_batch_size,
           "parameters": {"vocab_size": {"string_value": str(m.vocab_size)}}}
    model = mod.TritonPythonModel()
    args = {"model_config": json.dumps(cfg), "model_repository": str(tmp_path / "repo" / m.name),
            "model_version": "1", "model_instance_kind": "GPU", "model_instance_device_id": "0"}
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="KIND_GPU"):
            model.initialize(args)
    model.initialize({**args, "model_instance_kind": "CPU"})
    ok = {"input_ids": np.ones((1, 5), "int64"), "attention_mask": np.ones((1, 5), "int64")}
    assert model.check(ok) is None
    assert "outside the vocabulary" in model.check({**ok, "input_ids": np.full((1, 5), 32)})
    assert "0 and 1" in model.check({**ok, "attention_mask": np.full((1, 5), 2)})
    assert "batch 2" in model.check({**ok, "attention_mask": np.ones((2, 5), "int64")})
    assert "dtype" in model.check({**ok, "input_ids": np.ones((1, 5), "int32")})
    assert "missing" in model.check({"input_ids": ok["input_ids"]})


@needs_server
def test_port_retry_ends_the_server_that_timed_out(tmp_path, monkeypatch):
    """Issue 25 item 14: when the first start times out on a taken port, that server is
    stopped before the retry (it used to keep running, unowned)."""
    from vlcompress.serve import TritonServer

    srv = TritonServer(tmp_path, ready_timeout=30)
    procs, real = [], TritonServer._wait_ready

    def wait(self, log):
        procs.append(self.proc)
        if len(procs) == 1:
            raise ServeError("tritonserver was not ready within 1s: Address already in use")
        return real(self, log)

    monkeypatch.setattr(TritonServer, "_wait_ready", wait)
    with srv:
        assert len(procs) == 2 and procs[0].poll() is not None  # the first one was ended
        assert procs[1].poll() is None and "taken meanwhile" in srv.notes[-1]
    assert procs[1].poll() is not None


def test_serve_and_export_options_are_refused_before_work(run_dir, real_run, tmp_path):
    """Every option of export-triton and serve-check is checked first: one line, exit 2,
    nothing written, no server started."""
    def refused(args, *needles):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
        for n in needles:
            assert n in r.output, (n, r.output)

    repo = tmp_path / "repo"
    export_triton(run_dir, repo, backend="python")
    for port in ("0", "70000", "-1"):
        refused(["serve-check", str(repo), "--port", port], f"--port {port}", "1..65535")
    for t in ("0", "-3", "nan", "inf"):
        refused(["serve-check", str(repo), "--timeout", t], "--timeout", "seconds > 0")
    refused(["serve-check", str(repo), "--port", "http"], "--port")
    orphan = tmp_path / "orphan"  # a repository whose run folder is gone
    shutil.copytree(repo, orphan)
    man = json.loads((orphan / "vlcompress_triton.json").read_text())
    man["run_dir"] = str(tmp_path / "gone")
    (orphan / "vlcompress_triton.json").write_text(json.dumps(man))
    refused(["serve-check", str(orphan)], "does not exist", "run folder")
    # export-triton
    refused(["export-triton", str(run_dir), "--out", str(run_dir), "--force"],
            "--force would delete the run")
    refused(["export-triton", str(run_dir), "--out", str(run_dir.parent), "--force"],
            "holds it")
    refused(["export-triton", str(real_run), "--out", str(tmp_path / "v"), "--variants", "dense,pruned_fp8"],
            "'pruned_fp8'", "dense, pruned, dense_int8, pruned_int8")
    refused(["export-triton", str(real_run), "--out", str(tmp_path / "v"), "--variants", ","],
            "names no variant")
    refused(["export-triton", str(run_dir), "--out", str(tmp_path / "v"), "--device", "tpu"],
            "allowed: cpu, gpu")
    refused(["export-triton", str(run_dir), "--out", str(tmp_path / "v"), "--backend", "trt",
             "--device", "cpu"], "GPU only")
    refused(["export-triton", str(tmp_path / "nope"), "--out", str(tmp_path / "v")], "does not exist")
    refused(["prune-export", "--engine", "trt", "--quantize", "fp8", "--triton", "python", "--out",
             str(tmp_path / "v")], "--triton python cannot serve", "fp8")
    assert not (tmp_path / "v").exists()
    with pytest.raises(ConfigError, match="threads"):
        export_triton(run_dir, tmp_path / "v", threads=-1)
    assert not (tmp_path / "v").exists()
