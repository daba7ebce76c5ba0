"""Runners (context-manager contract, torch and onnxruntime) and the latency harness
(interleaving, rows). Never asserts on speed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import RecordingProgress, make_tiny_random_clip
from onnx import TensorProto, helper, numpy_helper

from vlcompress.data import load_calibration
from vlcompress.errors import ConfigError, MissingDependencyError, ModelError
from vlcompress.runtime import (
    InactiveRunnerError,
    OrtRunner,
    Runner,
    TorchRunner,
    build_runners,
    compare_latency,
    interleaved_order,
    make_feeds,
    measure,
    summary,
    tower_input_names,
)
from vlcompress.runtime.registry import LatencyConfig


class Recording(Runner):
    """Returns its input doubled; logs every call (and activation) to a shared list."""

    runtime = "fake"

    def __init__(self, name, log):
        super().__init__(name)
        self.log = log

    def _activate(self):
        self.log.append(("activate", self.name))

    def _deactivate(self):
        self.log.append(("deactivate", self.name))

    def _infer(self, feed):
        self.log.append(("infer", self.name))
        return {"y": feed["x"] * 2}


@pytest.fixture
def linear_onnx(tmp_path):
    """y = x @ W.T + b as an ONNX file, and the same nn.Linear."""
    lin = torch.nn.Linear(8, 4)
    w = lin.weight.detach().numpy()
    b = lin.bias.detach().numpy()
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["embeds"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "linear.onnx"
    onnx.save(model, path)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    return path, M()


# --- the runner contract ---------------------------------------------------------------------
def test_runner_context_manager_contract():
    log = []
    r = Recording("a", log)
    feed = {"x": np.ones(3)}
    with pytest.raises(InactiveRunnerError, match="inside `with runner:`"):
        r.infer(feed)
    with r as active:
        assert active is r and r.is_active
        assert np.array_equal(r.infer(feed)["y"], 2 * np.ones(3))
        with pytest.raises(RuntimeError, match="already active"):
            r.activate()
    assert not r.is_active
    with pytest.raises(InactiveRunnerError):
        r.infer(feed)
    with pytest.raises(ValueError), r:  # an error inside the block still deactivates
        raise ValueError("boom")
    assert not r.is_active
    assert log == [("activate", "a"), ("infer", "a"), ("deactivate", "a"),
                   ("activate", "a"), ("deactivate", "a")]
    assert "inactive" in repr(r)


def test_torch_and_ort_runners_agree(linear_onnx):
    path, module = linear_onnx
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    tr = TorchRunner(module, ["x"])
    orr = OrtRunner(path, threads=1)
    for r in (tr, orr):
        with pytest.raises(InactiveRunnerError):
            r.infer({"x": x})
    with tr, orr:
        a = tr.infer({"x": x, "unused": x})["embeds"]
        b = orr.infer({"x": x, "unused": x})["embeds"]  # extra feed entries are ignored
        assert orr.input_names == ["x"] and orr.output_names == ["embeds"]
        opts = orr.session.get_session_options()
        assert opts.intra_op_num_threads == 1
        import onnxruntime as ort

        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        with pytest.raises(KeyError, match="lacks input"):
            orr.infer({"y": x})
        with pytest.raises(KeyError, match="lacks input"):
            tr.infer({"y": x})
    assert np.allclose(a, b, atol=1e-5)
    assert orr.session is None and not orr.is_active
    assert (tr.name, tr.device, tr.runtime) == ("torch-cpu", "cpu", "torch")
    assert (orr.name, orr.device, orr.runtime) == ("onnxruntime-cpu", "cpu", "onnxruntime")


def test_ort_runner_errors(tmp_path, linear_onnx):
    with pytest.raises(ModelError, match="does not exist"):
        with OrtRunner(tmp_path / "missing.onnx"):
            pass
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        with OrtRunner(bad):
            pass
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        r = OrtRunner(linear_onnx[0], providers=("TensorrtExecutionProvider",
                                                 "CPUExecutionProvider"))
        assert r.device == "cuda"
        with pytest.raises(MissingDependencyError, match="TensorrtExecutionProvider"):
            r.activate()
        assert not r.is_active


def test_torch_runner_on_a_clip_tower():
    vlm = make_tiny_random_clip()
    batch = next(iter(load_calibration("shapes", n=4, batch_size=4)))
    feeds = make_feeds(vlm, ["vision", "text"], [2], batch)
    for tower in ("vision", "text"):
        names = tower_input_names(vlm, tower)
        assert names == list(vlm.tower_inputs(tower, batch))
        with TorchRunner(vlm.tower_module(tower), names) as r:
            out = r.infer(feeds[(tower, 2)])["embeds"]
        assert out.shape == (2, 16) and out.dtype == np.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_runner_cuda_moves_and_restores(linear_onnx):
    _, module = linear_onnx
    x = np.ones((2, 8), np.float32)
    with TorchRunner(module, ["x"], device="cuda") as r:
        assert next(module.parameters()).is_cuda
        y = r.infer({"x": x})["embeds"]
        assert isinstance(y, np.ndarray)
    assert not next(module.parameters()).is_cuda
    times = measure({"a": (TorchRunner(module, ["x"], device="cuda"), {"x": x})},
                    warmup=1, iterations=2)
    assert len(times["a"]) == 2


# --- the latency harness ---------------------------------------------------------------------
def test_measure_interleaves_and_alternates():
    log, trace = [], []
    a, b = Recording("A", log), Recording("B", log)
    feed = {"x": np.ones(2)}
    times = measure({"dense": (a, feed), "pruned": (b, feed)}, warmup=2, iterations=4,
                    trace=trace)
    assert set(times) == {"dense", "pruned"}
    assert all(len(v) == 4 and all(t >= 0 for t in v) for v in times.values())
    expected = ["dense", "pruned", "pruned", "dense"] * 3  # 2 warm-up + 4 timed rounds
    assert [k for _, _, k in trace] == expected
    assert [p for p, _, _ in trace] == ["warmup"] * 4 + ["timed"] * 8
    calls = [name for what, name in log if what == "infer"]
    assert calls == [{"dense": "A", "pruned": "B"}[k] for k in expected]
    # inactive runners were activated for the measurement only
    assert log[:2] == [("activate", "A"), ("activate", "B")]
    assert ("deactivate", "A") in log[-2:] and ("deactivate", "B") in log[-2:]
    assert not a.is_active and not b.is_active
    assert interleaved_order(["x", "y", "z"], 1) == ["z", "y", "x"]


def test_measure_leaves_active_runners_active_and_calls_sync():
    log, syncs = [], []
    a = Recording("A", log)
    with a:
        measure({"a": (a, {"x": np.ones(1)})}, warmup=0, iterations=3,
                sync=lambda: syncs.append(1))
        assert a.is_active
    assert len(syncs) == 1 + 2 * 3  # after warm-up, then before and after every timed call
    assert [w for w, _ in log].count("activate") == 1
    with pytest.raises(ConfigError):
        measure({"a": (a, {})}, iterations=0)


def test_summary():
    s = summary(range(1, 101))
    assert set(s) == {"p50", "p90", "p99", "mean", "n"}
    assert s["n"] == 100 and s["p50"] == pytest.approx(50.5) and s["mean"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(np.percentile(np.arange(1, 101), 90))
    assert s["p50"] <= s["p90"] <= s["p99"]
    with pytest.raises(ValueError):
        summary([])


def test_compare_latency_rows():
    log = []

    rec = RecordingProgress()
    seen = rec.seen

    dense = {t: Recording(f"d-{t}", log) for t in ("vision", "text")}
    pruned = {t: Recording(f"p-{t}", log) for t in ("vision", "text")}
    feeds = {(t, b): {"x": np.ones(b)} for t in ("vision", "text") for b in (1, 4)}
    cfg = LatencyConfig(batch_sizes=(1, 4), warmup=1, iterations=3)
    rows = compare_latency(dense, pruned, feeds, cfg, progress=rec)
    assert [(r["tower"], r["batch"]) for r in rows] == [("vision", 1), ("vision", 4),
                                                        ("text", 1), ("text", 4)]
    for r in rows:
        assert set(r) == {"runtime", "device", "tower", "batch", "dense_ms", "pruned_ms",
                          "speedup", "dense_samples_ms", "pruned_samples_ms", "host_ms",
                          "host_bound"}
        assert r["host_bound"] is None  # CPU: no host issue time apart from the kernels
        assert len(r["dense_samples_ms"]) == len(r["pruned_samples_ms"]) == 3  # raw, paired
        assert (r["runtime"], r["device"]) == ("fake", "cpu")
        assert r["dense_ms"]["n"] == r["pruned_ms"]["n"] == 3
        assert r["speedup"] == pytest.approx(r["dense_ms"]["p50"] / r["pruned_ms"]["p50"])
    assert seen == [("latency", 4)] * 4
    # each tower's runners are activated once for all batch sizes, then released
    assert [e for e in log if e[0] == "activate"] == [("activate", "d-vision"),
                                                      ("activate", "p-vision"),
                                                      ("activate", "d-text"),
                                                      ("activate", "p-text")]
    assert not any(r.is_active for r in list(dense.values()) + list(pruned.values()))
    # dense and pruned calls interleave within each cell
    calls = [n for w, n in log if w == "infer"][:8]
    assert calls == ["d-vision", "p-vision", "p-vision", "d-vision"] * 2  # 1 warm-up, 3 timed


def test_compare_latency_errors():
    log = []
    cfg = LatencyConfig(batch_sizes=(1,), warmup=0, iterations=1, towers=("vision", "text"))
    feeds = {("vision", 1): {"x": np.ones(1)}}
    only_vision = {"vision": Recording("d", log)}
    # a tower neither side has is skipped; one side only, or a missing feed, is an error
    rows = compare_latency(only_vision, {"vision": Recording("p", log)}, feeds, cfg)
    assert [r["tower"] for r in rows] == ["vision"]
    with pytest.raises(ConfigError, match="no pruned"):
        compare_latency({"vision": Recording("d", log), "text": Recording("t", log)},
                        {"vision": Recording("p", log)}, feeds, cfg)
    with pytest.raises(ConfigError, match="no input feed for vision@2"):
        compare_latency(only_vision, {"vision": Recording("p", log)}, feeds,
                        LatencyConfig(batch_sizes=(2,), towers=("vision",)))
    with pytest.raises(ConfigError, match="no runners"):
        compare_latency({}, {}, feeds, cfg)


def test_make_feeds_repeats_and_trims():
    vlm = make_tiny_random_clip()
    batch = next(iter(load_calibration("shapes", n=4, batch_size=4)))
    feeds = make_feeds(vlm, ["vision", "text"], [1, 3, 6], batch)
    assert set(feeds) == {(t, b) for t in ("vision", "text") for b in (1, 3, 6)}
    for b in (1, 3, 6):
        px = feeds[("vision", b)]["pixel_values"]
        assert px.shape == (b, 3, 32, 32) and px.dtype == np.float32
        ids, mask = feeds[("text", b)]["input_ids"], feeds[("text", b)]["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == b and ids.dtype == np.int64
    # 6 = the 4 pairs, then the first two again
    assert np.array_equal(feeds[("vision", 6)]["pixel_values"][4:],
                          feeds[("vision", 6)]["pixel_values"][:2])
    with pytest.raises(ConfigError):
        make_feeds(vlm, ["vision"], [0], batch)


def test_build_runners(linear_onnx):
    vlm = make_tiny_random_clip()
    cfg = LatencyConfig(runtime="torch", towers=("vision", "text"))
    runners = build_runners(cfg, vlm=vlm)
    assert set(runners) == {"vision", "text"}
    assert all(isinstance(r, TorchRunner) for r in runners.values())
    assert runners["text"].input_names == ["input_ids", "attention_mask"]
    cfg = LatencyConfig(runtime="onnxruntime", threads=1, towers=("vision",))
    runners = build_runners(cfg, onnx_paths={"vision": linear_onnx[0]})
    assert isinstance(runners["vision"], OrtRunner) and runners["vision"].threads == 1
    with pytest.raises(ConfigError):
        build_runners(cfg)
