"""The runtime registry, the one timing entry point, and the spine through prune-export,
bench and sweep: every runtime key reaches every step. GPU paths are tested up to the GPU
boundary (availability checks and runner classes monkeypatched, never faked numbers)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import make_tiny_random_blip, make_tiny_random_clip
from typer.testing import CliRunner

from vlcompress import optional_deps
from vlcompress.cli import app
from vlcompress.errors import ConfigError, MissingDependencyError
from vlcompress.runtime import registry
from vlcompress.runtime.base import Runner
from vlcompress.runtime.registry import Artefacts, LatencyConfig, get_runtime
from vlcompress.runtime.timing import time_models

runner = CliRunner()
HAS_GPU = torch.cuda.is_available()
FAST = ["--calibration-size", "16", "--eval-size", "24", "--batch-sizes", "1,2", "--iterations", "2"]


def one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------
def test_registry_keys_defaults_and_aliases():
    keys = {rt.key for rt in registry.runtimes()}
    assert {("onnxruntime", "cpu", "fp32"), ("onnxruntime", "cuda", "fp16"),
            ("onnxruntime-trt", "cuda", "fp16"), ("torch", "cpu", "fp32"),
            ("torch", "cuda", "fp16"), ("torch-2:4", "cuda", "fp16"),
            ("tensorrt", "cuda", "fp16")} <= keys
    assert get_runtime("trt").key == ("tensorrt", "cuda", "fp16")
    assert get_runtime("torch").key == ("torch", "cpu", "fp32")
    assert get_runtime("torch", "cuda").key == ("torch", "cuda", "fp32")
    assert get_runtime("onnxruntime", precision="fp16").key == ("onnxruntime", "cpu", "fp16")
    assert get_runtime("torch-2:4").patterns == ("2:4",)
    consumes = {rt.name: rt.consumes for rt in registry.runtimes()}
    assert consumes == {"onnxruntime": "onnx", "onnxruntime-trt": "onnx", "torch": "model",
                        "torch-2:4": "model", "tensorrt": "engine"}


@pytest.mark.parametrize("args, needle", [(("trt", "cpu"), "trt/cpu/*"),
                                          (("torch", "cpu", "fp16"), "torch/cpu/fp16"),
                                          (("tvm",), "tvm/*/*")])
def test_get_runtime_bad_combination_is_one_line(args, needle):
    with pytest.raises(ConfigError) as ei:
        get_runtime(*args)
    msg = str(ei.value)
    assert needle in msg and "allowed: " in msg and "tensorrt/cuda/fp16" in msg and "\n" not in msg


def test_pattern_requirement_and_availability_sentences(monkeypatch):
    with pytest.raises(ConfigError, match="needs pattern 2:4, not unstructured"):
        get_runtime("torch-2:4").check_pattern("unstructured")
    get_runtime("torch-2:4").check_pattern("2:4")

    def no_gpu():
        raise MissingDependencyError("No CUDA GPU is available: this step needs an NVIDIA GPU.")

    monkeypatch.setattr(optional_deps, "require_cuda", no_gpu)
    for name in ("trt", "torch-2:4"):
        with pytest.raises(MissingDependencyError, match="No CUDA GPU"):
            get_runtime(name).check()
        assert not get_runtime(name).available()
    assert get_runtime("onnxruntime").available() and get_runtime("torch").available()


# --------------------------------------------------------------------------------------------
# the timing entry point: every tower, what ran
# --------------------------------------------------------------------------------------------
def test_time_models_times_blip_fusion_and_records_what_ran(calib_small):
    """Symptom: BLIP's fusion tower was exported but never timed."""
    import copy

    from vlcompress.runtime.latency import make_feeds

    dense = make_tiny_random_blip()
    pruned = copy.deepcopy(dense)
    lc = LatencyConfig(batch_sizes=(1,), warmup=0, iterations=2, runtime="torch")
    batch = next(iter(calib_small.batches()))
    feeds = make_feeds(dense, dense.towers, lc.batch_sizes, batch)
    rows = time_models("torch", Artefacts("dense", vlm=dense), Artefacts("pruned", vlm=pruned),
                       feeds, lc)
    assert [r["tower"] for r in rows] == ["vision", "text", "fusion"]
    for r in rows:
        assert (r["runtime"], r["device"], r["precision"]) == ("torch", "cpu", "fp32")
        assert r["provider"].startswith("torch ") and len(r["pruned_samples_ms"]) == 2


def test_time_models_onnx_records_provider_and_precision(tmp_path, calib_small):
    from vlcompress.exporters.onnx import export_model
    from vlcompress.runtime.latency import make_feeds

    vlm = make_tiny_random_clip().select_towers("vision")
    batches = iter(calib_small.batches())
    ex, check = next(batches), next(batches)
    d = export_model(vlm, tmp_path / "d", ex, check).paths
    p = export_model(vlm, tmp_path / "p", ex, check, fp16=True).paths
    lc = LatencyConfig(batch_sizes=(1,), warmup=0, iterations=2)
    feeds = make_feeds(vlm, ["vision"], (1,), ex)
    (row,) = time_models(None, Artefacts("dense", onnx=p), Artefacts("pruned", onnx=p), feeds,
                         LatencyConfig(batch_sizes=(1,), warmup=0, iterations=2, precision="fp16"))
    assert row["provider"] == "CPUExecutionProvider" and row["precision"] == "fp16"
    with pytest.raises(ConfigError, match="needs fp32 ONNX; pruned vision.onnx is fp16"):
        time_models(None, Artefacts("dense", onnx=d), Artefacts("pruned", onnx=p), feeds, lc)


# --------------------------------------------------------------------------------------------
# bench re-measures a run on the runtime it was made with (GPU runtimes to the boundary)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """A run folder as `prune-export --engine trt` leaves it: a 2:4 pruned tiny CLIP, latency
    rows on tensorrt/cuda, engines dense|pruned/<tower>.engine (bytes never read on CPU)."""
    from vlcompress.envinfo import env_info
    from vlcompress.prune import prune
    from vlcompress.report import build_report, write_report

    root = tmp_path_factory.mktemp("gpu-run")
    vlm = make_tiny_random_clip()
    vlm.save(root / "dense_model")
    res = prune(vlm, "magnitude", None, "2:4")
    run = root / "run"
    vlm.save(run / "pruned" / "model")
    for v in ("dense", "pruned"):
        (run / v).mkdir(parents=True, exist_ok=True)
        for t in ("vision", "text"):
            (run / v / f"{t}.engine").write_bytes(b"engine")
    (run / "pruned" / "vision.engine.json").write_text(json.dumps({"sparse_layers": 4}))
    total, nonzero = vlm.num_parameters()
    ms = {"p50": 1.0, "p90": 1.0, "p99": 1.0, "mean": 1.0, "n": 1}
    row = {"runtime": "tensorrt", "device": "cuda", "tower": "vision", "batch": 1,
           "dense_ms": ms, "pruned_ms": ms, "speedup": 1.0,
           "dense_samples_ms": [1.0], "pruned_samples_ms": [1.0]}
    report = build_report(
        model={"name": str(root / "dense_model"), "family": "clip", "source": "test",
               "params_total": total, "params_nonzero": nonzero},
        prune=res.to_dict(),
        export={"format": "onnx", "fp16": True,
                "paths": {"dense": {"vision": "dense/vision.onnx", "text": "dense/text.onnx"},
                          "pruned": {"vision": "pruned/vision.onnx", "text": "pruned/text.onnx"},
                          "model": "pruned/model"}},
        accuracy=None, latency=[row], env=env_info(),
        config={"engine": "trt", "device": "cuda", "batch_sizes": [1, 2]})
    write_report(report, run)
    return run


class FakeGpuRunner(Runner):
    """Stands in for a GPU runner on CPU: records what it was built from, returns nothing."""

    made: list = []

    def __init__(self, *args, name=None, **kw):
        super().__init__(name, "cpu")
        self.args, self.kw = args, kw
        FakeGpuRunner.made.append(self)

    def _infer(self, feed):
        return {}

    def describe(self):
        return {"provider": "fake-gpu", "precision": "fp16"}


def _gpu_present(monkeypatch):
    monkeypatch.setattr(optional_deps, "require_cuda", lambda: torch)
    monkeypatch.setattr(optional_deps, "require_tensorrt", lambda: object())


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU refusal")
def test_bench_trt_run_without_gpu_stops_with_one_sentence(gpu_run, tmp_path):
    """Symptom: bench rejected `--engine trt` runs ("unknown runtime"); now it knows the run is
    tensorrt/cuda/fp16 and, with no GPU here, says so in one sentence before measuring."""
    res = runner.invoke(app, ["bench", str(gpu_run), "--report", str(tmp_path / "b.json")])
    one_line_error(res, "CUDA")
    assert not (tmp_path / "b.json").exists()


def test_bench_trt_builds_runners_from_the_engine_files(gpu_run, tmp_path, monkeypatch):
    from vlcompress.bench import benchmark
    from vlcompress.runtime import trt_runner

    _gpu_present(monkeypatch)
    monkeypatch.setattr(trt_runner, "TrtRunner", FakeGpuRunner)
    FakeGpuRunner.made = []
    res = benchmark(str(gpu_run), report=str(tmp_path / "b.json"), accuracy=False,
                    warmup=0, iterations=2)
    built = {(str(r.args[0].parent.name), r.args[0].name) for r in FakeGpuRunner.made}
    assert built == {(v, f"{t}.engine") for v in ("dense", "pruned") for t in ("vision", "text")}
    rows = res.report["latency"]
    assert {(r["runtime"], r["device"], r["precision"], r["provider"]) for r in rows} == {
        ("tensorrt", "cuda", "fp16", "fake-gpu")}
    assert {r["tower"] for r in rows} == {"vision", "text"} and {r["batch"] for r in rows} == {1, 2}
    assert [r["engine"] for r in rows if r["tower"] == "vision"] == [{"sparse_layers": 4}] * 2


def test_bench_torch_24_override_to_the_boundary(gpu_run, tmp_path, monkeypatch):
    """torch-2:4 is reachable from bench: without a GPU one sentence; with one (patched) the
    pruned model's towers run semi-structured, the dense model's stay dense."""
    from vlcompress.bench import benchmark
    from vlcompress.runtime import cuda

    if not HAS_GPU:
        res = runner.invoke(app, ["bench", str(gpu_run), "--runtime", "torch-2:4",
                                  "--report", str(tmp_path / "a.json")])
        one_line_error(res, "CUDA")
    res = runner.invoke(app, ["bench", str(gpu_run), "--runtime", "torch-2:4", "--device", "cpu"])
    one_line_error(res, "torch-2:4/cpu/*", "allowed:")
    monkeypatch.setattr(cuda, "_check_semi_structured", lambda: torch)
    entry = get_runtime("torch-2:4")
    monkeypatch.setitem(registry._REGISTRY, entry.key,
                        dataclasses.replace(entry, check=lambda: torch))
    monkeypatch.setattr(cuda, "TorchCudaRunner", FakeGpuRunner)
    FakeGpuRunner.made = []
    res = benchmark(str(gpu_run), runtime="torch-2:4", report=str(tmp_path / "b.json"),
                    accuracy=False, warmup=0, iterations=2, batch_sizes="1")
    semi = {r.name: r.kw["semi_structured"] for r in FakeGpuRunner.made}
    assert semi == {"torch-cuda-fp16-dense": False, "torch-cuda-fp16-pruned": True}
    assert {r["runtime"] for r in res.report["latency"]} == {"torch-2:4"}


# --------------------------------------------------------------------------------------------
# prune-export -> bench over ONNX; export records what ran
# --------------------------------------------------------------------------------------------
def test_prune_export_then_bench_over_onnx(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["prune-export", "--out", str(out), "--method", "magnitude", *FAST])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["export"]["fp16"] is False
    assert rep["export"]["precision"] == {"dense": "fp32", "pruned": "fp32"}
    assert rep["config"]["runtime"] == {"name": "onnxruntime", "device": "cpu", "precision": "fp32"}
    for r in rep["latency"]:
        assert r["provider"] == "CPUExecutionProvider" and r["precision"] == "fp32"
    md = (out / "report.md").read_text()
    assert "CPUExecutionProvider" in md and "| fp32 |" in md
    res = runner.invoke(app, ["bench", str(out), "--no-accuracy", "--iterations", "2",
                              "--warmup", "0", "--report", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert {(r["runtime"], r["device"], r["precision"]) for r in b["latency"]} == {
        ("onnxruntime", "cpu", "fp32")}
    assert {(r["tower"], r["batch"]) for r in b["latency"]} == {
        (t, n) for t in ("vision", "text") for n in (1, 2)}
    # an override is checked against the registry before anything is measured
    res = runner.invoke(app, ["bench", str(out), "--runtime", "tvm"])
    one_line_error(res, "tvm", "allowed:")


def test_trt_export_records_the_fp16_onnx_it_wrote(tmp_path, monkeypatch):
    """Symptom: `--engine trt` forces fp16 ONNX, but report.json said export.fp16 = False.
    TensorRT itself is replaced (GPU boundary) by onnxruntime on the same fp16 ONNX."""
    from vlcompress.pipeline import prune_export
    from vlcompress.runtime.ort_runner import OrtRunner
    from vlcompress.runtime.registry import Built

    entry = get_runtime("trt")

    def factory(art, towers, opts):
        return Built({t: OrtRunner(art.onnx[t]) for t in towers},
                     {t: {"engine": {"sparse_layers": 0}} for t in towers})

    monkeypatch.setitem(registry._REGISTRY, entry.key,
                        dataclasses.replace(entry, check=lambda: None, factory=factory))
    rep = prune_export(out=str(tmp_path / "run"), engine="trt", method="magnitude",
                       calibration_size=16, eval_size=24, batch_sizes="1", iterations=2, warmup=0)
    assert rep["export"]["fp16"] is True
    assert rep["export"]["precision"] == {"dense": "fp16", "pruned": "fp16"}
    assert rep["config"]["runtime"] == {"name": "tensorrt", "device": "cuda", "precision": "fp16"}
    assert {(r["runtime"], r["device"], r["precision"]) for r in rep["latency"]} == {
        ("tensorrt", "cuda", "fp16")}
    assert all(r["engine"] == {"sparse_layers": 0} for r in rep["latency"])


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------
def test_sweep_latency_plot_is_in_run_speedup_with_interval(tmp_path):
    """Symptom: the plot drew each setting's pruned p50 against the first setting's dense p50;
    now each point is its own row's dense p50 / pruned p50 with a bootstrap interval."""
    from vlcompress.sweep import plot_latency, speedup_series

    def row(setting, batch, dense, pruned):
        return {"setting": setting, "tower": "vision", "batch": batch,
                "dense_ms": {"p50": dense}, "pruned_ms": {"p50": pruned},
                "speedup": dense / pruned, "speedup_ci": [dense / pruned - 0.1,
                                                          dense / pruned + 0.1]}

    rows = [row("a", 1, 10.0, 5.0), row("a", 2, 20.0, 10.0),
            row("b", 1, 30.0, 20.0), row("b", 2, 60.0, 40.0)]  # b's dense ran slower
    xs, ys, ci = speedup_series(rows, "b")
    assert xs == [1, 2] and ys == [1.5, 1.5] and ci[0] == pytest.approx((1.4, 1.6))
    res = {"model": "m", "latency": rows, "latency_config": {}}
    assert plot_latency(res, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bootstrap_speedup_is_the_gates_paired_bootstrap():
    from vlcompress.gate import bootstrap_speedup

    d = [2.0, 2.1, 1.9, 2.0, 2.2, 2.0]
    p = [1.0, 1.1, 0.9, 1.0, 1.0, 1.05]
    s, lo, hi = bootstrap_speedup(d, p, n=500)
    assert lo <= s <= hi and s == pytest.approx(2.0 / 1.0, rel=0.05)


def test_sweep_one_tower_bert_sweeps_on_fidelity(tmp_path):
    """Symptom: a one-tower model exited 2 with "metric 'i2t_r1' is not measured ...;
    allowed: " and an empty list."""
    from transformers import BertConfig, BertModel

    from vlcompress.data.tokenizer import build_shapes_tokenizer
    from vlcompress.models.towers import BertTextTower

    torch.manual_seed(0)
    tok = build_shapes_tokenizer()
    m = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, vocab_size=len(tok),
                             max_position_embeddings=32)).eval()
    BertTextTower(m, tok, None, name="tiny-bert").save(tmp_path / "bert")
    res = runner.invoke(app, ["sweep", "--model", str(tmp_path / "bert"), "--methods", "magnitude",
                              "--sparsities", "0.5", "--patterns", "unstructured",
                              "--calibration-size", "16", "--eval-size", "16", "--runtime",
                              "torch", "--batch-sizes", "1", "--iterations", "2",
                              "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert out["metric"] == "text_cosine" and out["dense"]["text_cosine"] == 1.0
    assert 0 < out["rows"][0]["text_cosine"] <= 1.0 + 1e-6
    assert {r["tower"] for r in out["latency"]} == {"text"}
    lo, hi = out["latency"][0]["speedup_ci"]
    assert lo <= out["latency"][0]["speedup"] <= hi
    assert (tmp_path / "s" / "latency_vs_batch.png").is_file()
