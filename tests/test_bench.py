"""``vlcompress bench`` through CliRunner on a real (tiny) prune-export folder: exit codes,
report, Markdown summary, JUnit. Latency thresholds here are set so loose (or baselines so
extreme) that no assertion depends on measured speed."""

import json

import pytest
from conftest import make_tiny_random_clip
from typer.testing import CliRunner

from vlcompress.bench import BenchConfig, benchmark
from vlcompress.cli import app

runner = CliRunner()
FAST = ["--iterations", "5", "--warmup", "1"]
LOOSE = ["--max-latency-regression", "50"]  # 5000%: latency can never break it in a test


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A prune-export folder built by hand around a tiny random CLIP, timed on the torch
    runtime (no ONNX export: that costs tens of seconds; bench's ONNX path is the same
    harness with other runners)."""
    from vlcompress.envinfo import env_info
    from vlcompress.prune import prune
    from vlcompress.report import build_report, write_report

    root = tmp_path_factory.mktemp("bench")
    vlm = make_tiny_random_clip()
    vlm.save(root / "dense_model")
    res = prune(vlm, "magnitude", 0.5, "unstructured")
    run = root / "run"
    vlm.save(run / "pruned" / "model")
    total, nonzero = vlm.num_parameters()
    report = build_report(
        model={"name": str(root / "dense_model"), "family": "clip", "source": "test",
               "params_total": total, "params_nonzero": nonzero},
        prune=res.to_dict(), export={"format": "none", "paths": {"model": "pruned/model"}},
        accuracy={"dataset": "shapes:eval", "metrics": {}, "fidelity": {}}, latency=[],
        env=env_info(), config={"engine": "torch", "device": "cpu", "eval_data": "shapes",
                                "eval_size": 24, "batch_sizes": [1, 2]})
    write_report(report, run)
    return run


@pytest.fixture(scope="module")
def bench_report(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("baseline") / "baseline.json"
    res = runner.invoke(app, ["bench", str(run_dir), "--report", str(path), *FAST])
    assert res.exit_code == 0, res.output
    return path


def invoke(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def write(path, report):
    path.write_text(json.dumps(report))
    return path


def assert_one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bench_without_baseline_writes_a_fresh_report(bench_report, run_dir):
    rep = json.loads(bench_report.read_text())
    assert rep["schema_version"] == 1 and "gate" not in rep
    assert rep["bench"]["run_dir"] == str(run_dir)
    assert {(r["tower"], r["batch"]) for r in rep["latency"]} == {(t, b) for t in ("vision", "text")
                                                                  for b in (1, 2)}
    for row in rep["latency"]:
        assert len(row["dense_samples_ms"]) == len(row["pruned_samples_ms"]) == 5
        assert {"p50", "p90", "p99"} <= set(row["dense_ms"])
    assert rep["accuracy"]["n"] == 24 and rep["accuracy"]["dataset"] == "shapes:eval"
    assert bench_report.with_suffix(".md").read_text().startswith("# vlcompress report")


def test_gate_passes_and_writes_summary_junit_and_step_summary(run_dir, bench_report, tmp_path):
    step = tmp_path / "step.md"
    step.write_text("earlier step\n")
    res = invoke("bench", run_dir, "--baseline", bench_report, "--report", tmp_path / "r.json",
                 "--summary", tmp_path / "s.md", "--junit", tmp_path / "j.xml", *FAST, *LOOSE,
                 env={"GITHUB_STEP_SUMMARY": str(step)})
    assert res.exit_code == 0, res.output
    summary = (tmp_path / "s.md").read_text()
    assert "**PASSED**" in summary and "# vlcompress report" in summary
    assert step.read_text().startswith("earlier step\n") and "**PASSED**" in step.read_text()
    junit = (tmp_path / "j.xml").read_text()
    assert junit.count("<testcase ") == 4 + 5 and "<failure" not in junit
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["gate"]["passed"] is True and rep["bench"]["baseline"] == str(bench_report)


def test_accuracy_drop_exits_1_naming_both_values(run_dir, bench_report, tmp_path):
    base = json.loads(bench_report.read_text())
    m = base["accuracy"]["metrics"]["i2t_r5"]
    m["pruned"] = min(1.0, m["pruned"] + 0.2)  # the baseline was 20 points better
    want = f"{100 * m['pruned']:.2f}%"
    res = invoke("bench", run_dir, "--baseline", write(tmp_path / "b.json", base), "--report",
                 tmp_path / "r.json", "--junit", tmp_path / "j.xml", "--summary", tmp_path / "s.md",
                 *FAST, *LOOSE)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    fail_lines = [ln for ln in res.stderr.splitlines() if ln.startswith("FAIL")]
    assert len(fail_lines) == 1 and "image→text R@5" in fail_lines[0] and want in fail_lines[0]
    assert "1 of 9 thresholds broken" in res.stderr
    assert "<failure" in (tmp_path / "j.xml").read_text()
    assert "**FAILED**: 1 of 9" in (tmp_path / "s.md").read_text()
    # a looser accuracy threshold lets it pass
    res = invoke("bench", run_dir, "--baseline", tmp_path / "b.json", "--report", tmp_path / "r.json",
                 "--max-accuracy-drop", "0.5", *FAST, *LOOSE)
    assert res.exit_code == 0, res.output


def test_latency_regression_exits_1(run_dir, bench_report, tmp_path):
    # A baseline whose pruned model was 1000x faster than its dense one: whatever this
    # machine measures now, the pruned/dense ratio is far beyond +10%.
    base = json.loads(bench_report.read_text())
    for row in base["latency"]:
        row["pruned_samples_ms"] = [x / 1000 for x in row["dense_samples_ms"]]
    res = invoke("bench", run_dir, "--baseline", write(tmp_path / "b.json", base), "--report",
                 tmp_path / "r.json", "--no-accuracy", *FAST)
    assert res.exit_code == 1, res.output
    fails = [ln for ln in res.stderr.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 4 and all("latency" in f and "baseline 0.001" in f for f in fails)
    assert "accuracy not measured" in res.stdout


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r.update(schema_version=99), "schema_version 99"),
    (lambda r: r["latency"][0].pop("dense_samples_ms"), "latency[0].dense_samples_ms"),
    (lambda r: r["accuracy"].pop("metrics"), "accuracy.metrics"),
    (lambda r: r["accuracy"].update(dataset="elsewhere"), "accuracy.dataset"),
])
def test_unusable_baseline_exits_2_naming_the_field(run_dir, bench_report, tmp_path, mutate, needle):
    base = json.loads(bench_report.read_text())
    mutate(base)
    res = invoke("bench", run_dir, "--baseline", write(tmp_path / "b.json", base), "--report",
                 tmp_path / "r.json", *FAST)
    assert_one_line_error(res, needle)


def test_missing_inputs_exit_2(run_dir, tmp_path):
    assert_one_line_error(invoke("bench", run_dir, "--baseline", tmp_path / "none.json"),
                          "none.json", "does not exist")
    assert_one_line_error(invoke("bench", tmp_path / "norun"), "norun", "does not exist")
    assert_one_line_error(invoke("bench", run_dir, "--junit", tmp_path / "j.xml"), "--junit needs --baseline")
    assert_one_line_error(invoke("bench", run_dir, "--latency-basis", "fast"), "latency basis")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("bench", tmp_path / "empty"), "no report.json")


def test_unknown_gated_metric_refused_before_the_model_loads(run_dir, bench_report, tmp_path,
                                                             monkeypatch):
    import vlcompress.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --metrics was checked")

    monkeypatch.setattr(vlcompress.models, "load_model", no_load)
    res = invoke("bench", run_dir, "--baseline", bench_report, "--metrics", "zeroshot_top1,bogus",
                 "--report", tmp_path / "r.json", *FAST)
    assert_one_line_error(res, "--metrics bogus", "baseline", "zeroshot_top1")
    assert not (tmp_path / "r.json").exists()


def test_benchmark_python_api(run_dir, tmp_path):
    res = benchmark(BenchConfig(run_dir=str(run_dir), report=str(tmp_path / "x.json"), latency=False))
    assert res.gate is None and res.exit_code == 0 and res.report["latency"] == []
    assert res.report_path.is_file() and res.markdown_path.is_file()
    assert "zeroshot_top1" in res.report["accuracy"]["metrics"]
