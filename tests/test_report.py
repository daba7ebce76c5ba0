import json

from vlcompress.report import accuracy_section, build_report, to_markdown, write_report


def _report():
    acc = accuracy_section("shapes:eval", {"zeroshot_top1": 0.95, "i2t_r1": 0.5},
                           {"zeroshot_top1": 0.90, "i2t_r1": 0.4}, {"image_cosine": 0.97})
    lat = [{"runtime": "onnxruntime", "device": "cpu", "tower": "vision", "batch": 1,
            "dense_ms": {"p50": 2.0, "p90": 2.2, "p99": 2.5},
            "pruned_ms": {"p50": 1.0, "p90": 1.1, "p99": 1.2},
            "speedup": 2.0}]
    return build_report(
        model={"name": "m", "family": "clip", "params_total": 1000, "params_nonzero": 600},
        prune={"method": "multiflow", "pattern": "2:4", "target": 0.5, "achieved": 0.5,
               "per_modality": {"vision": 0.5, "text": 0.5}, "seconds": 1.25},
        export={"max_abs_diff": {"dense": {"vision": 1e-6}, "pruned": {"vision": 2e-6}}},
        accuracy=acc, latency=lat, env={"cpu": "x", "packages": {"torch": "2"}}, config={})


def test_accuracy_section_deltas():
    acc = _report()["accuracy"]
    assert abs(acc["metrics"]["zeroshot_top1"]["delta"] + 0.05) < 1e-9
    assert acc["fidelity"]["image_cosine"] == 0.97


def test_schema_fields():
    r = _report()
    for k in ("schema_version", "model", "prune", "export", "accuracy", "latency", "env"):
        assert k in r
    assert {"params_total", "params_nonzero"} <= set(r["model"])


def test_markdown_and_write(tmp_path):
    md = to_markdown(_report())
    assert "| zero-shot top-1 | 95.0% | 90.0% | -5.0 pt |" in md
    assert "2.00x" in md and "multiflow" in md and "1.00e-06" in md
    j, m = write_report(_report(), tmp_path)
    assert json.loads(j.read_text())["prune"]["method"] == "multiflow"
    assert m.read_text() == md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
