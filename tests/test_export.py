"""ONNX export: parity with PyTorch (fp32, fp16) on other shapes, one error naming every
failing tower, exact weights, N:M checks on the stored layout, fallback, external data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import RecordingProgress, make_tiny_random_clip
from onnx import TensorProto, helper, numpy_helper

import vlcompress.exporters.onnx as onnx_export
from vlcompress.data import PairBatch, load_calibration
from vlcompress.errors import ConfigError, ExportError, OutputError
from vlcompress.exporters import (
    ExportResult,
    check_nm,
    convert_fp16,
    export_model,
    export_tower,
    onnx_sparsity,
    validate_tower,
)

#: this module tests the exporter itself (quiet, fallback, external data): every export here is
#: real, never one reused from an earlier identical export (tests/conftest.py)
ONNX_EXPORT_REUSE = False


@pytest.fixture(scope="module")
def vlm():
    return make_tiny_random_clip()


@pytest.fixture(scope="module")
def example():
    return next(iter(load_calibration("shapes", n=8, batch_size=4)))


@pytest.fixture(scope="module")
def check():
    """3 pairs (the example has 4), from other samples."""
    return next(iter(load_calibration("shapes", n=3, batch_size=3, seed=1)))


@pytest.fixture(scope="module")
def fp32(vlm, example, check, tmp_path_factory):
    return export_model(vlm, tmp_path_factory.mktemp("fp32") / "onnx", example, check)


@pytest.fixture(scope="module")
def fp16(vlm, example, check, tmp_path_factory):
    return export_model(vlm, tmp_path_factory.mktemp("fp16") / "onnx", example, check, fp16=True)


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    g = inferred.graph
    out = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        out[vi.name] = vi.type.tensor_type.elem_type
    return out


def _make_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> None:
    """Zero all but the n largest |w| in each group of m input columns (in place)."""
    w = weight.data.view(weight.shape[0], -1, m)
    drop = w.abs().argsort(dim=-1)[..., : m - n]
    w.scatter_(-1, drop, 0.0)


# --- fp32 ------------------------------------------------------------------------------------
def test_fp32_export_matches_torch_on_other_shapes(fp32, example, vlm):
    assert isinstance(fp32, ExportResult) and not fp32.fp16
    assert set(fp32.paths) == {"vision", "text"}
    for tower, path in fp32.paths.items():
        assert path.is_file() and path.name == f"{tower}.onnx"
        assert fp32.max_abs_diff[tower] < 1e-4
        assert fp32.min_cosine[tower] > 0.9999
        v = fp32.validation[tower]
        assert v["ok"] and v["batch"] != len(example)
    ex_len = vlm.tower_inputs("text", example)["input_ids"].shape[1]
    assert fp32.validation["text"]["shapes"]["input_ids"][1] != ex_len
    # nothing else left in the folder (no staging leftovers), a single file per tower
    assert sorted(p.name for p in fp32.paths["vision"].parent.iterdir()) == ["text.onnx",
                                                                          "vision.onnx"]
    d = fp32.to_dict()
    json.dumps(d)
    assert d["paths"]["vision"].endswith("vision.onnx") and d["fp16"] is False
    assert d["exporter"] == {"vision": "dynamo", "text": "dynamo"}


def test_fp32_graph_io_names_and_dynamic_axes(fp32):
    v = onnx.load(fp32.paths["vision"])
    assert [i.name for i in v.graph.input] == ["pixel_values"]
    assert _dims(v.graph.input[0]) == ["batch", 3, 32, 32]
    assert [o.name for o in v.graph.output] == ["embeds"]
    assert _dims(v.graph.output[0]) == ["batch", 16]
    t = onnx.load(fp32.paths["text"])
    assert [i.name for i in t.graph.input] == ["input_ids", "attention_mask"]
    for i in t.graph.input:
        assert _dims(i) == ["batch", "sequence"]
    meta = {p.key: p.value for p in t.metadata_props}
    assert meta["vlcompress.tower"] == "text" and meta["vlcompress.precision"] == "fp32"


def test_validate_on_more_shapes(vlm, fp32):
    more = next(iter(load_calibration("shapes", n=5, batch_size=5, seed=3)))
    more.captions[0] += " next to a small blue triangle on the left"
    for tower in ("vision", "text"):
        res = validate_tower(vlm, tower, fp32.paths[tower], more)
        assert res["ok"] and res["batch"] == 5, res
    # one pair, and text cut to two tokens
    one = PairBatch(more.images[:1], more.captions[:1])
    assert validate_tower(vlm, "vision", fp32.paths["vision"], one)["ok"]
    short = {k: v[:, :2] for k, v in vlm.tower_inputs("text", more).items()}
    res = validate_tower(vlm, "text", fp32.paths["text"], short)
    assert res["ok"] and res["shapes"]["input_ids"] == [5, 2]


def test_weights_are_exact_named_initializers(vlm, fp32):
    for tower in ("vision", "text"):
        inits = {t.name: t for t in onnx.load(fp32.paths[tower]).graph.initializer}
        for layer in (pl for pl in vlm.prunable_layers() if pl.modality == tower):
            name = layer.name + ".weight"
            assert name in inits, name
            arr = numpy_helper.to_array(inits[name])
            w = layer.weight.detach().numpy()
            # MatMul stores the Linear weight as [d_in, d_out]
            assert arr.shape == w.T.shape and np.array_equal(arr, w.T)


def test_export_is_quiet(vlm, example, tmp_path, capfd, monkeypatch):
    vlm.tower_inputs("text", example)  # processors may warn once on first use
    capfd.readouterr()
    export_tower(vlm, "text", tmp_path / "text.onnx", example)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --- fp16 ------------------------------------------------------------------------------------
def test_fp16_export_matches_torch(fp16, example):
    assert fp16.fp16
    for tower in ("vision", "text"):
        assert fp16.validation[tower]["ok"]
        assert fp16.min_cosine[tower] >= 0.99
        assert fp16.max_abs_diff[tower] < 2e-2
        assert fp16.validation[tower]["batch"] != len(example)


def test_fp16_graph_keeps_touchy_ops_in_fp32(vlm, fp16):
    for tower in ("vision", "text"):
        model = onnx.load(fp16.paths[tower])
        onnx.checker.check_model(model, full_check=True)
        types = _types(model)
        # inputs and outputs keep their types; weights are fp16
        for vi in list(model.graph.input) + list(model.graph.output):
            assert vi.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64)
        for pl in (p for p in vlm.prunable_layers() if p.modality == tower):
            assert types[pl.name + ".weight"] == TensorProto.FLOAT16
        kept = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
        assert kept
        for n in kept:
            assert all(types[x] == TensorProto.FLOAT for x in n.input if x)
            assert types[n.output[0]] == TensorProto.FLOAT
        assert any(n.op_type == "MatMul" and types[n.output[0]] == TensorProto.FLOAT16
                   for n in model.graph.node)


def test_convert_fp16_small_graph():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    w[::2] = 0.0
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], axis=-1),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
            np.array([-3.0e38], dtype=np.float32))),
        helper.make_node("Add", ["n", "c"], ["m"]),  # a huge negative, like an attention mask
        helper.make_node("Max", ["m", "n"], ["k"]),
        helper.make_node("Softmax", ["k"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[numpy_helper.from_array(w, "w"),
                     numpy_helper.from_array(np.ones(8, np.float32), "g"),
                     numpy_helper.from_array(np.zeros(8, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    half = convert_fp16(onnx.ModelProto.FromString(model.SerializeToString()))
    onnx.checker.check_model(half, full_check=True)
    types = _types(half)
    assert types["w"] == TensorProto.FLOAT16 and types["g"] == TensorProto.FLOAT
    assert types["x"] == TensorProto.FLOAT and types["y"] == TensorProto.FLOAT
    inits = {t.name: numpy_helper.to_array(t) for t in half.graph.initializer}
    assert np.array_equal(inits["w"] == 0, w == 0)  # zeros stay exact zeros
    const = next(n for n in half.graph.node if n.op_type == "Constant")
    assert numpy_helper.to_array(const.attribute[0].t)[0] == np.float16(-65504)  # saturated
    import onnxruntime as ort

    x = rng.standard_normal((3, 8)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(half.SerializeToString()).run(None, {"x": x})[0]
    assert got.dtype == np.float32 and np.allclose(got, ref, atol=1e-2)


# --- a failing check -------------------------------------------------------------------------
def _fake_exporter(fp32, monkeypatch):
    """export_tower stand-in: 'exports' by copying the files exported from the unperturbed
    model, so the model can be perturbed after export without exporting again."""

    def fake(vlm, tower, path, example, *, fp16=False, opset=None):
        shutil.copy(fp32.paths[tower], path)
        return path, "dynamo"

    monkeypatch.setattr(onnx_export, "_export_tower", fake)


def test_mismatch_raises_one_error_naming_every_tower(fp32, example, check, tmp_path,
                                                      monkeypatch):
    _fake_exporter(fp32, monkeypatch)
    vlm2 = make_tiny_random_clip()  # same seed: the same weights as the exported model
    with torch.no_grad():
        vlm2.model.visual_projection.weight.mul_(1.5)
        vlm2.model.text_projection.weight.mul_(-1.0)
    out = tmp_path / "onnx"
    with pytest.raises(ExportError) as err:
        export_model(vlm2, out, example, check)
    msg = str(err.value)
    assert "2 tower(s)" in msg and "vision: max abs diff" in msg and "text: max abs diff" in msg
    assert "atol 0.0001" in msg and "rtol 0.001" in msg
    assert not out.exists() or list(out.iterdir()) == []  # nothing half-done is left


def test_mismatch_in_one_tower_names_only_that_tower(fp32, example, check, tmp_path,
                                                     monkeypatch):
    _fake_exporter(fp32, monkeypatch)
    vlm2 = make_tiny_random_clip()
    with torch.no_grad():
        vlm2.model.visual_projection.weight.mul_(1.5)  # cosine 1, abs diff large
    with pytest.raises(ExportError) as err:
        export_model(vlm2, tmp_path / "onnx", example, check, fp16=True)
    msg = str(err.value)
    assert "1 tower(s)" in msg and "vision: max abs diff" in msg and "text:" not in msg
    assert "min cosine" in msg


def test_export_model_bad_arguments(vlm, example, check, tmp_path):
    with pytest.raises(ConfigError, match="no tower 'audio'"):
        export_model(vlm, tmp_path / "x", example, check, towers=["audio"])
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError):
        export_model(vlm, f, example, check)


def test_check_batch_differs_from_example(vlm, example):
    same = next(iter(load_calibration("shapes", n=4, batch_size=4)))
    grown = onnx_export._check_batch(vlm, "text", example, same)
    assert len(grown) == len(example) + 1
    assert (vlm.tower_inputs("text", grown)["input_ids"].shape[1]
            != vlm.tower_inputs("text", example)["input_ids"].shape[1])


def test_progress_reports_each_tower(fp32, vlm, example, check, tmp_path, monkeypatch):
    _fake_exporter(fp32, monkeypatch)

    rec = RecordingProgress()
    seen = rec.seen

    res = export_model(vlm, tmp_path / "o", example, check, progress=rec)
    assert seen == [("export onnx", 2)] * 2 and res.paths["text"].is_file()


# --- N:M and sparsity -----------------------------------------------------------------------
def test_check_nm_on_exported_24_model(fp32, tmp_path):
    vlm24 = make_tiny_random_clip()
    vision = [pl for pl in vlm24.prunable_layers() if pl.modality == "vision"]
    with torch.no_grad():
        for pl in vision:
            _make_nm(pl.weight)
    path = export_tower(vlm24, "vision", tmp_path / "vision.onnx", next(iter(
        load_calibration("shapes", n=4, batch_size=4))))
    # only the (unpruned) projection is not 2:4
    assert check_nm(path) == ["visual_projection.weight"]
    sp = onnx_sparsity(path)
    for pl in vision:
        assert sp[pl.name + ".weight"] == 0.5
    # the same model in fp16 keeps the pattern
    half = convert_fp16(onnx.load(path))
    onnx.save(half, tmp_path / "half.onnx")
    assert check_nm(tmp_path / "half.onnx") == ["visual_projection.weight"]
    # 1:4 is stricter: every pruned layer fails it
    assert len(check_nm(path, 1, 4)) == len(vision) + 1
    # the dense model: every MatMul/Gemm weight is listed
    dense = check_nm(fp32.paths["vision"])
    assert set(dense) == {pl.name + ".weight" for pl in vision} | {"visual_projection.weight"}
    assert onnx_sparsity(fp32.paths["vision"])[vision[0].name + ".weight"] == 0.0


def _nm_graph(tmp_path, w_torch: np.ndarray, layout: str):
    """y = x @ W.T with the weight stored in ``layout``; returns the saved path."""
    d_out, d_in = w_torch.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, d_in])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, d_out])
    if layout == "matmul":  # ONNX MatMul: [d_in, d_out]
        nodes, w = [helper.make_node("MatMul", ["x", "w"], ["y"])], w_torch.T
    elif layout == "gemm_transB":  # like torch.nn.Linear: [d_out, d_in]
        nodes, w = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], w_torch
    elif layout == "transpose_matmul":  # torch layout, transposed in the graph
        nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "wt"], ["y"])]
        w = w_torch
    elif layout == "matmul_wrong":  # torch layout fed to MatMul as if it were [d_in, d_out]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, d_out])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, d_in])
        nodes, w = [helper.make_node("MatMul", ["x", "w"], ["y"])], w_torch
    graph = helper.make_graph(nodes, "g", [x], [y],
                              initializer=[numpy_helper.from_array(np.ascontiguousarray(w), "w")])
    path = tmp_path / f"{layout}.onnx"
    onnx.save(helper.make_model(graph), path)
    return path


def test_check_nm_reads_the_input_axis_from_the_consuming_node(tmp_path):
    # 2:4 along the input dimension of every row, but every column group of 4 rows is dense
    d_out, d_in = 8, 16
    w = np.zeros((d_out, d_in), np.float32)
    w[:, 0::4] = 1.0
    w[:, 1::4] = 2.0
    for layout in ("matmul", "gemm_transB", "transpose_matmul"):
        assert check_nm(_nm_graph(tmp_path, w, layout)) == [], layout
    # the same values read along the wrong axis are not 2:4
    assert check_nm(_nm_graph(tmp_path, w, "matmul_wrong")) == ["w"]
    # an input width that is not a multiple of M is never N:M
    assert check_nm(_nm_graph(tmp_path, w[:, :14], "matmul")) == ["w"]
    with pytest.raises(ConfigError):
        check_nm(_nm_graph(tmp_path, w, "matmul"), 4, 4)


# --- exporter fallback, external data ---------------------------------------------------------
def test_torchscript_fallback_when_dynamo_fails(vlm, example, check, tmp_path, monkeypatch,
                                                capfd):
    def boom(*a, **k):
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(onnx_export, "_export_dynamo", boom)
    vlm.tower_inputs("text", example)
    capfd.readouterr()
    res = export_model(vlm, tmp_path / "onnx", example, check)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # TracerWarnings and deprecation notices are silenced
    assert res.exporter == {"vision": "torchscript", "text": "torchscript"}
    assert all(v["ok"] for v in res.validation.values())
    meta = {p.key: p.value for p in onnx.load(res.paths["text"]).metadata_props}
    assert meta["vlcompress.exporter"] == "torchscript"

    monkeypatch.setattr(onnx_export, "_export_torchscript", boom)
    with pytest.raises(ExportError, match="dynamo exporter: .*torchscript exporter: "):
        export_tower(vlm, "vision", tmp_path / "v.onnx", example)
    assert not (tmp_path / "v.onnx").exists()


def test_external_data_when_large(vlm, fp32, check, tmp_path, monkeypatch):
    model = onnx.load(fp32.paths["vision"])
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1)
    path = onnx_export.save_onnx(model, tmp_path / "vision.onnx")
    data = tmp_path / "vision.onnx.data"
    assert data.is_file()
    stored = onnx.load(path, load_external_data=False).graph.initializer
    assert any(t.data_location == TensorProto.EXTERNAL for t in stored)
    assert all(not t.raw_data for t in stored if t.data_location == TensorProto.EXTERNAL)
    assert data.stat().st_mode == path.stat().st_mode
    assert validate_tower(vlm, "vision", path, check)["ok"]
    assert check_nm(path) == check_nm(fp32.paths["vision"])
    # a later small export replaces it with one file and drops the stale weights
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 2**31)
    onnx_export.save_onnx(onnx.load(fp32.paths["vision"]), path)
    assert not data.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx"]
