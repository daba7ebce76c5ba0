"""TensorRT exporter: everything that does not need a GPU (log parsing, build plan, builder
config on a recording fake, 2:4 check of fp16 weights, fp16 cosine check, error paths), and
an end-to-end build marked ``gpu``."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vlcompress.errors import ConfigError, ExportError, MissingDependencyError
from vlcompress.exporters.onnx import check_nm, convert_fp16, export_tower, validate_tower
from vlcompress.exporters.tensorrt import (
    NO_SPARSE_WARNING,
    NOT_ELIGIBLE_WARNING,
    BuildPlan,
    apply_plan,
    build_engine,
    embedding_agreement,
    make_logger,
    network_flags,
    nm_violations,
    onnx_inputs,
    parse_sparsity_log,
    plan_build,
    sparsity_warnings,
)

HAS_GPU = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None

# --------------------------------------------------------------------------------------------
# recorded builder logs. Formats as TensorRT prints them: trtexec 8.x/10.x
# ("[date] [I] [TRT] (Sparsity) ...", NVIDIA/TensorRT#2169, #4054, pytorch/TensorRT#1340),
# the old Python default logger ("[TensorRT] INFO: ...", NVIDIA/TensorRT#1403), and what our
# capturing ILogger records ("[INFO] ..."). Layer names are the ONNX node names TensorRT keeps,
# fused layers joined with " + ".
# --------------------------------------------------------------------------------------------
TRTEXEC_SPARSE = """\
[07/19/2022-11:58:20] [I] [TRT] Total Activation Memory: 7864832
[07/19/2022-11:58:20] [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51, MatMul_69, Conv_619 + Relu_620, Gemm_725
[07/19/2022-11:58:20] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: MatMul_51, Conv_619 + Relu_620
[07/19/2022-11:58:20] [I] [TRT] [MemUsageChange] TensorRT-managed allocation in building engine: CPU +0, GPU +512, now: CPU 0, GPU 512 (MiB)
"""  # noqa: E501 - recorded log lines are long

TRTEXEC_NONE_PICKED = """\
[09/16/2022-09:55:37] [I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_51, MatMul_69
[09/16/2022-09:55:37] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:
[09/16/2022-09:55:38] [I] Engine built in 31.1935 sec.
"""

PY_LOGGER_EMPTY = """\
[TensorRT] INFO: Detected 1 inputs and 1 output network tensors.
[TensorRT] INFO: (Sparsity) Layers eligible for sparse math:
[TensorRT] INFO: (Sparsity) TRT inference plan picked sparse implementation for layers:
"""

CAPTURED_TRT10 = [
    "[INFO] [MemUsageChange] Init CUDA: CPU +2, GPU +0, now: CPU 180, GPU 1020 (MiB)",
    "[INFO] (Sparsity) Layers eligible for sparse math: /vision_model/encoder/layers.0/mlp/fc1/"
    "MatMul, /vision_model/encoder/layers.0/mlp/fc2/MatMul + /vision_model/encoder/layers.0/Add_1",
    "[INFO] (Sparsity) TRT inference plan picked sparse implementation for layers: /vision_model/"
    "encoder/layers.0/mlp/fc1/MatMul",
    "[WARNING] Weights [name=/vision_model/embeddings/patch_embedding/Conv.weight] had the "
    "following issues when converted to FP16",
]


def test_parse_trtexec_log():
    rep = parse_sparsity_log(TRTEXEC_SPARSE)
    assert rep.found
    assert rep.eligible == ["Conv_22", "MatMul_51", "MatMul_69", "Conv_619 + Relu_620", "Gemm_725"]
    assert rep.sparse == ["MatMul_51", "Conv_619 + Relu_620"]
    assert sparsity_warnings(rep, sparse=True) == []


def test_parse_none_picked_is_loud():
    rep = parse_sparsity_log(TRTEXEC_NONE_PICKED)
    assert rep.found and rep.n_eligible == 2 and rep.n_sparse == 0
    (w,) = sparsity_warnings(rep, sparse=True)
    assert w.startswith(NO_SPARSE_WARNING) and "2 layers were eligible" in w
    assert sparsity_warnings(rep, sparse=False) == []  # a dense build expects nothing


def test_parse_old_python_logger_nothing_eligible():
    rep = parse_sparsity_log(PY_LOGGER_EMPTY)
    assert rep.found and rep.eligible == [] and rep.sparse == []
    assert sparsity_warnings(rep, sparse=True) == [NOT_ELIGIBLE_WARNING]


def test_parse_captured_lines_with_onnx_paths():
    rep = parse_sparsity_log(CAPTURED_TRT10)
    assert rep.eligible == ["/vision_model/encoder/layers.0/mlp/fc1/MatMul",
                            "/vision_model/encoder/layers.0/mlp/fc2/MatMul + "
                            "/vision_model/encoder/layers.0/Add_1"]
    assert rep.sparse == ["/vision_model/encoder/layers.0/mlp/fc1/MatMul"]


def test_parse_merges_repeats_and_keeps_bracketed_commas():
    text = ("(Sparsity) Layers eligible for sparse math: {ForeignNode[a, b]}, MatMul_1\n"
            "(Sparsity) Layers eligible for sparse math: MatMul_1, MatMul_2\n")
    rep = parse_sparsity_log(text)
    assert rep.eligible == ["{ForeignNode[a, b]}", "MatMul_1", "MatMul_2"]
    assert rep.to_dict()["n_eligible"] == 3


def test_parse_without_sparsity_lines():
    rep = parse_sparsity_log("[I] [TRT] Loaded engine size: 507 MiB\n")
    assert not rep.found
    (w,) = sparsity_warnings(rep, sparse=True)
    assert "no (Sparsity) lines" in w


# --------------------------------------------------------------------------------------------
# synthetic ONNX graphs (fast): x[batch, 8] @ W[8, 8] (+ text-like [batch, sequence] input)
# --------------------------------------------------------------------------------------------
def _w24(rng, d_in=8, d_out=8):
    w = rng.standard_normal((d_in, d_out)).astype(np.float32)  # MatMul layout [d_in, d_out]
    for j in range(d_out):
        for g in range(0, d_in, 4):
            w[g:g + 2, j] = 0.0  # 2 zeros in each group of 4 input rows
    return w


def _wide_24_graph(rng, d: int):
    """Two 2:4 ``d x d`` MatMuls with a Relu between: wide enough for sparse kernels."""
    w1, w2 = (_w24(rng, d, d) * 0.02 for _ in range(2))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])
    y = helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["batch", d])
    return helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["embeds"], name="mm2")],
        "wide", [x], [y], [numpy_helper.from_array(w1, "layers.0.fc1.weight"),
                           numpy_helper.from_array(w2, "layers.0.fc2.weight")])


def _linear_model(w: np.ndarray, name="layers.0.fc1.weight", fp16=False, seq=False):
    dtype = TensorProto.FLOAT
    dims = ["batch", "sequence", w.shape[0]] if seq else ["batch", w.shape[0]]
    x = helper.make_tensor_value_info("x", dtype, dims)
    y = helper.make_tensor_value_info("embeds", dtype, dims[:-1] + [w.shape[1]])
    inputs = [x]
    if seq:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                    ["batch", "sequence"]))
    g = helper.make_graph([helper.make_node("MatMul", ["x", name], ["embeds"], name="mm")], "g",
                          inputs, [y], [numpy_helper.from_array(w, name)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return convert_fp16(m) if fp16 else m


def _save(model, path):
    onnx.save(model, str(path))
    return path


def test_onnx_inputs_and_precision(tmp_path):
    rng = np.random.default_rng(0)
    p32 = _save(_linear_model(_w24(rng)), tmp_path / "a.onnx")
    p16 = _save(_linear_model(_w24(rng), fp16=True), tmp_path / "b.onnx")
    specs, prec = onnx_inputs(p32)
    assert prec == "fp32"
    assert specs[0].name == "x" and specs[0].shape == (None, 8) and specs[0].dims[0] == "batch"
    assert onnx_inputs(p16)[1] == "fp16"


def test_plan_build_profiles_and_flags(tmp_path):
    p = _save(_linear_model(_w24(np.random.default_rng(0)), fp16=True, seq=True), tmp_path / "t.onnx")
    plan = plan_build(p, sparse=True, batch_sizes=(8, 1, 64), seq_len=77, workspace_gb=2)
    assert isinstance(plan, BuildPlan)
    # one profile per batch size, opt = that batch, each spanning every batch size
    assert [p["x"] for p in plan.profiles] == [((1, 1, 8), (b, 77, 8), (64, 77, 8))
                                               for b in (1, 8, 64)]
    assert plan.profiles[1]["attention_mask"] == ((1, 1), (8, 77), (64, 77))
    assert plan.builder_flags == ("SPARSE_WEIGHTS",)  # strongly typed: no FP16 flag
    assert plan.strongly_typed and plan.workspace_bytes == 2 << 30
    assert plan.batch_sizes == (1, 8, 64)
    d = plan.to_dict()
    assert d["builder_flags"] == ["SPARSE_WEIGHTS"] and d["profiles"][0]["x"][0] == [1, 1, 8]
    one = plan_build(p, sparse=False, batch_sizes=(1, 8), seq_len=16, per_batch_profiles=False)
    assert one.builder_flags == () and [q["x"][1] for q in one.profiles] == [(8, 16, 8)]
    weak = plan_build(p, sparse=False, batch_sizes=(4,), seq_len=16, strongly_typed=False)
    assert weak.builder_flags == ("FP16",)


def test_plan_build_errors(tmp_path):
    rng = np.random.default_rng(0)
    p32 = _save(_linear_model(_w24(rng)), tmp_path / "a.onnx")
    with pytest.raises(ConfigError, match="fp16"):
        plan_build(p32, sparse=True, batch_sizes=(1,))
    pseq = _save(_linear_model(_w24(rng), fp16=True, seq=True), tmp_path / "s.onnx")
    with pytest.raises(ConfigError, match="seq_len"):
        plan_build(pseq, sparse=False, batch_sizes=(1, 8))
    with pytest.raises(ConfigError, match="batch"):
        plan_build(pseq, sparse=False, batch_sizes=(0,), seq_len=8)
    with pytest.raises(ConfigError, match="workspace"):
        plan_build(pseq, sparse=False, batch_sizes=(1,), seq_len=8, workspace_gb=0)


# --------------------------------------------------------------------------------------------
# a fake tensorrt module: records what the builder config is told
# --------------------------------------------------------------------------------------------
class _Flag(int):
    pass


def fake_trt(version="10.7.0", strongly_typed=True, fp16=True):
    flags = SimpleNamespace(SPARSE_WEIGHTS="SPARSE_WEIGHTS")
    if fp16:
        flags.FP16 = "FP16"
    ndcf = SimpleNamespace(EXPLICIT_BATCH=_Flag(0))
    if strongly_typed:
        ndcf.STRONGLY_TYPED = _Flag(1)

    class Severity:
        pass

    for i, n in enumerate(("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")):
        setattr(Severity, n, SimpleNamespace(name=n, value=i))

    class ILogger:
        def __init__(self):
            self.base_init = True

    ILogger.Severity = Severity
    return SimpleNamespace(__version__=version, BuilderFlag=flags, NetworkDefinitionCreationFlag=ndcf,
                           MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"), ILogger=ILogger)


class Recorder:
    def __init__(self, name, calls):
        self._name, self._calls = name, calls

    def __getattr__(self, attr):
        def method(*args):
            self._calls.append((self._name, attr, args))
            if attr == "create_optimization_profile":
                return Recorder("profile", self._calls)
            return True
        return method


def test_apply_plan_on_fake_builder(tmp_path):
    p = _save(_linear_model(_w24(np.random.default_rng(0)), fp16=True, seq=True), tmp_path / "t.onnx")
    plan = plan_build(p, sparse=True, batch_sizes=(1, 8), seq_len=16, workspace_gb=1)
    calls = []
    apply_plan(plan, fake_trt(), Recorder("builder", calls), Recorder("config", calls))
    assert ("config", "set_memory_pool_limit", ("WORKSPACE", 1 << 30)) in calls
    assert ("config", "set_flag", ("SPARSE_WEIGHTS",)) in calls
    assert ("config", "set_flag", ("FP16",)) not in calls
    shapes = [c[2] for c in calls if c[:2] == ("profile", "set_shape")]
    assert shapes == [("x", (1, 1, 8), (1, 16, 8), (8, 16, 8)),
                      ("attention_mask", (1, 1), (1, 16), (8, 16)),
                      ("x", (1, 1, 8), (8, 16, 8), (8, 16, 8)),
                      ("attention_mask", (1, 1), (8, 16), (8, 16))]
    # each profile is created, filled and added in turn: two profiles, in batch order
    kinds = [c[:2] for c in calls if c[1] in ("create_optimization_profile",
                                              "add_optimization_profile")]
    assert kinds == [("builder", "create_optimization_profile"),
                     ("config", "add_optimization_profile")] * 2
    assert calls[-1][:2] == ("config", "add_optimization_profile")
    # dense: no flags at all
    calls.clear()
    apply_plan(plan_build(p, sparse=False, batch_sizes=(1,), seq_len=4), fake_trt(),
               Recorder("builder", calls), Recorder("config", calls))
    assert not [c for c in calls if c[1] == "set_flag"]


def test_apply_plan_missing_flag():
    plan = BuildPlan("m.onnx", (), ({},), sparse=False, strongly_typed=False, fp16_flag=True,
                     workspace_bytes=1, precision="fp32", batch_sizes=(1,))
    with pytest.raises(ExportError, match="FP16"):  # TensorRT 11 removed BuilderFlag.FP16
        apply_plan(plan, fake_trt("11.0.0", fp16=False), Recorder("b", []), Recorder("c", []))


def test_select_profile_runs_each_batch_on_its_own():
    from vlcompress.runtime.trt_runner import profile_opt_batches, select_profile

    opts = [1, 8, 64, 256]
    assert [select_profile(opts, b) for b in (1, 8, 64, 256)] == [0, 1, 2, 3]
    assert select_profile(opts, 32) == 2  # between profiles: the next larger opt
    assert select_profile(opts, 512) == 3 and select_profile([256], 1) == 0
    with pytest.raises(ValueError):
        select_profile([], 1)

    class Engine:  # what profile_opt_batches reads of an ICudaEngine
        num_optimization_profiles = 3

        def get_tensor_profile_shape(self, name, i):
            assert name == "pixel_values"
            b = (1, 8, 64)[i]
            return [(1, 3, 224, 224), (b, 3, 224, 224), (64, 3, 224, 224)]

    assert profile_opt_batches(Engine(), ["pixel_values"]) == [1, 8, 64]
    assert profile_opt_batches(Engine(), []) == []


def test_network_flags_by_version():
    assert network_flags(fake_trt("10.7.0"), True) == 1 << 1
    assert network_flags(fake_trt("10.7.0"), False) == 0
    assert network_flags(fake_trt("11.1.0"), True) == 0  # always strongly typed on 11
    with pytest.raises(ExportError, match=">= 10"):
        network_flags(fake_trt("8.6.1", strongly_typed=False), True)


def test_make_logger_captures_info_and_above():
    trt = fake_trt()
    seen = []
    lg = make_logger(trt, lambda sev, msg: seen.append((sev, msg)))
    assert isinstance(lg, trt.ILogger) and lg.base_init
    S = trt.ILogger.Severity
    lg.log(S.VERBOSE, "tactic timing")
    lg.log(S.INFO, "(Sparsity) Layers eligible for sparse math: MatMul_1")
    lg.log(S.ERROR, "boom")
    assert seen == [("INFO", "(Sparsity) Layers eligible for sparse math: MatMul_1"),
                    ("ERROR", "boom")]


# --------------------------------------------------------------------------------------------
# 2:4 of the fp16 weights TensorRT sees
# --------------------------------------------------------------------------------------------
def test_fp16_conversion_keeps_24(tmp_path):
    w = _w24(np.random.default_rng(1))
    p16 = _save(_linear_model(w, fp16=True), tmp_path / "m16.onnx")
    assert check_nm(p16) == [] and nm_violations(p16, ["layers.0.fc1"]) == []
    init = onnx.load(str(p16)).graph.initializer[0]
    assert init.data_type == TensorProto.FLOAT16
    np.testing.assert_array_equal(numpy_helper.to_array(init) == 0, w == 0)  # zeros exact


def test_fp16_rounding_only_ever_adds_zeros(tmp_path):
    rng = np.random.default_rng(2)
    w = _w24(rng)
    w[0, 0] = 1e-9  # a third nonzero in a group: not 2:4 in fp32 ...
    p32 = _save(_linear_model(w), tmp_path / "m32.onnx")
    p16 = _save(_linear_model(w, fp16=True), tmp_path / "m16.onnx")
    assert check_nm(p32) == ["layers.0.fc1.weight"]
    assert nm_violations(p16) == []  # ... but 1e-9 underflows to 0 in fp16: 2:4 for TensorRT
    x = rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-12, 3, 10000)
    x[rng.random(10000) < 0.5] = 0.0
    h = x.astype(np.float16)
    assert not np.any((h != 0) & (x == 0))  # never a zero turned nonzero
    assert np.any((h == 0) & (x != 0))  # tiny values do become zeros


def test_nm_violations_reports_only_pruned_layers(tmp_path):
    w = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)  # dense
    p16 = _save(_linear_model(w, name="proj.weight", fp16=True), tmp_path / "d.onnx")
    assert nm_violations(p16) == ["proj.weight"]
    assert nm_violations(p16, ["layers.0.fc1"]) == []  # not a pruned layer: not a violation
    assert nm_violations(p16, ["proj"]) == ["proj.weight"]


# --------------------------------------------------------------------------------------------
# fp16 validation: tolerance AND cosine
# --------------------------------------------------------------------------------------------
def test_cosine_catches_drift_that_tolerance_lets_through():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 64)) * 0.01  # small embeddings (e.g. normalised)
    drift = ref + rng.uniform(-0.015, 0.015, (4, 64))  # every entry within atol
    r = embedding_agreement(drift, ref, atol=2e-2, rtol=2e-2, min_cosine=0.99)
    assert r["within_tolerance"] and not r["cosine_ok"] and not r["ok"]
    assert r["min_cosine"] < 0.9
    good = embedding_agreement(ref + 1e-5, ref, atol=2e-2, rtol=2e-2, min_cosine=0.99)
    assert good["ok"] and good["min_cosine"] > 0.99
    bad_shape = embedding_agreement(ref[:2], ref, atol=1, rtol=1, min_cosine=None)
    assert not bad_shape["ok"] and "shape" in bad_shape["error"]
    nan = embedding_agreement(np.full_like(ref, np.nan), ref, atol=1, rtol=1, min_cosine=None)
    assert not nan["ok"]


@pytest.fixture(scope="module")
def tiny_fp16_vision(tmp_path_factory):
    from conftest import make_tiny_random_clip

    from vlcompress.data import load_calibration

    vlm = make_tiny_random_clip()
    batches = iter(load_calibration("shapes", n=7, batch_size=4, seed=0).batches())
    example, check = next(batches), next(batches)
    path = export_tower(vlm, "vision", tmp_path_factory.mktemp("fp16") / "vision.onnx", example,
                        fp16=True)
    return vlm, path, check


def test_cosine_check_catches_corrupted_fp16_model(tiny_fp16_vision, tmp_path):
    vlm, path, check = tiny_fp16_vision
    ok = validate_tower(vlm, "vision", path, check, atol=2e-2, rtol=2e-2, min_cosine=0.99)
    assert ok["ok"] and ok["min_cosine"] > 0.99
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    hit = 0
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT16 and "fc2" in t.name:
            a = numpy_helper.to_array(t).astype(np.float32)
            a = a * rng.choice([-1.0, 1.0], size=a.shape)  # sign flips: a drifting engine
            t.CopyFrom(numpy_helper.from_array(a.astype(np.float16), t.name))
            hit += 1
    assert hit >= 1
    bad = tmp_path / "corrupt.onnx"
    onnx.save(model, str(bad))
    res = validate_tower(vlm, "vision", bad, check, atol=2e-2, rtol=2e-2, min_cosine=0.99)
    assert not res["ok"] and res["min_cosine"] < 0.99


# --------------------------------------------------------------------------------------------
# error paths without a GPU / TensorRT
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU message")
def test_build_engine_without_gpu_is_one_sentence(tmp_path):
    p = _save(_linear_model(_w24(np.random.default_rng(0)), fp16=True), tmp_path / "m.onnx")
    with pytest.raises(MissingDependencyError) as ei:
        build_engine(p, tmp_path / "m.engine", sparse=True, batch_sizes=(1, 8))
    msg = str(ei.value)
    assert "CUDA" in msg and "\n" not in msg
    assert not (tmp_path / "m.engine").exists()


def test_check_engine_trt_paths(monkeypatch):
    from vlcompress import optional_deps
    from vlcompress.pipeline import check_engine

    monkeypatch.setattr(optional_deps, "require_cuda", lambda: torch)

    def no_trt():
        raise MissingDependencyError("TensorRT is not installed: install it with "
                                     "`pip install vlcompress[trt]` (NVIDIA's wheels, GPU machines only).")

    monkeypatch.setattr(optional_deps, "require_tensorrt", no_trt)
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        check_engine("trt")
    monkeypatch.setattr(optional_deps, "require_tensorrt", lambda: fake_trt())
    assert check_engine("trt") is None  # the real path: no "not part of this release"


# --------------------------------------------------------------------------------------------
# on a GPU with TensorRT
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_GPU and HAS_TRT), reason="needs a CUDA GPU and TensorRT")
def test_build_and_run_engine_gpu(tiny_fp16_vision, tmp_path):
    from vlcompress.runtime.trt_runner import validate_engine

    vlm, path, check = tiny_fp16_vision
    cache = tmp_path / "timing.cache"
    res = build_engine(path, tmp_path / "v.engine", sparse=True, batch_sizes=(1, 4, 8),
                       timing_cache=cache)
    assert res.engine_path.is_file() and cache.is_file()
    assert res.sparsity.found  # the (Sparsity) lines were captured
    feed = {k: v.numpy() for k, v in vlm.tower_inputs("vision", check).items()}
    v = validate_engine(res.engine_path, path, feed)
    assert v["ok"], v
    again = build_engine(path, tmp_path / "v2.engine", sparse=False, batch_sizes=(1, 8),
                         timing_cache=cache)
    assert again.timing_cache_reused


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_GPU and HAS_TRT), reason="needs a CUDA GPU and TensorRT")
def test_wide_24_model_gets_sparse_kernels_gpu(tmp_path):
    """At 4096 x 4096 and 2048 rows, sparse tensor cores beat dense ones on every GPU that
    has them: TensorRT must pick a sparse implementation, not only log its (Sparsity) lines.
    The engine holds one profile per batch size and runs each batch on its own."""
    from vlcompress.runtime.ort_runner import OrtRunner
    from vlcompress.runtime.trt_runner import TrtRunner

    rng = np.random.default_rng(0)
    d = 4096
    g = _wide_24_graph(rng, d)
    p = _save(convert_fp16(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])),
              tmp_path / "wide.onnx")
    res = build_engine(p, tmp_path / "wide.engine", sparse=True, batch_sizes=(8, 2048))
    assert res.sparsity.n_eligible >= 1, res.log_tail
    assert res.sparsity.n_sparse >= 1, res.sparsity.to_dict()  # sparse kernels were picked
    assert res.warnings == []
    with TrtRunner(res.engine_path) as r, OrtRunner(p, threads=2) as ref:
        assert r.profile_batches == [8, 2048]
        for b in (8, 2048, 8):
            feed = {"x": rng.standard_normal((b, d), dtype=np.float32)}
            out = r.infer(feed)["embeds"]
            assert r.profile_index == [8, 2048].index(b)
            agree = embedding_agreement(out, ref.infer(feed)["embeds"], atol=5e-2, rtol=5e-2,
                                        min_cosine=0.99)
            assert agree["cosine_ok"], agree
    # copy_outputs=False: GPU tensors, and work the caller queues next sees them finished
    with TrtRunner(res.engine_path, copy_outputs=False) as r:
        feed = {"x": rng.standard_normal((2048, d), dtype=np.float32)}
        dev = r.infer(feed)["embeds"]
        assert dev.is_cuda
        host = dev.float().cpu().numpy()  # ordered on the caller's stream only
        with OrtRunner(p, threads=2) as ref:
            assert embedding_agreement(host, ref.infer(feed)["embeds"], atol=5e-2, rtol=5e-2,
                                       min_cosine=0.99)["cosine_ok"]


# --------------------------------------------------------------------------------------------
# explicit QDQ int8 / fp8 ONNX (written by quantize_onnx(..., target="tensorrt"))
# --------------------------------------------------------------------------------------------
def _two_four_rows(w: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest of every 4 consecutive input columns of a Linear weight."""
    g = w.reshape(w.shape[0], -1, 4)
    return g.scatter(-1, g.abs().argsort(-1)[..., :2], 0.0).reshape_as(w)


@pytest.fixture(scope="module")
def qdq_files(tmp_path_factory):
    """A tiny 2:4 pruned MLP (16 -> 32 -> 8): its fp32 and fp16 ONNX, and its explicit QDQ
    int8 and fp8 ONNX for TensorRT (plus an int8 file quantized for ONNX Runtime)."""
    from vlcompress.exporters.quantize import quantize_onnx

    root = tmp_path_factory.mktemp("qdq")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    with torch.no_grad():
        for i in (0, 2):
            m[i].weight.copy_(_two_four_rows(m[i].weight))
    fp32 = root / "mlp.onnx"
    torch.onnx.export(m, (torch.randn(4, 16),), str(fp32), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    fp16 = _save(convert_fp16(onnx.load(str(fp32))), root / "mlp16.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(4)]
    files = {"model": m, "fp32": fp32, "fp16": fp16, "feeds": feeds}
    for q in ("int8", "fp8"):
        files[q] = quantize_onnx(fp32, root / f"mlp_{q}.onnx", q, calibration=feeds,
                                 target="tensorrt").path
    files["int8_ort"] = quantize_onnx(fp32, root / "mlp_int8_ort.onnx", "int8",
                                      calibration=feeds).path
    return files


def test_onnx_inputs_reports_qdq_precision(qdq_files):
    from vlcompress.exporters.tensorrt import onnx_quantization

    for q in ("int8", "fp8"):
        specs, prec = onnx_inputs(qdq_files[q])
        assert prec == q and onnx_quantization(qdq_files[q]) == q
        assert [(s.name, s.shape, s.dtype) for s in specs] == [("x", (None, 16), "float32")]
    assert onnx_inputs(qdq_files["int8_ort"])[1] == "int8"  # weights int8 there too
    assert onnx_inputs(qdq_files["fp32"])[1] == "fp32" and onnx_inputs(qdq_files["fp16"])[1] == "fp16"
    assert onnx_quantization(qdq_files["fp16"]) == "none"


@pytest.mark.parametrize("q", ["int8", "fp8"])
def test_plan_build_qdq_is_strongly_typed_without_precision_flags(qdq_files, q):
    plan = plan_build(qdq_files[q], sparse=True, batch_sizes=(1, 8))
    assert plan.quantize == q and plan.precision == q and plan.strongly_typed
    assert not plan.fp16_flag and plan.builder_flags == ("SPARSE_WEIGHTS",)
    assert plan.to_dict()["quantize"] == q
    assert [p["x"] for p in plan.profiles] == [((1, 16), (1, 16), (8, 16)), ((1, 16), (8, 16), (8, 16))]
    calls = []
    trt = fake_trt()
    apply_plan(plan, trt, Recorder("builder", calls), Recorder("config", calls))
    assert [c[2] for c in calls if c[1] == "set_flag"] == [("SPARSE_WEIGHTS",)]  # no INT8/FP8/FP16
    assert network_flags(trt, plan.strongly_typed) == 1 << 1
    dense = plan_build(qdq_files[q], sparse=False, batch_sizes=(4,))
    assert dense.builder_flags == () and dense.quantize == q
    with pytest.raises(ConfigError, match=f"explicit QDQ {q}.*strongly typed") as ei:
        plan_build(qdq_files[q], sparse=True, batch_sizes=(1,), strongly_typed=False)
    assert "\n" not in str(ei.value)
    assert plan_build(qdq_files["fp16"], sparse=True, batch_sizes=(1,)).quantize == "none"


def _plant_nonzero(src, dst, dtype):
    """Copy ``src`` with one zero of its first 2-D quantized weight made nonzero; return the
    float weight's name (as check_nm_quantized reports it)."""
    model = onnx.load(str(src))
    t = next(t for t in model.graph.initializer if t.data_type == dtype and len(t.dims) == 2)
    arr = numpy_helper.to_array(t).copy()
    flat = arr.reshape(-1)
    flat[int(np.flatnonzero(flat.astype(np.float32) == 0)[0])] = flat[flat.astype(np.float32) != 0][0]
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(model, str(dst))
    return t.name[: -len("_quantized")]


@pytest.mark.parametrize("q, dtype", [("int8", TensorProto.INT8), ("fp8", TensorProto.FLOAT8E4M3FN)])
def test_quantized_24_precheck_reads_the_quantized_weights(qdq_files, tmp_path, q, dtype):
    assert nm_violations(qdq_files[q]) == []  # 2:4 survived quantization
    name = _plant_nonzero(qdq_files[q], tmp_path / "bad.onnx", dtype)
    assert nm_violations(tmp_path / "bad.onnx") == [name]
    assert nm_violations(tmp_path / "bad.onnx", quantize=q) == [name]
    assert nm_violations(tmp_path / "bad.onnx", [name]) == [name]
    assert nm_violations(tmp_path / "bad.onnx", ["layers.9.fc1"]) == []  # not a pruned layer


def test_registry_has_quantized_tensorrt_entries():
    from vlcompress.runtime.registry import get_runtime

    assert get_runtime("trt").key == ("tensorrt", "cuda", "fp16")  # still the default
    for q in ("int8", "fp8"):
        rt = get_runtime("trt", "cuda", q)
        assert rt.key == ("tensorrt", "cuda", q) and rt.consumes == "engine"
        assert f"QDQ {q}" in rt.description and "strongly typed" in rt.description


@pytest.mark.parametrize("q, wrong, got", [("int8", "fp16", "is fp16"), ("int8", "fp32", "is fp32"),
                                           ("fp8", "int8", "is int8"), ("int8", "fp8", "is fp8"),
                                           ("int8", "int8_ort", "is int8 QDQ for onnxruntime")])
def test_quantized_factories_refuse_the_wrong_onnx_in_one_line(qdq_files, tmp_path, q, wrong, got):
    from vlcompress.runtime.registry import Artefacts, BuildOptions, get_runtime

    art = Artefacts(f"pruned_{q}", onnx={"vision": qdq_files[wrong]}, folder=tmp_path)
    with pytest.raises(ConfigError) as ei:
        get_runtime("tensorrt", "cuda", q).build(art, ["vision"], BuildOptions(pattern="2:4"))
    msg = str(ei.value)
    assert f"tensorrt/cuda/{q} needs explicit QDQ {q} ONNX for TensorRT" in msg and got in msg
    assert "\n" not in msg and not list(tmp_path.glob("*.engine"))


def test_fp16_factory_refuses_qdq_onnx(qdq_files, tmp_path):
    from vlcompress.runtime.registry import Artefacts, BuildOptions, get_runtime

    art = Artefacts("pruned", onnx={"vision": qdq_files["int8"]}, folder=tmp_path)
    with pytest.raises(ConfigError, match="tensorrt/cuda/fp16 needs fp16 ONNX"):
        get_runtime("trt").build(art, ["vision"], BuildOptions())


def test_fp8_qdq_reference_runs_as_written(qdq_files):
    """ONNX Runtime CPU's QDQ fusions (optimisation EXTENDED/ALL) compute fp8 graphs wrongly;
    the fp8 reference (engine validation, accuracy) runs at BASIC and equals the graph run op by
    op (optimisations off), and stays close to the float model."""
    import onnxruntime as ort

    from vlcompress.runtime.ort_runner import OrtRunner, ort_optimization

    assert ort_optimization(qdq_files["fp8"]) == "basic"
    assert ort_optimization(qdq_files["int8"]) == ort_optimization(qdq_files["fp16"]) == "all"
    feed = qdq_files["feeds"][0]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    op_by_op = ort.InferenceSession(str(qdq_files["fp8"]), so,
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with OrtRunner(qdq_files["fp8"], threads=1,
                   optimization=ort_optimization(qdq_files["fp8"])) as r:
        got = r.infer(feed)["y"]
    np.testing.assert_allclose(got, op_by_op, rtol=1e-6, atol=1e-6)
    ref = qdq_files["model"](torch.from_numpy(feed["x"])).detach().numpy()
    assert embedding_agreement(got, ref, atol=0.2, rtol=0.2, min_cosine=0.98)["ok"]


def test_trt_quantize_config_checks():
    from vlcompress.pipeline import RunConfig

    with pytest.raises(ConfigError) as ei:
        RunConfig(engine="trt", quantize="int8", quantize_method="dynamic")
    assert "dynamic int8 runs on onnxruntime/cpu only, not tensorrt/cuda/fp16" in str(ei.value)
    assert "--quantize-method static" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(ConfigError, match="--quantize fp16 cannot run on runtime tensorrt/cuda/fp16; "
                                          "allowed: .*tensorrt: int8, fp8"):
        RunConfig(engine="trt", quantize="fp16")
    for q in ("int8", "fp8"):
        cfg = RunConfig(engine="trt", quantize=q)
        assert cfg.onnx_fp16 and cfg.quantize_fp32_export  # float engines fp16, QDQ from fp32
    assert not RunConfig(quantize="int8").quantize_fp32_export  # onnxruntime: fp32 run
    from vlcompress.runtime.registry import LatencyConfig
    from vlcompress.sweep import check_sweep_quantize

    with pytest.raises(ConfigError, match="with --engine trt runs in prune-export, not in a sweep"):
        check_sweep_quantize("int8", "static", LatencyConfig(runtime="trt"))


def test_quantized_runtime_and_target_follow_the_run():
    from vlcompress.exporters.quantize import quantize_target
    from vlcompress.quantized_variants import quantized_runtime
    from vlcompress.runtime.registry import get_runtime

    trt, ort = get_runtime("trt"), get_runtime("onnxruntime")
    assert quantized_runtime(trt, "int8").key == ("tensorrt", "cuda", "int8")
    assert quantized_runtime(trt, "fp8").key == ("tensorrt", "cuda", "fp8")
    assert quantized_runtime(ort, "int8") is ort and quantized_runtime(ort, "fp16").precision == "fp16"
    assert quantize_target(trt) == "tensorrt" and quantize_target(ort) == "onnxruntime"


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU refusal")
def test_trt_quantized_run_without_gpu_is_refused_before_work(tmp_path):
    from vlcompress.pipeline import prune_export

    with pytest.raises(MissingDependencyError, match="CUDA") as ei:
        prune_export(engine="trt", quantize="int8", out=str(tmp_path / "o"))
    assert "\n" not in str(ei.value) and not (tmp_path / "o").exists()


def test_fp8_check_refuses_gpus_without_fp8(monkeypatch):
    from vlcompress import optional_deps
    from vlcompress.runtime.registry import get_runtime

    monkeypatch.setattr(optional_deps, "require_cuda", lambda: torch)
    monkeypatch.setattr(optional_deps, "require_tensorrt", lambda: fake_trt())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    with pytest.raises(MissingDependencyError, match=r"compute capability >= 8\.9.*A100 is 8\.0"):
        get_runtime("trt", "cuda", "fp8").check()
    get_runtime("trt", "cuda", "int8").check()  # int8 runs there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    get_runtime("trt", "cuda", "fp8").check()


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_GPU and HAS_TRT), reason="needs a CUDA GPU and TensorRT")
@pytest.mark.parametrize("q", ["int8", "fp8"])
def test_qdq_24_engine_build_reports_quantization_and_sparsity_gpu(tmp_path, q):
    """A wide 2:4 MLP quantized to explicit QDQ for TensorRT builds strongly typed with sparse
    weights; the build reports the quantization and the sparse layers, the engine agrees with
    its QDQ ONNX on ONNX Runtime, and the registry entry builds and runs it."""
    from vlcompress.exporters.quantize import quantize_onnx
    from vlcompress.runtime.registry import Artefacts, BuildOptions, get_runtime
    from vlcompress.runtime.trt_runner import validate_engine

    if q == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    rng = np.random.default_rng(0)
    d = 4096
    g = _wide_24_graph(rng, d)
    fp32 = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                 tmp_path / "wide.onnx")
    feeds = [{"x": rng.standard_normal((64, d), dtype=np.float32)} for _ in range(2)]
    qpath = quantize_onnx(fp32, tmp_path / f"wide_{q}.onnx", q, calibration=feeds,
                          target="tensorrt").path
    pruned = ["layers.0.fc1", "layers.0.fc2"]
    res = build_engine(qpath, tmp_path / f"wide_{q}.engine", sparse=True, batch_sizes=(8, 2048),
                       pruned=pruned)
    assert res.quantize == q and res.to_dict()["quantize"] == q
    assert res.plan.strongly_typed and res.plan.builder_flags == ("SPARSE_WEIGHTS",)
    assert res.nm_violations == []  # read from the quantized initialisers
    assert res.sparsity.found, res.log_tail
    if q == "int8":  # sparse int8 tensor cores beat dense ones at this size
        assert res.sparsity.n_sparse >= 1, res.sparsity.to_dict()
    feed = {"x": rng.standard_normal((8, d), dtype=np.float32)}
    v = validate_engine(res.engine_path, qpath, feed, precision=q)
    assert v["ok"], v
    folder = tmp_path / "reg"
    folder.mkdir()
    art = Artefacts(f"pruned_{q}", onnx={"wide": qpath}, folder=folder, pruned_layers=pruned)
    built = get_runtime("trt", "cuda", q).build(
        art, ["wide"], BuildOptions(batch_sizes=(8,), pattern="2:4", check_feeds={"wide": feed}))
    info = built.info["wide"]["engine"]
    assert info["quantize"] == q and info["sparse_weights"] is True
    runner = built.runners["wide"]
    assert runner.precision == q and (folder / "wide.engine").is_file()
    with runner:
        assert runner.describe()["precision"] == q
        out = runner.infer(feed)["embeds"]
        assert tuple(out.shape) == (8, d)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_GPU and HAS_TRT), reason="needs a CUDA GPU and TensorRT")
def test_prune_export_trt_int8_end_to_end_gpu(tmp_path):
    """`prune-export --engine trt --quantize int8` on tiny CLIP: fp16 engines for dense and
    pruned, QDQ int8 engines (from an fp32 export) for dense_int8 and pruned_int8 (2:4 sparse
    weights), timed interleaved; accuracy of all four from their ONNX on ONNX Runtime CPU."""
    import json

    from vlcompress.pipeline import prune_export

    out = tmp_path / "run"
    rep = prune_export(out=str(out), engine="trt", quantize="int8", method="magnitude",
                       pattern="2:4", calibration_size=16, eval_size=24, batch_sizes="1,2",
                       iterations=3, warmup=1)
    qd = rep["quantize"]
    assert qd["target"] == "tensorrt" and qd["runtime"] == "tensorrt/cuda/int8"
    assert "fp32 export" in qd["quantized_from"] and not (out / ".quantize-src").exists()
    assert all(v == [] for v in qd["nm_survives"].values())
    assert set(qd["accuracy"]["variants"]) == {"dense", "pruned", "dense_int8", "pruned_int8"}
    for row in rep["latency"]:
        v = row["variants"]
        assert v["dense"]["precision"] == v["pruned"]["precision"] == "fp16"
        assert v["dense_int8"]["precision"] == v["pruned_int8"]["precision"] == "int8"
        assert v["pruned_int8"]["quantize"] == "int8"
    for tower in ("vision", "text"):
        info = json.loads((out / "pruned_int8" / f"{tower}.engine.json").read_text())
        assert info["quantize"] == "int8" and info["sparse_weights"] is True
        dense = json.loads((out / "dense_int8" / f"{tower}.engine.json").read_text())
        assert dense["sparse_weights"] is False
