"""Quantization on top of sparsity: QDQ placement, per-channel scales, 2:4 survival, parity
with a fake-quantized PyTorch reference, the --target-speedup search, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from vlcompress.errors import ConfigError
from vlcompress.exporters.onnx import check_nm
from vlcompress.exporters.quantize import (
    check_nm_quantized,
    check_quantize_runtime,
    quantize_onnx,
    quantized_weights,
)
from vlcompress.runtime.registry import get_runtime
from vlcompress.speedup_search import (
    Candidate,
    TargetUnreachableError,
    check_target_speedup,
    search_sparsity,
)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _two_four(w: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest of every 4 consecutive input columns."""
    g = w.reshape(w.shape[0], -1, 4)
    idx = g.abs().argsort(-1)[..., :2]
    return g.scatter(-1, idx, 0.0).reshape_as(w)


@pytest.fixture
def mlp_onnx(tmp_path):
    m = MLP().eval()
    with torch.no_grad():
        m.fc1.weight.copy_(_two_four(m.fc1.weight))
        m.fc2.weight.copy_(_two_four(m.fc2.weight))
    x = torch.randn(4, 6, 16)
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(m, (x,), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 6, 16)).astype(np.float32)} for _ in range(4)]
    return m, path, feeds


def test_qdq_placement_and_per_channel_scales(mlp_onnx, tmp_path):
    _, path, feeds = mlp_onnx
    res = quantize_onnx(path, tmp_path / "q.onnx", "int8", calibration=feeds)
    model = onnx.load(str(res.path))
    w = quantized_weights(model)
    assert len(w) == 2  # both Linear weights, nothing else
    for name, info in w.items():
        assert info["array"].dtype == np.int8
        d_out = info["array"].shape[1 - info["input_axis"]]
        assert info["scale"].shape == (d_out,), name  # one scale per output channel
        assert info["axis"] == 1 - info["input_axis"]
        assert not np.any(info["zero_point"])  # symmetric weights: 0 stays 0
    # activations: Q/DQ pairs, uint8 for ORT CPU, in front of both weight MatMuls
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes and all(numpy_helper.to_array(next(
        t for t in model.graph.initializer if t.name == n.input[2])).dtype == np.uint8
        for n in q_nodes)
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "MatMul":
            assert all(producer[i].op_type == "DequantizeLinear" for i in n.input)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["vlcompress.quantize"] == "int8"
    assert {n.op_type for n in model.graph.node} >= {"Relu"}  # ReLU stays in float


def test_two_four_survives_quantization(mlp_onnx, tmp_path):
    _, path, feeds = mlp_onnx
    assert check_nm(path) == []
    for method, kw in (("static", {"calibration": feeds}), ("dynamic", {})):
        res = quantize_onnx(path, tmp_path / f"{method}.onnx", "int8", method=method, **kw)
        assert check_nm_quantized(res.path) == [], method
        assert len(quantized_weights(onnx.load(str(res.path)))) == 2
    # and the check can fail: a dense weight is reported
    model = onnx.load(str(tmp_path / "static.onnx"))
    t = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8
             and len(t.dims) == 2)
    arr = numpy_helper.to_array(t).copy()
    arr[arr == 0] = 1
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    assert len(check_nm_quantized(tmp_path / "broken.onnx")) == 1


def _torch_qdq_reference(model, feed):
    """Run a QDQ graph in PyTorch: QuantizeLinear -> DequantizeLinear pairs become
    ``torch.fake_quantize_per_tensor_affine`` (activations, uint8) and per-channel int8
    weights are dequantized with their scales; float ops run in torch (float64)."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    env = {k: torch.from_numpy(np.array(v)) for k, v in init.items()}
    env.update({k: torch.from_numpy(v) for k, v in feed.items()})
    for n in model.graph.node:
        ins = [env[i] for i in n.input if i]
        if n.op_type == "QuantizeLinear":
            s, z = float(ins[1]), int(ins[2])
            out = torch.fake_quantize_per_tensor_affine(ins[0].float(), s, z, 0, 255)
            env[n.output[0]] = ("fq", out)
            continue
        ins = [i[1] if isinstance(i, tuple) else i for i in ins]
        if n.op_type == "DequantizeLinear":
            x = ins[0]
            if x.dtype == torch.int8:  # a weight, per channel
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                shape = [1] * x.dim()
                shape[axis] = -1
                out = (x.double() - ins[2].double().reshape(shape)) * ins[1].double().reshape(shape)
            else:
                out = x.double()  # already fake-quantized
        elif n.op_type == "MatMul":
            out = ins[0].double() @ ins[1].double()
        elif n.op_type == "Add":
            out = ins[0].double() + ins[1].double()
        elif n.op_type == "Relu":
            out = torch.relu(ins[0])
        else:
            raise AssertionError(f"reference lacks op {n.op_type}")
        env[n.output[0]] = out
    y = env[model.graph.output[0].name]
    return (y[1] if isinstance(y, tuple) else y).double().numpy()


def test_parity_with_fake_quantized_reference(mlp_onnx, tmp_path):
    """ONNX Runtime's int8 graph vs the same graph fake-quantized in PyTorch: within two
    output quantization steps (ORT requantizes in integer arithmetic, rounding differs), and
    much closer than the int8 graph is to the float model."""
    import onnxruntime as ort

    m, path, feeds = mlp_onnx
    res = quantize_onnx(path, tmp_path / "q.onnx", "int8", calibration=feeds)
    model = onnx.load(str(res.path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out_step = max(float(init[n.input[1]]) for n in model.graph.node
                   if n.op_type == "QuantizeLinear")
    for feed in feeds[:2]:
        ref = _torch_qdq_reference(model, feed)
        got = ort.InferenceSession(str(res.path)).run(None, feed)[0]
        dense = m(torch.from_numpy(feed["x"])).detach().numpy()
        err = np.abs(got - ref).max()
        assert err <= 2 * out_step, (err, out_step)
        assert err < np.abs(got - dense).max()


def test_tensorrt_qdq_is_symmetric_int8(mlp_onnx, tmp_path):
    """TensorRT explicit quantization: int8 activations with zero points 0, dedicated Q/DQ
    pairs (the GPU boundary: building the engine needs a GPU)."""
    _, path, feeds = mlp_onnx
    res = quantize_onnx(path, tmp_path / "trt.onnx", "int8", calibration=feeds, target="tensorrt")
    model = onnx.load(str(res.path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            zp = init[n.input[2]]
            assert zp.dtype == np.int8 and not np.any(zp)
    assert check_nm_quantized(res.path) == []


def _fake_latency(ms_at):
    """A fake runtime: known latency per sparsity (dense 100 ms)."""
    calls = []

    def measure(s):
        calls.append(s)
        return Candidate(s, 100.0 / ms_at(s), 1.0 - s / 2)

    return measure, calls


def test_search_finds_lowest_sparsity_reaching_target():
    measure, calls = _fake_latency(lambda s: 100.0 * (1 - s))  # speedup 1 / (1 - s)
    res = search_sparsity(2.5, measure)  # 1/(1-0.6) = 2.5
    assert res.sparsity == pytest.approx(0.6)
    assert len(calls) <= 6 and calls[0] == 0.8  # the highest first, then bisection
    assert {c.sparsity for c in res.candidates} == set(calls)


def test_search_stops_when_out_of_reach():
    measure, calls = _fake_latency(lambda s: 100.0 * (1 - s / 2))  # at most 1.67x
    with pytest.raises(TargetUnreachableError, match=r"best reached is 1\.67x at .* 0\.8"):
        search_sparsity(2.5, measure)
    assert calls == [0.8]


@pytest.mark.parametrize("bad", ["fast", "1", "0.5", "-2", "nan", True])
def test_target_speedup_bad_values(bad):
    with pytest.raises(ConfigError, match="--target-speedup"):
        check_target_speedup(bad)


def test_quantize_bad_input():
    from vlcompress.pipeline import RunConfig

    with pytest.raises(ConfigError, match="unknown --quantize 'int4'; allowed: none, int8"):
        RunConfig(quantize="int4")
    with pytest.raises(ConfigError, match="cannot run on runtime torch/cpu/fp32"):
        RunConfig(quantize="int8", engine="torch")
    with pytest.raises(ConfigError, match="fp8 cannot run on runtime onnxruntime/cpu"):
        RunConfig(quantize="fp8")
    with pytest.raises(ConfigError, match="--target-speedup"):
        RunConfig(pattern="structured", target_speedup="fast")
    with pytest.raises(ConfigError, match="allowed: --pattern structured"):
        RunConfig(pattern="2:4", target_speedup=2.0)
    check_quantize_runtime("int8", get_runtime("onnxruntime"))  # fine


def test_cli_refuses_bad_quantize(tmp_path):
    from typer.testing import CliRunner

    from vlcompress.cli import app

    r = CliRunner().invoke(app, ["prune-export", "--quantize", "int4", "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown --quantize 'int4'" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["prune-export", "--pattern", "structured", "--target-speedup",
                                 "0.9", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--target-speedup '0.9'" in r.output


# --------------------------------------------------------------------------------------------
# --quantize on `export` and `sweep`
# --------------------------------------------------------------------------------------------
def test_export_writes_quantized_beside_fp32(tiny_random_clip, tmp_path):
    import json

    from vlcompress.api import export

    res = export(tiny_random_clip, tmp_path / "o", quantize="int8")
    out = tmp_path / "o"
    assert set(res.quantized) == {"vision", "text"}
    for tower, q in res.quantized.items():
        assert (out / f"{tower}.onnx").is_file() and (out / f"{tower}.int8.onnx").is_file()
        assert q["path"] == str(out / f"{tower}.int8.onnx")
        assert q["method"] == "static" and q["quantized_nodes"]["DequantizeLinear"] > 0
        assert q["vs_pytorch"]["min_cosine"] > 0.99  # int8 differs, but not by much
        w = quantized_weights(onnx.load(q["path"]))
        assert w and all(np.asarray(x["scale"]).size > 1 for x in w.values()
                         if x["array"].ndim == 2)  # per channel
    assert json.loads((out / "quantize.json").read_text()).keys() == res.quantized.keys()
    assert res.to_dict()["quantized"]["vision"]["quantize"] == "int8"


@pytest.mark.parametrize("kw, needle", [
    ({"quantize": "int4"}, "unknown --quantize 'int4'"),
    ({"quantize": "fp8"}, "fp8 is for TensorRT only"),
    ({"quantize": "int8", "fp16": True}, "drop --fp16"),
    ({"quantize": "int8", "quantize_method": "dynamic", "quantize_target": "tensorrt"},
     "dynamic int8 runs on onnxruntime only"),
    ({"quantize": "int8", "quantize_target": "openvino"}, "unknown quantization target"),
])
def test_export_refuses_bad_quantize(kw, needle, tmp_path):
    from vlcompress.api import export

    with pytest.raises(ConfigError, match=needle):
        export("tiny-clip", tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


def test_cli_export_and_sweep_refuse_bad_quantize(tmp_path):
    from typer.testing import CliRunner

    from vlcompress.cli import app

    r = CliRunner().invoke(app, ["export", "tiny-clip", "--quantize", "fp8", "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2 and "fp8 is for TensorRT only" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["sweep", "--quantize", "int8", "--engine", "torch", "--out",
                                 str(tmp_path / "s")])
    assert r.exit_code == 2 and "--quantize int8 cannot run on runtime torch/cpu/fp32" in r.output
    assert not (tmp_path / "s").exists()
    r = CliRunner().invoke(app, ["sweep", "--quantize", "fp8", "--no-latency", "--out",
                                 str(tmp_path / "s")])
    assert r.exit_code == 2 and "allowed: none, int8, fp16" in r.output


def test_sweep_quantized_variants(tmp_path):
    from conftest import make_tiny_random_clip

    from vlcompress.sweep import sweep

    make_tiny_random_clip().save(tmp_path / "m")
    res = sweep(str(tmp_path / "m"), "magnitude", "0.5", "structured", out=tmp_path / "s",
                calibration_size=16, eval_size=16, batch_sizes="1", warmup=1, iterations=2,
                quantize="int8")
    assert [(r["setting"], r["quantize"]) for r in res["rows"]] == [
        ("structured 50%", "none"), ("structured 50% + int8", "int8")]
    f, q = res["rows"]  # int8 on top moves fidelity to the dense model little
    assert abs(q["image_cosine"] - f["image_cosine"]) < 0.02 and q["achieved"] == f["achieved"]
    assert res["quantize"]["quantize"] == "int8" and "image_cosine" in res["quantize"]["dense"]
    lat = {(r["setting"], r["tower"]): r for r in res["latency"]}
    assert set(lat) == {(s, t) for s in ("structured 50%", "structured 50% + int8",
                                         "dense + int8") for t in ("vision", "text")}
    for t in ("vision", "text"):  # one interleaved run: the same dense fp32 timing
        a, b = lat[("structured 50%", t)], lat[("structured 50% + int8", t)]
        assert a["dense_ms"] == b["dense_ms"] == lat[("dense + int8", t)]["dense_ms"]
        assert b["gain_over_quantized"] == pytest.approx(
            a["variants"]["dense_int8"]["ms"]["p50"] / a["variants"]["pruned_int8"]["ms"]["p50"])
        assert "samples_ms" not in a["variants"]["dense"]
    md = (tmp_path / "s" / "sweep.md").read_text()
    assert "| dense | int8 |" in md and "| magnitude | structured 50% + int8 |" in md
    assert "over dense int8" in md and "| dense + int8 | vision | 1 |" in md
    for png in ("accuracy_vs_sparsity.png", "latency_vs_batch.png"):
        assert (tmp_path / "s" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("how", ["deepcopy", "dense_copy"])
def test_search_copies_are_independent_after_select_towers(tiny_random_clip, calib_small, how):
    """--tower vision: pruning a copy must not slice the dense model (the tower selection
    used to be a closure over the original, which copies kept)."""
    import copy

    from vlcompress.distill import dense_copy
    from vlcompress.prune import prune

    vlm = tiny_random_clip.select_towers("vision")
    before = [tuple(ly.module.weight.shape) for ly in vlm.prunable_layers()]
    v = copy.deepcopy(vlm) if how == "deepcopy" else dense_copy(vlm)
    assert v.towers == ("vision",)
    prune(v, "magnitude", 0.5, "structured", calibration=calib_small)
    assert [tuple(ly.module.weight.shape) for ly in vlm.prunable_layers()] == before
    assert [tuple(ly.module.weight.shape) for ly in v.prunable_layers()] != before
    assert {ly.modality for ly in v.prunable_layers()} == {"vision"}


def test_search_grid_drops_sparsities_the_model_cannot_take(tiny_random_clip):
    from vlcompress.pipeline import RunConfig
    from vlcompress.speedup_search import allowed_grid

    cfg = RunConfig(pattern="structured", sparsity=0.5, target_speedup=2.0)
    grid = allowed_grid(tiny_random_clip, cfg)  # 4 heads: 0.8 would remove every head
    assert grid and max(grid) <= 0.75 and 0.5 in grid


def test_final_speedup_checks_the_full_timing():
    """The chosen sparsity is re-judged on the run's full timing (largest batch, towers
    summed, the deployed variant), so an optimistic brief timing cannot pass silently."""
    from vlcompress.speedup_search import final_speedup

    def ms(p50):
        return {"ms": {"p50": p50}}

    quant = [{"batch": 1, "tower": "vision", "variants": {"dense": ms(10.0), "pruned_int8": ms(9.0)}},
             {"batch": 8, "tower": "vision", "variants": {"dense": ms(80.0), "pruned_int8": ms(20.0)}},
             {"batch": 8, "tower": "text", "variants": {"dense": ms(20.0), "pruned_int8": ms(20.0)}}]
    got = final_speedup(quant, "int8", 2.5)["final"]
    assert got == {"batch": 8, "variant": "pruned_int8", "speedup": 2.5, "reached": True}
    assert final_speedup(quant, "int8", 2.6)["final"]["reached"] is False
    plain = [{"batch": 8, "tower": "vision", "dense_ms": {"p50": 30.0}, "pruned_ms": {"p50": 10.0}}]
    assert final_speedup(plain, "none", 2.5)["final"]["speedup"] == 3.0
    assert final_speedup([], "none", 2.5) == {}
