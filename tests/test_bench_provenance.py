"""Every benchmark results JSON names its commit, command, machine, versions and time."""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_write_result_records_provenance(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _common

    monkeypatch.setattr(sys, "argv", [str(BENCH / "quality.py"), "--methods", "a b"])
    path = _common.write_result("x", {"rows": [1]}, tmp_path / "x.json")
    doc = json.loads(path.read_text())
    p = doc["provenance"]
    assert p["command"] == "python benchmarks/quality.py --methods 'a b'"
    assert p["git_commit"] is None or len(p["git_commit"]) == 40
    assert set(p) >= {"git_commit", "git_dirty", "command", "machine", "versions", "ran_at_utc"}
    assert p["versions"]["torch"] and p["machine"]["cpu_count"] >= 1
    assert p["ran_at_utc"].endswith("Z") and doc["rows"] == [1]


def test_every_benchmark_writes_through_write_result():
    for f in BENCH.glob("*.py"):
        if f.name.startswith("_"):
            continue
        text = f.read_text()
        assert "write_result(" in text, f"{f.name} writes results without provenance"
