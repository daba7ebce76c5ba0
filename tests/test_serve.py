"""Triton model repositories (vlcompress.exporters.triton) and the real tritonserver
(vlcompress.serve). Configs parse with Triton's own ModelConfig protobuf wherever tritonclient
is installed; the server tests need the ``[serve]`` extra and skip with the reason otherwise.
The server starts in about 3-6 s here, so one end-to-end request per backend is in the fast
suite."""

from __future__ import annotations

import json
import os
import socket

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
def test_python_backend_serves_end_to_end(run_dir, tmp_path):
    """The real tritonserver loads the python-backend repository, answers one request per
    model, and the answers equal onnxruntime's on the same ONNX."""
    export_triton(run_dir, tmp_path / "repo", backend="python")
    r = runner.invoke(app, ["serve-check", str(tmp_path / "repo"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["passed"] and len(res["rows"]) == 4
    assert all(row["max_abs_diff"] <= 1e-5 for row in res["rows"])
    assert res["url"].startswith("127.0.0.1:")


@needs_server
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_other_backends_load_up_to_the_missing_backend(run_dir, tmp_path, backend):
    """This server has the Python backend only: an onnxruntime or tensorrt repository is
    parsed and fails exactly at Triton's missing-backend message, which serve-check quotes."""
    from vlcompress.serve import serve_check

    if backend == "tensorrt":
        for v in ("dense", "pruned"):
            for t in ("vision", "text"):
                (run_dir / v / f"{t}.engine").write_bytes(b"plan")
    try:
        export_triton(run_dir, tmp_path / "repo", backend=backend)
    finally:
        for f in run_dir.glob("*/*.engine"):
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
    assert res.passed and all(r["max_abs_diff"] <= 1e-5 for r in res.rows)
