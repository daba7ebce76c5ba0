"""The gate's comparison logic on hand-made reports: every threshold, unusable input, output."""

import copy
import json
from xml.etree import ElementTree as ET

import numpy as np
import pytest

from vlcompress.errors import BaselineError, ConfigError
from vlcompress.gate import GateConfig, bootstrap_regression, check_compatible, compare_reports, load_report
from vlcompress.report import SCHEMA_VERSION, accuracy_section, build_report


def _samples(rng, median, n=80, spread=0.05, spikes=0.2):
    """Lognormal jitter around ``median`` plus a fraction of 3-10x load spikes."""
    x = median * rng.lognormal(0.0, spread, n)
    hit = rng.random(n) < spikes
    x[hit] *= rng.uniform(3, 10, hit.sum())
    return [round(float(v), 4) for v in x]


def make_report(*, dense_ms=2.0, pruned_ms=1.0, acc=None, seed=0, n=80, spikes=0.2,
                cells=(("vision", 1), ("vision", 8), ("text", 1))):
    rng = np.random.default_rng(seed)
    rows = []
    for tower, b in cells:
        d = _samples(rng, dense_ms * b, n, spikes=spikes)
        p = _samples(rng, pruned_ms * b, n, spikes=spikes)
        rows.append({"runtime": "onnxruntime", "device": "cpu", "tower": tower, "batch": b,
                     "dense_ms": {"p50": float(np.median(d))}, "pruned_ms": {"p50": float(np.median(p))},
                     "speedup": float(np.median(d) / np.median(p)),
                     "dense_samples_ms": d, "pruned_samples_ms": p})
    acc = acc or {"zeroshot_top1": 0.90, "i2t_r1": 0.60}
    dense = {k: 0.95 for k in acc}
    return build_report(
        model={"name": "tiny-clip", "family": "clip", "params_total": 10, "params_nonzero": 5},
        prune={"method": "multiflow", "pattern": "2:4", "target": 0.5, "achieved": 0.5,
               "per_modality": {}, "seconds": 1.0},
        export={}, accuracy=accuracy_section("shapes:eval", dense, acc, {}), latency=rows,
        env={}, config={})


def by_name(res):
    return {c.name: c for c in res.checks}


def test_unchanged_passes_with_independent_noise():
    # Same model, two independent noisy runs (20% of samples are 3-10x load spikes).
    for seed in range(20):
        res = compare_reports(make_report(seed=100 + seed), make_report(seed=seed),
                              GateConfig(bootstrap=500))
        assert res.passed, res.markdown()
        assert res.exit_code == 0
    assert len(res.checks) == 3 + 2  # 3 latency cells, 2 accuracy metrics


def test_baseline_twice_as_fast_fails_every_cell():
    base = make_report(pruned_ms=0.5, seed=1)
    cur = make_report(pruned_ms=1.0, seed=2)
    res = compare_reports(cur, base)
    assert res.exit_code == 1
    lat = [c for c in res.checks if c.kind == "latency"]
    assert lat and all(not c.passed for c in lat)
    for c in lat:
        assert 0.8 < c.change < 1.2 and c.ci[0] > 0.10
        assert 0.2 < c.baseline < 0.3 and 0.4 < c.current < 0.6
        assert f"baseline {c.baseline:.3f}" in c.message and f"current {c.current:.3f}" in c.message
        assert "BROKEN" in c.message
    assert all(c.passed for c in res.checks if c.kind == "accuracy")


def test_small_regression_within_threshold_passes():
    res = compare_reports(make_report(pruned_ms=1.04, seed=3), make_report(seed=4))
    assert all(c.passed for c in res.checks if c.kind == "latency")


def test_regression_beyond_threshold_but_within_noise_passes():
    # 15% slower but only 6 samples with heavy spikes: the interval cannot exclude 10%.
    cur = make_report(pruned_ms=1.15, seed=5, n=6, spikes=0.4)
    base = make_report(seed=6, n=6, spikes=0.4)
    res = compare_reports(cur, base, GateConfig(metrics=("zeroshot_top1",)))
    for c in res.checks:
        if c.kind == "latency" and c.change > 0.10:
            assert c.passed == (c.ci[0] <= 0.10)


def test_slower_machine_relative_passes_absolute_fails():
    # Everything 2x slower (another machine): the in-run ratio is unchanged.
    cur, base = make_report(dense_ms=4.0, pruned_ms=2.0, seed=7), make_report(seed=8)
    assert compare_reports(cur, base).passed
    res = compare_reports(cur, base, GateConfig(basis="absolute"))
    assert not res.passed and all(not c.passed for c in res.checks if c.kind == "latency")
    assert all(c.unit == "ms" for c in res.checks if c.kind == "latency")
    both = compare_reports(cur, base, GateConfig(basis="both"))
    assert len([c for c in both.checks if c.kind == "latency"]) == 6
    assert len(both.failures) == 3


def test_latency_threshold_is_configurable():
    cur, base = make_report(pruned_ms=1.3, seed=9), make_report(seed=10)
    assert not compare_reports(cur, base, GateConfig(max_latency_regression=0.10)).passed
    assert compare_reports(cur, base, GateConfig(max_latency_regression=0.60)).passed


def test_accuracy_thresholds():
    base = make_report(acc={"zeroshot_top1": 0.90, "i2t_r1": 0.60})
    # 5-point drop: broken; both values named
    res = compare_reports(make_report(acc={"zeroshot_top1": 0.85, "i2t_r1": 0.60}), base)
    c = by_name(res)["accuracy zeroshot_top1"]
    assert not c.passed and abs(c.change - 0.05) < 1e-9
    assert "90.00%" in c.message and "85.00%" in c.message and "1.00 pt" in c.message
    assert by_name(res)["accuracy i2t_r1"].passed
    assert [f.name for f in res.failures] == ["accuracy zeroshot_top1"]
    # exactly at the threshold and an improvement: fine
    res = compare_reports(make_report(acc={"zeroshot_top1": 0.89, "i2t_r1": 0.70}), base)
    assert all(c.passed for c in res.checks if c.kind == "accuracy")
    # a looser threshold lets the 5-point drop through
    res = compare_reports(make_report(acc={"zeroshot_top1": 0.85, "i2t_r1": 0.60}), base,
                          GateConfig(max_accuracy_drop=0.06))
    assert res.passed


def test_metric_selection():
    base = make_report()
    cur = make_report(acc={"zeroshot_top1": 0.90, "i2t_r1": 0.10})
    assert compare_reports(cur, base, GateConfig(metrics="zeroshot_top1")).passed
    with pytest.raises(BaselineError, match="accuracy.metrics.t2i_r1"):
        compare_reports(cur, base, GateConfig(metrics=("t2i_r1",)))


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("schema_version"), "schema_version"),
    (lambda r: r.update(schema_version=SCHEMA_VERSION + 1), "schema_version"),
    (lambda r: r.pop("latency"), "'latency'"),
    (lambda r: r.pop("accuracy"), "'accuracy'"),
    (lambda r: r["latency"][1].pop("pruned_samples_ms"), "latency[1].pruned_samples_ms"),
    (lambda r: r["latency"][0].pop("batch"), "latency[0].batch"),
    (lambda r: r["latency"][0].update(dense_samples_ms=[1.0]), "latency[0].dense_samples_ms"),
    (lambda r: r["accuracy"]["metrics"]["i2t_r1"].pop("pruned"), "accuracy.metrics.i2t_r1.pruned"),
    (lambda r: r["accuracy"].pop("dataset"), "accuracy.dataset"),
    (lambda r: r["accuracy"].update(dataset="folder:x"), "accuracy.dataset"),
    (lambda r: r["latency"].append({**r["latency"][0], "batch": 64}), "text@64"),
])
def test_unusable_baseline_names_the_field(mutate, field):
    base = make_report()
    if field == "text@64":
        base["latency"].append({**base["latency"][2], "batch": 64})
        field = "latency[onnxruntime/cpu text@64]"
    else:
        mutate(base)
    with pytest.raises(BaselineError) as exc:
        compare_reports(make_report(seed=1), base)
    assert field in str(exc.value)
    assert exc.value.exit_code == 2


def test_schema_version_mismatch_message():
    base = make_report()
    base["schema_version"] = 0
    with pytest.raises(BaselineError, match=r"schema_version 0.*reads schema_version 1"):
        check_compatible(base)


def test_eval_size_mismatch_and_missing_current_accuracy():
    base, cur = make_report(), make_report()
    base["accuracy"]["n"], cur["accuracy"]["n"] = 720, 96
    with pytest.raises(BaselineError, match="accuracy.n"):
        compare_reports(cur, base)
    cur = make_report()
    cur["accuracy"] = None
    with pytest.raises(BaselineError, match="current report field 'accuracy'"):
        compare_reports(cur, make_report())


def test_parts_missing_on_one_side():
    # a baseline without accuracy (preset model) gates latency only, with a note
    base = make_report()
    base["accuracy"] = None
    res = compare_reports(make_report(seed=1), base)
    assert {c.kind for c in res.checks} == {"latency"}
    assert any("no accuracy" in n for n in res.notes)
    # extra current cells are noted, not gated
    cur = make_report(cells=(("vision", 1), ("vision", 8), ("text", 1), ("text", 8)))
    res = compare_reports(cur, make_report())
    assert any("text@8" in n for n in res.notes) and len(res.checks) == 5
    # deliberately not measured parts are not gated
    res = compare_reports(make_report(seed=1), make_report(), latency=False)
    assert {c.kind for c in res.checks} == {"accuracy"} and any("latency" in n for n in res.notes)
    # nothing comparable at all
    a, b = make_report(), make_report()
    a["accuracy"] = b["accuracy"] = None
    a["latency"] = b["latency"] = []
    with pytest.raises(BaselineError, match="nothing to compare"):
        compare_reports(a, b)


def test_load_report_errors(tmp_path):
    with pytest.raises(BaselineError, match="does not exist"):
        load_report(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BaselineError, match="not valid JSON"):
        load_report(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(BaselineError, match="not a JSON object"):
        load_report(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(make_report()))
    assert load_report(good)["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("kw", [dict(max_latency_regression=-0.1), dict(max_accuracy_drop=2),
                                dict(basis="p50"), dict(quantile=1.0), dict(confidence=0.3),
                                dict(bootstrap=10)])
def test_gate_config_validation(kw):
    with pytest.raises(ConfigError):
        GateConfig(**kw)


def test_bootstrap_is_seeded_and_brackets_the_point():
    rng = np.random.default_rng(0)
    cur = (rng.lognormal(0, 0.1, 60), 2 * rng.lognormal(0, 0.1, 60))
    base = (rng.lognormal(0, 0.1, 60), rng.lognormal(0, 0.1, 60))
    a = bootstrap_regression(cur, base, seed=3)
    assert a == bootstrap_regression(cur, base, seed=3)
    point, lo, hi = a
    assert lo <= point <= hi and 0.7 < point < 1.3
    p_abs, _, _ = bootstrap_regression(cur, base, relative=False)
    assert 0.7 < p_abs < 1.3


def test_markdown_contents():
    base = make_report(pruned_ms=0.5, acc={"zeroshot_top1": 0.95, "i2t_r1": 0.6})
    res = compare_reports(make_report(acc={"zeroshot_top1": 0.90, "i2t_r1": 0.6}), base,
                          baseline_name="cache/baseline.json")
    md = res.markdown()
    assert md.startswith("## vlcompress gate")
    assert f"**FAILED**: {len(res.failures)} of {len(res.checks)} checks broken" in md
    assert "`cache/baseline.json`" in md
    assert "| accuracy zeroshot_top1 | 95.00% | 90.00% | -5.00 pt | ≤ 1.00 pt drop | **FAIL** |" in md
    assert "| accuracy i2t_r1 | 60.00% | 60.00% | +0.00 pt | ≤ 1.00 pt drop | pass |" in md
    assert "| latency onnxruntime/cpu vision@1 relative | 0.2" in md
    assert md.count("**FAIL**") == len(res.failures) == 4
    ok = compare_reports(make_report(seed=1), make_report()).markdown()
    assert "**PASSED**: all 5 checks hold" in ok and "FAIL" not in ok


def test_junit_contents():
    base = make_report(pruned_ms=0.5)
    res = compare_reports(make_report(acc={"zeroshot_top1": 0.8, "i2t_r1": 0.6}), base)
    root = ET.fromstring(res.junit_xml())
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == len(res.checks) == 5
    assert suite.get("tests") == "5" and suite.get("failures") == "4"
    failed = {c.get("name"): c.find("failure") for c in cases}
    assert failed["accuracy i2t_r1"] is None
    f = failed["accuracy zeroshot_top1"]
    assert "90.00%" in f.get("message") and "80.00%" in f.get("message")
    assert {c.get("classname") for c in cases} == {"vlcompress.gate.latency", "vlcompress.gate.accuracy"}
    ok = ET.fromstring(compare_reports(make_report(seed=1), make_report()).junit_xml())
    assert ok.find("testsuite").get("failures") == "0" and not ok.findall(".//failure")


def test_result_to_dict_is_json():
    res = compare_reports(make_report(seed=1), copy.deepcopy(make_report()))
    d = json.loads(json.dumps(res.to_dict()))
    assert d["passed"] is True and len(d["checks"]) == 5 and d["config"]["quantile"] == 0.25
