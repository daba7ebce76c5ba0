"""The ONNX export's memory: reading, naming and writing a model hold about one tensor beyond
the model, never a second copy of all its weights (benchmarks/export_memory.py measures the
peak RSS on a LLaVA preset); and the streamed files are byte for byte the ones protobuf writes.

tracemalloc sees Python-side allocations (bytes, numpy arrays): exactly the copies these
functions used to make (``f.read()`` in ``onnx.load``, ``SerializeToString``, ``tobytes`` of
each weight and of its transpose)."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vlcompress.exporters import onnx as X

ROWS, COLS = 512, 384  # 768 KiB per fp32 weight
N_WEIGHTS = 8


def _model(n: int = N_WEIGHTS, seed: int = 0) -> onnx.ModelProto:
    """A chain of MatMuls over ``n`` random weights, with the fields around the graph that a
    real export carries (doc string, metadata, opset imports, a local function)."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(n):
        w = rng.standard_normal((COLS, COLS) if i else (ROWS, COLS)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["b", ROWS])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", COLS])],
                          initializer=inits, doc_string="graph doc")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], doc_string="doc",
                          producer_name="test")
    fn = helper.make_function("local", "F", ["a"], ["b"],
                              [helper.make_node("Identity", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    m.functions.append(fn)
    helper.set_model_props(m, {"vlcompress.part": "decoder"})
    return m


def _weight_bytes(m: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in m.graph.initializer)


def _peak(fn, *args):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_write_proto_is_serialize_to_string():
    m = _model()
    buf = io.BytesIO()
    X.write_proto(m, buf)
    assert buf.getvalue() == m.SerializeToString()
    empty = onnx.ModelProto(ir_version=8)
    buf = io.BytesIO()
    X.write_proto(empty, buf)
    assert buf.getvalue() == empty.SerializeToString()


def test_save_onnx_holds_one_tensor_not_the_model(tmp_path):
    m = _model()
    total = _weight_bytes(m)
    _, peak = _peak(X.save_onnx, m, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == m.SerializeToString()
    # the whole serialised model (what SerializeToString allocated) would be > total
    assert peak < 2 * ROWS * COLS * 4 + (1 << 20), (peak, total)


def test_load_proto_equals_onnx_load_without_the_file_in_memory(tmp_path):
    m = _model()
    f = tmp_path / "m.onnx"
    f.write_bytes(m.SerializeToString())
    got, peak = _peak(X.load_proto, f)
    assert got.SerializeToString() == onnx.load(str(f)).SerializeToString()
    assert peak < _weight_bytes(m) // 4, peak  # onnx.load reads the whole file: > total


def test_load_proto_reads_external_data_as_onnx_load(tmp_path):
    m = _model(3)
    onnx.save_model(m, str(tmp_path / "e.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="e.onnx.data", size_threshold=1024)
    got = X.load_proto(tmp_path / "e.onnx")
    assert got.SerializeToString() == onnx.load(str(tmp_path / "e.onnx")).SerializeToString()
    assert numpy_helper.to_array(got.graph.initializer[0]).shape == (ROWS, COLS)


@pytest.mark.parametrize("transposed", [False, True])
def test_tensor_key_is_the_contiguous_copys(monkeypatch, transposed):
    monkeypatch.setattr(X, "_HASH_CHUNK", 4096)  # many bands
    a = np.random.default_rng(1).standard_normal((37, 53)).astype(np.float32)
    ref = np.ascontiguousarray(a.T) if transposed else a
    key = X._tensor_key(a, transposed=transposed)
    assert key == X._tensor_key(ref)
    assert key[0] == ref.shape
    assert key != X._tensor_key(a, transposed=not transposed)


def test_name_initializers_makes_no_weight_sized_copies(monkeypatch):
    monkeypatch.setattr(X, "_HASH_CHUNK", 1 << 16)
    torch.manual_seed(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(ROWS if i == 0 else COLS, COLS, bias=False)
                                   for i in range(4)])
    # the exporter's layout: MatMul operands [d_in, d_out], i.e. the transposed weights
    inits = [numpy_helper.from_array(lin.weight.detach().numpy().T.copy(), f"onnx::MatMul_{i}")
             for i, lin in enumerate(module)]
    nodes, x = [], "x"
    for i in range(4):
        nodes.append(helper.make_node("MatMul", [x, inits[i].name], [f"h{i}"]))
        x = f"h{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["b", COLS])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", COLS])],
                          initializer=inits)
    proto = helper.make_model(g)
    mapping, peak = _peak(X._name_initializers, proto, module)
    assert sorted(mapping.values()) == [f"{i}.weight" for i in range(4)]
    assert [n.input[1] for n in proto.graph.node] == [f"{i}.weight" for i in range(4)]
    # one weight's bytes as the protobuf accessor returns them, plus hash bands; the former
    # tobytes() of each weight and of its transpose made 3-4 weight-sized copies
    one = ROWS * COLS * 4
    assert peak < 1.5 * one, peak
