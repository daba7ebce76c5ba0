"""``sweep``: cell planning, and one tiny real sweep through the API and the CLI."""

import json

import pytest
from conftest import RecordingProgress, make_tiny_random_clip
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.errors import ConfigError
from vlcompress.sweep import plan_cells, sweep

PNG = b"\x89PNG\r\n\x1a\n"


def test_plan_cells():
    cells = plan_cells("magnitude,wanda", "0.3, 0.5", "unstructured,2:4")
    assert [(c.method, c.pattern, c.sparsity) for c in cells] == [
        ("magnitude", "unstructured", 0.3), ("magnitude", "unstructured", 0.5),
        ("wanda", "unstructured", 0.3), ("wanda", "unstructured", 0.5),
        ("magnitude", "2:4", 0.5), ("wanda", "2:4", 0.5)]  # N:M: one cell per method
    assert cells[0].setting == "unstructured 30%" and cells[-1].setting == "2:4"
    assert len(plan_cells(["magnitude"], [], ["2:4"])) == 1


@pytest.mark.parametrize("args, needle", [
    (("nope", "0.5", "unstructured"), "unknown method"),
    (("magnitude", "0.5", "3:2"), "3:2"),
    (("magnitude", "1.5", "unstructured"), "1.5"),
    (("magnitude", "half", "unstructured"), "half"),
    (("magnitude", "", "unstructured"), "--sparsities"),
    (("", "0.5", "unstructured"), "--methods"),
])
def test_plan_cells_rejects_bad_input(args, needle):
    with pytest.raises(ConfigError, match=needle):
        plan_cells(*args)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep") / "tiny"
    make_tiny_random_clip().save(d)
    return d


def test_sweep_writes_table_and_plots(model_dir, tmp_path):
    rec = RecordingProgress()
    res = sweep(str(model_dir), "magnitude,random", "0.3,0.6", "unstructured,2:4", out=tmp_path / "s",
                calibration_size=16, eval_size=16, batch_sizes="1,2", runtime="torch", warmup=1,
                iterations=2, progress=rec)
    out = tmp_path / "s"
    assert len(res["rows"]) == 2 * 2 + 2
    assert {(r["setting"], r["tower"], r["batch"]) for r in res["latency"]} == {
        (s, t, b) for s in ("unstructured 30%", "unstructured 60%", "2:4")
        for t in ("vision", "text") for b in (1, 2)}
    assert all("dense_samples_ms" not in r for r in res["latency"])
    assert json.loads((out / "sweep.json").read_text())["rows"] == res["rows"]
    md = (out / "sweep.md").read_text()
    assert "| random | unstructured 60% |" in md and "| magnitude | 2:4 | 50.0% |" in md
    assert "speedup" in md
    for png in ("accuracy_vs_sparsity.png", "latency_vs_batch.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert rec.seen and rec.seen[-1] == ("sweep", 6 + 3)


def test_sweep_cli_accuracy_only(model_dir, tmp_path):
    res = CliRunner().invoke(app, ["sweep", "--model", str(model_dir), "--methods", "magnitude",
                                   "--sparsities", "0.5", "--patterns", "unstructured",
                                   "--calibration-size", "16", "--eval-size", "16", "--no-latency",
                                   "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stdout and "sweep.md" in res.stdout
    assert "| magnitude | unstructured 50% |" in (tmp_path / "s" / "sweep.md").read_text()
    assert (tmp_path / "s" / "accuracy_vs_sparsity.png").is_file()
    assert not (tmp_path / "s" / "latency_vs_batch.png").exists()
    res = CliRunner().invoke(app, ["sweep", "--methods", "nope", "--out", str(tmp_path / "t")])
    assert res.exit_code == 2 and "unknown method" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "t").exists()


def test_sweep_method_options_reach_each_method(model_dir, tmp_path):
    """``--method-option METHOD.KEY=VALUE`` reaches that method's cells (recorded per row),
    and a bad one is refused before any work: unknown method, no method, unknown key."""
    res = CliRunner().invoke(app, [
        "sweep", "--model", str(model_dir), "--methods", "magnitude,sparsegpt",
        "--patterns", "2:4", "--calibration-size", "8", "--eval-size", "16", "--no-latency",
        "--method-option", "sparsegpt.next_block_inputs=dense",
        "--method-option", "sparsegpt.blocksize=64", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    by = {r["method"]: r for r in rows}
    assert by["sparsegpt"]["method_options"] == {"blocksize": 64, "percdamp": 0.01,
                                                 "next_block_inputs": "dense", "refine_iters": 50,
                                                 "max_cache_mb": -1.0, "cache_dir": "",
                                                 "device": ""}
    assert "method_options" not in by["magnitude"]
    for opt, needle in (("wanda.x=1", "not in --methods"), ("blocksize=64", "names no method"),
                        ("sparsegpt.nope=1", "no option 'nope'"),
                        ("sparsegpt.blocksize=0", "blocksize")):
        r = CliRunner().invoke(app, ["sweep", "--model", str(model_dir), "--methods",
                                     "magnitude,sparsegpt", "--patterns", "2:4",
                                     "--method-option", opt, "--out", str(tmp_path / "t")])
        assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output, opt
        assert not (tmp_path / "t").exists()
