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
from vlcompress.progress import NULL
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


class Residual(torch.nn.Module):
    """x + fc2(relu(fc1(x))) then LayerNorm: a residual stream and a float reader of the input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)
        self.ln = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.ln(x + self.fc2(torch.relu(self.fc1(x))))


@pytest.fixture
def residual_onnx(tmp_path):
    m = Residual().eval()
    path = tmp_path / "res.onnx"
    torch.onnx.export(m, (torch.randn(4, 6, 16),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}}, dynamo=False)
    rng = np.random.default_rng(0)
    feeds = [{"x": (2 * rng.standard_normal((4, 6, 16))).astype(np.float32)} for _ in range(4)]
    return m, path, feeds


WEIGHTED = ("MatMul", "Gemm", "Conv")


@pytest.mark.parametrize("q,target", [("int8", "onnxruntime"), ("int8", "tensorrt"),
                                      ("fp8", "tensorrt")])
def test_qdq_only_on_inputs_and_weights_of_weighted_layers(residual_onnx, tmp_path, q, target):
    """issue 25 item 7: no Q/DQ on a MatMul/Gemm/Conv output, and no float op (the residual
    Add, LayerNorm, ReLU) reads a dequantized copy: only weighted layers read Q/DQ."""
    _, path, feeds = residual_onnx
    res = quantize_onnx(path, tmp_path / "q.onnx", q, calibration=feeds, target=target)
    g = onnx.load(str(res.path)).graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    q_nodes = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == 2  # the inputs of fc1 (x) and fc2 (relu output), nothing else
    for n in q_nodes:
        src = producer.get(n.input[0])
        assert src is None or src.op_type not in WEIGHTED, f"Q/DQ on {src.name}'s output"
        for dq in readers[n.output[0]]:
            assert dq.op_type == "DequantizeLinear"
            assert {r.op_type for r in readers[dq.output[0]]} <= set(WEIGHTED)
    add = [n for n in g.node if n.op_type == "Add" and "x" in n.input]
    assert add, "the residual Add reads the float input, not its dequantized copy"


def test_fp8_activation_scales_are_minmax(residual_onnx, tmp_path):
    """issue 25 item 14: fp8 activations are calibrated MinMax as documented: the scale of
    the input's QuantizeLinear is max |x| over the calibration feeds / 448."""
    _, path, feeds = residual_onnx
    res = quantize_onnx(path, tmp_path / "f8.onnx", "fp8", calibration=feeds, target="tensorrt")
    model = onnx.load(str(res.path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qx = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    amax = max(float(np.abs(f["x"]).max()) for f in feeds)
    assert float(init[qx.input[1]]) == pytest.approx(amax / 448.0, rel=1e-6)


@pytest.mark.parametrize("q", ["int8", "fp8"])
def test_tensorrt_qdq_on_the_fp16_graph(residual_onnx, tmp_path, q):
    """issue 25 item 8: for TensorRT int8 / fp8 engines the float parts of the QDQ graph are
    fp16 (scales, biases, activations between the pairs), like the fp16 engines compared with."""
    m, path, feeds = residual_onnx
    f32 = quantize_onnx(path, tmp_path / "a.onnx", q, calibration=feeds, target="tensorrt")
    f16 = quantize_onnx(path, tmp_path / "b.onnx", q, calibration=feeds, target="tensorrt",
                        float16=True)
    model = onnx.load(str(f16.path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["vlcompress.precision"] == "fp16" and meta["vlcompress.quantize"] == q
    init = {t.name: t for t in model.graph.initializer}
    F16 = onnx.TensorProto.FLOAT16
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert init[n.input[1]].data_type == F16, n.name  # fp16 scales: fp16 around pairs
    biases = [init[x] for n in model.graph.node if n.op_type == "Add" for x in n.input
              if x in init]
    assert biases and all(t.data_type == F16 for t in biases)
    assert len(quantized_weights(model)) == 2  # both weights still int8 / fp8 behind DQ
    if q == "int8":  # ONNX Runtime CPU runs it; close to the fp32-graph QDQ
        import onnxruntime as ort

        def run(p):
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            return sess.run(None, feeds[0])[0]

        a, b = run(f32.path), run(f16.path)
        assert np.abs(a - b).max() < 0.05
    with pytest.raises(ConfigError, match="float16 QDQ is for int8 / fp8 for TensorRT"):
        quantize_onnx(path, tmp_path / "c.onnx", "int8", calibration=feeds, float16=True)


def test_run_quantizes_for_the_runtime_it_times():
    """issue 25 items 6, 8, 10: each runtime gets files it runs as quantized, or a refusal
    before any work."""
    from vlcompress.exporters.quantize import quantize_target
    from vlcompress.pipeline import RunConfig
    from vlcompress.quantized_variants import quantize_float16

    ort_trt = RunConfig(engine="onnxruntime-trt", quantize="int8")
    assert quantize_target(ort_trt.latency_config.runtime_entry) == "tensorrt"  # zero points 0
    assert quantize_float16(ort_trt) == ort_trt.onnx_fp16
    with pytest.raises(ConfigError) as ei:
        RunConfig(engine="onnxruntime-trt", quantize="fp8")
    assert "--quantize fp8 cannot run on runtime onnxruntime-trt" in str(ei.value)
    assert "\n" not in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        RunConfig(engine="onnxruntime", device="cuda", quantize="int8")
    assert "CUDA provider has no int8 kernels" in str(ei.value) and "\n" not in str(ei.value)
    RunConfig(engine="onnxruntime", device="cuda", quantize="fp16")  # fp16 runs there
    trt = RunConfig(engine="trt", quantize="int8")
    assert quantize_float16(trt) and not quantize_float16(RunConfig(quantize="int8"))


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
    for opt in (["--quantize-target", "tensorrt"], ["--quantize-method", "dynamic"]):
        r = CliRunner().invoke(app, ["export", "tiny-clip", *opt, "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and f"{opt[0]} {opt[1]} sets how --quantize quantizes" in r.output
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

    cfg = RunConfig(pattern="structured", target_speedup=2.0)
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


# --------------------------------------------------------------------------------------------
# --target-speedup: intervals, the full timing, the shipped model, the verdict (issue 25 item 9)
# --------------------------------------------------------------------------------------------
def _interval_latency(point_at, half_width):
    """A fake runtime whose speedup at ``s`` is ``point_at(s)`` +- ``half_width``."""
    calls = []

    def measure(s):
        calls.append(s)
        p = point_at(s)
        return Candidate(s, p, None, {}, (p - half_width, p + half_width))

    return measure, calls


def test_search_judges_by_the_interval_not_the_point():
    # 1/(1-0.6) = 2.5 reaches 2.5 as a point, but its interval (2.3-2.7) does not
    measure, _ = _interval_latency(lambda s: 1.0 / (1.0 - s), 0.2)
    assert search_sparsity(2.5, measure).sparsity == pytest.approx(0.7)
    with pytest.raises(TargetUnreachableError, match=r"interval 4\.80-5\.20x"):
        search_sparsity(5.0, measure)  # 0.8 -> 5.0x as a point: not enough


def test_search_steps_up_when_the_full_timing_misses():
    brief, _ = _fake_latency(lambda s: 100.0 * (1 - s))  # optimistic: 0.6 -> 2.5x
    full, confirmed = _interval_latency(lambda s: 0.8 / (1.0 - s), 0.05)  # 0.6 -> 2.0x
    res = search_sparsity(2.5, brief, confirm=full)
    assert confirmed == [0.6, 0.7] and res.sparsity == pytest.approx(0.7)  # 0.7 -> 2.67x
    assert [c.sparsity for c in res.confirmations] == [0.6, 0.7]
    assert res.to_dict()["confirmations"][0]["interval"] == [1.95, 2.05]
    never, _ = _interval_latency(lambda s: 1.5, 0.05)
    with pytest.raises(TargetUnreachableError, match="out of reach in the full timing"):
        search_sparsity(2.5, brief, confirm=never)


def test_final_speedup_judges_the_interval():
    from vlcompress.speedup_search import final_speedup

    rng = np.random.default_rng(0)
    dense = list(100 + 30 * rng.standard_normal(12))
    pruned = list(40 + 12 * rng.standard_normal(12))  # about 2.5x, widely spread
    rows = [{"batch": 8, "tower": "vision",
             "variants": {"dense": {"ms": {"p50": float(np.median(dense))}, "samples_ms": dense},
                          "pruned_int8": {"ms": {"p50": float(np.median(pruned))},
                                          "samples_ms": pruned}}}]
    fin = final_speedup(rows, "int8", 2.4)["final"]
    lo, hi = fin["interval"]
    assert lo < 2.4 <= fin["speedup"] < hi and fin["reached"] is False  # point alone passes
    assert final_speedup(rows, "int8", lo * 0.99)["final"]["reached"] is True


def test_target_speedup_with_sparsity_is_refused(tmp_path):
    from typer.testing import CliRunner

    from vlcompress.cli import app
    from vlcompress.pipeline import RunConfig

    with pytest.raises(ConfigError, match="chooses the sparsity; --sparsity 0.5 is not allowed"):
        RunConfig(pattern="structured", sparsity=0.5, target_speedup=2.0)
    r = CliRunner().invoke(app, ["prune-export", "--pattern", "structured", "--sparsity", "0.3",
                                 "--target-speedup", "2", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--sparsity 0.3 is not allowed" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("reached", [True, False])
def test_cli_prints_the_search_and_exits_1_on_a_miss(monkeypatch, tmp_path, reached):
    from typer.testing import CliRunner

    import vlcompress.pipeline as pipeline
    from vlcompress.cli import app

    def fake_prune_export(cfg, progress=None):
        return {"model": {"name": "tiny-clip"}, "prune": {"method": "magnitude",
                "pattern": "structured", "achieved": 0.5, "per_modality": {}, "seconds": 0.1},
                "target_speedup": {
                    "target_speedup": 2.0, "chosen_sparsity": 0.5, "confidence": 0.95,
                    "candidates": [{"sparsity": 0.8, "speedup": 3.1, "interval": [2.9, 3.3]},
                                   {"sparsity": 0.5, "speedup": 2.2, "interval": [2.1, 2.3]}],
                    "confirmations": [{"sparsity": 0.5, "speedup": 2.15,
                                       "interval": [2.05, 2.25]}],
                    "final": {"batch": 8, "variant": "pruned", "speedup": 2.1 if reached else 1.9,
                              "interval": [2.02, 2.2] if reached else [1.8, 2.05],
                              "reached": reached}}}

    monkeypatch.setattr(pipeline, "prune_export", fake_prune_export)
    monkeypatch.setattr("vlcompress.report.console_tables", lambda report: [])
    r = CliRunner().invoke(app, ["prune-export", "--pattern", "structured", "--target-speedup",
                                 "2", "--out", str(tmp_path / "o")])
    assert "0.8 -> 3.10x [2.90-3.30]" in r.output and "chose structured sparsity 0.5" in r.output
    assert ("REACHED" if reached else "MISSED") in r.output
    assert r.exit_code == (0 if reached else 1), r.output
    r = CliRunner().invoke(app, ["prune-export", "--pattern", "structured", "--target-speedup",
                                 "2", "--json", "--out", str(tmp_path / "o")])
    assert r.exit_code == (0 if reached else 1)


def test_search_prunes_candidates_like_the_run(monkeypatch, tiny_random_clip, calib_small,
                                              tmp_path):
    """The searched model is the shipped one: the user's --method-option and
    --skip-incompatible reach every candidate's pruning."""
    import sys
    from types import SimpleNamespace

    from vlcompress.pipeline import RunConfig, export_examples
    from vlcompress.speedup_search import run_search

    seen = {}

    class Stop(Exception):
        pass

    def spy(vlm, method, sparsity, pattern, **kw):
        seen.update(kw, method=method, sparsity=sparsity, pattern=pattern)
        raise Stop

    monkeypatch.setattr(sys.modules["vlcompress.prune"], "prune", spy)  # the package's
    # ``prune`` attribute is the function, so the module is taken from sys.modules
    cfg = RunConfig(method="upop", pattern="structured", target_speedup=2.0,
                    skip_incompatible=True, method_options={"search_steps": 3})
    example, check = export_examples(calib_small)
    dense = SimpleNamespace(paths={t: tmp_path / f"{t}.onnx" for t in tiny_random_clip.towers})
    with pytest.raises(Stop):
        run_search(cfg, tiny_random_clip, calib_small, calib_small, dense, None, None, example,
                   check, tmp_path / "work", NULL)
    assert seen["method_options"]["search_steps"] == 3 and seen["skip_incompatible"] is True
    from vlcompress.speedup_search import allowed_grid

    assert seen["pattern"] == "structured"
    assert seen["sparsity"] == allowed_grid(tiny_random_clip, cfg)[-1]  # the highest first


def test_two_four_precheck_refuses_the_build(mlp_onnx, tmp_path):
    """issue 25 item 14: the 2:4 check of the (quantized) weights before a TensorRT build is an
    error naming the weight, raised before TensorRT or a GPU is needed (it was a warning)."""
    from vlcompress.errors import ExportError, MissingDependencyError
    from vlcompress.exporters.tensorrt import build_engine

    _, path, feeds = mlp_onnx
    res = quantize_onnx(path, tmp_path / "q.onnx", "int8", calibration=feeds, target="tensorrt")
    model = onnx.load(str(res.path))
    t = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8
             and len(t.dims) == 2)
    arr = numpy_helper.to_array(t).copy()
    arr[arr == 0] = 1
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    name = t.name[: -len("_quantized")]
    with pytest.raises(ExportError, match=rf"not 2:4 in the int8 QDQ ONNX bad\.onnx \(e\.g\. "
                                          rf"{name}\)") as ei:
        build_engine(tmp_path / "bad.onnx", tmp_path / "e.engine", sparse=True,
                     batch_sizes=(1,), pruned=[name])
    assert "\n" not in str(ei.value) and not (tmp_path / "e.engine").exists()
    if not torch.cuda.is_available():  # a 2:4-clean file gets past the check to the GPU
        with pytest.raises(MissingDependencyError):
            build_engine(res.path, tmp_path / "e.engine", sparse=True, batch_sizes=(1,))


def test_node_placement_reads_where_nodes_ran(mlp_onnx, tmp_path, monkeypatch):
    """issue 25 item 10: where ONNX Runtime ran the quantized nodes is read from the session's
    profile, not from its first provider; integer kernels are counted, and a node handed to
    another provider is said."""
    import vlcompress.quantized_variants as qv

    _, path, feeds = mlp_onnx
    res = quantize_onnx(path, tmp_path / "q.onnx", "int8", calibration=feeds)
    assert sum(res.quantized_layers.values()) == 2
    pl = qv.node_placement(res.path, ("CPUExecutionProvider",), feeds[0])
    assert pl["int8_kernels"] == 2 and pl["handed_elsewhere"] == {}
    assert set(pl["ran"]) == {"CPUExecutionProvider"}
    info = {"pruned": {"mlp": res.to_dict()}}
    paths = {"pruned": {"mlp": res.path}}
    cpu, trt = get_runtime("onnxruntime"), get_runtime("onnxruntime-trt")
    placed, problems = qv.placement_section(cpu, paths, {("mlp", 4): feeds[0]}, info)
    assert placed["pruned"]["mlp"]["int8_kernels"] == 2 and problems == []
    # float MatMuls where int8 was quantized, and nodes the TensorRT provider handed on
    f32 = qv.node_placement(path, ("CPUExecutionProvider",), feeds[0])
    monkeypatch.setattr(qv, "node_placement", lambda *a: f32)
    _, problems = qv.placement_section(cpu, paths, {("mlp", 4): feeds[0]}, info)
    assert problems == ["pruned mlp: 0 of 2 quantized MatMul/Gemm layers ran with integer "
                        "kernels on the CPU provider"]
    handed = {**pl, "first_provider": "TensorrtExecutionProvider",
              "handed_elsewhere": {"CUDAExecutionProvider": ["DequantizeLinear", "MatMul"]}}
    monkeypatch.setattr(qv, "node_placement", lambda *a: handed)
    _, problems = qv.placement_section(trt, paths, {("mlp", 4): feeds[0]}, info)
    assert problems == ["pruned mlp: DequantizeLinear, MatMul ran on CUDAExecutionProvider, "
                        "not TensorrtExecutionProvider"]
    assert qv.placement_section(get_runtime("trt"), paths, {}, info) is None  # engines: not ORT
