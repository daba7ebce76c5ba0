"""The CLI through Typer's CliRunner: happy paths and every bad input of the core issue."""

import json

import pytest
from typer.testing import CliRunner

from vlcompress.cli import app

runner = CliRunner()
FAST = ["--calibration-size", "16", "--eval-size", "48", "--batch-sizes", "1,2", "--iterations", "3"]


def run(*args):
    return runner.invoke(app, list(args))


def assert_one_line_error(res, *needles):
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_version():
    res = run("--version")
    assert res.exit_code == 0 and res.stdout.startswith("vlcompress ")


def test_models_lists_bundled_and_methods():
    res = run("models")
    assert res.exit_code == 0 and "tiny-clip" in res.stdout
    res = run("models", "--methods")
    assert res.exit_code == 0
    for m in ("magnitude", "random", "wanda", "multiflow"):
        assert m in res.stdout


def test_prune_export_happy_path(tmp_path):
    out = tmp_path / "run"
    res = run("prune-export", "--out", str(out), *FAST)
    assert res.exit_code == 0, res.output
    for f in ("report.json", "report.md", "dense/vision.onnx", "dense/text.onnx",
              "pruned/vision.onnx", "pruned/text.onnx", "pruned/model/config.json",
              "pruned/model/model.safetensors"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    assert rep["prune"]["method"] == "multiflow" and rep["prune"]["pattern"] == "2:4"
    assert abs(rep["prune"]["achieved"] - 0.5) < 1e-6
    assert {r["batch"] for r in rep["latency"]} == {1, 2}
    assert {r["tower"] for r in rep["latency"]} == {"vision", "text"}
    for key in ("zeroshot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert set(rep["accuracy"]["metrics"][key]) == {"dense", "pruned", "delta"}
    assert "image_cosine" in rep["accuracy"]["fidelity"]
    assert "zero-shot top-1" in res.stdout and "speedup" in res.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_prune_then_export(tmp_path):
    res = run("prune", "--method", "magnitude", "--pattern", "unstructured", "--sparsity", "0.3",
              "--calibration-size", "8", "--out", str(tmp_path / "p"))
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "p" / "prune.json").read_text())
    assert abs(info["achieved"] - 0.3) < 1e-3
    res = run("export", str(tmp_path / "p"), "--out", str(tmp_path / "onnx"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "onnx" / "vision.onnx").is_file() and (tmp_path / "onnx" / "text.onnx").is_file()


@pytest.mark.parametrize("args,needles", [
    (["--sparsity", "abc", "--pattern", "unstructured"], ["'abc'", "0 <= sparsity < 1"]),
    (["--sparsity", "1.5", "--pattern", "unstructured"], ["'1.5'", "0 <= sparsity < 1"]),
    (["--sparsity", "-0.1", "--pattern", "unstructured"], ["'-0.1'", "0 <= sparsity < 1"]),
    (["--method", "nope"], ["'nope'", "multiflow"]),
    (["--pattern", "diagonal"], ["'diagonal'", "N:M"]),
    (["--pattern", "4:2"], ["'4:2'", "0 < N < M"]),
    (["--pattern", "0:4"], ["'0:4'", "0 < N < M"]),
    (["--pattern", "2:4", "--sparsity", "0.3"], ["0.3", "2:4"]),
    (["--model", "./no/such/model"], ["./no/such/model"]),
    (["--engine", "tpu"], ["'tpu'", "onnxruntime"]),
    (["--batch-sizes", "1,x"], ["'x'", "positive integers"]),
])
def test_bad_input_one_line(tmp_path, args, needles):
    out = tmp_path / "run"
    res = run("prune-export", "--out", str(out), *args)
    assert_one_line_error(res, *needles)
    assert not out.exists()


def test_empty_calibration_folder(tmp_path):
    d = tmp_path / "calib"
    d.mkdir()
    (d / "captions.jsonl").write_text("")
    res = run("prune-export", "--out", str(tmp_path / "run"), "--calibration", str(d))
    assert_one_line_error(res, str(d), "empty")
    assert not (tmp_path / "run").exists()


def test_corrupt_calibration_image_is_named(tmp_path):
    from vlcompress.data import shapes

    d = tmp_path / "calib"
    d.mkdir()
    img, s = shapes.sample("calibration", 0)
    img.save(d / "good.png")
    (d / "bad.png").write_bytes(b"not a png at all")
    (d / "captions.jsonl").write_text(
        json.dumps({"image": "good.png", "caption": s.caption}) + "\n"
        + json.dumps({"image": "bad.png", "caption": "a red circle"}) + "\n")
    res = run("prune-export", "--out", str(tmp_path / "run"), "--calibration", str(d))
    assert_one_line_error(res, "bad.png")
    assert not (tmp_path / "run").exists()


def test_out_is_existing_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    res = run("prune-export", "--out", str(f))
    assert_one_line_error(res, str(f), "existing file")
    assert f.read_text() == "keep me"


def test_out_non_empty_folder_needs_force(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    res = run("prune-export", "--out", str(d))
    assert_one_line_error(res, str(d), "--force")
    assert (d / "precious.txt").read_text() == "x"


def test_debug_shows_traceback(tmp_path):
    res = run("--debug", "prune-export", "--out", str(tmp_path / "r"), "--method", "nope")
    assert res.exit_code != 0 and res.exception is not None


def test_prune_export_torch_engine(tmp_path):
    out = tmp_path / "run"
    res = run("prune-export", "--out", str(out), "--engine", "torch", "--method", "wanda",
              "--pattern", "unstructured", "--sparsity", "0.6", *FAST)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert {r["runtime"] for r in rep["latency"]} == {"torch"}
    assert abs(rep["prune"]["achieved"] - 0.6) < 0.01  # wanda floors per row: 76 of 128


def test_trt_engine_fails_before_work_on_cpu(tmp_path):
    res = run("prune-export", "--out", str(tmp_path / "run"), "--engine", "trt")
    assert_one_line_error(res, "CUDA")
    assert not (tmp_path / "run").exists()


def test_method_option_is_checked_before_any_work(tmp_path):
    out = tmp_path / "o"
    res = run("prune-export", "--method", "upop", "--pattern", "structured", "--sparsity", "0.5",
              "--method-option", "search_steps=2", "--method-option", "warp=9", "--out", str(out))
    assert res.exit_code == 2
    assert_one_line_error(res, "method 'upop' has no option 'warp'", "search_steps=")
    assert not out.exists()
    res = run("prune", "--method", "ecoflap", "--pattern", "unstructured", "--sparsity", "0.5",
              "--method-option", "num_noise=0", "--out", str(out))
    assert_one_line_error(res, "ecoflap.num_noise='0' is not valid", "int >= 1")
    res = run("models", "--methods")
    assert "retrain_steps=" in res.stdout and "estimator=tensor" in res.stdout


def test_method_option_reaches_the_method(tmp_path):
    out = tmp_path / "p"
    res = run("prune", "--method", "ecoflap", "--pattern", "unstructured", "--sparsity", "0.5",
              "--calibration-size", "16", "--method-option", "zo_pairs=16",
              "--method-option", "estimator=block-spsa", "--out", str(out))
    assert res.exit_code == 0, res.output
    info = json.loads((out / "prune.json").read_text())
    assert info["details"]["method_options"]["estimator"] == "block-spsa"
    assert info["details"]["zo_pairs"] == 16
