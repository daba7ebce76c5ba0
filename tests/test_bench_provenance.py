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


def test_git_state_taken_once_and_own_results_file_not_dirty(monkeypatch):
    """A long run names the commit it started from, and rewriting its own committed results
    JSON does not make it "dirty"; any other modified tracked file does."""
    monkeypatch.syspath_prepend(str(BENCH))
    import _common

    git = {"head": "a" * 40, "status": "M benchmarks/results/x.json"}  # as _git strips it
    monkeypatch.setattr(_common, "_git", lambda *a: git["head"] if a[0] == "rev-parse"
                        else git["status"])
    monkeypatch.setattr(_common, "_GIT_AT_START", None)
    own = _common.ROOT / "benchmarks" / "results" / "x.json"
    p = _common.provenance(ignore=own)
    assert (p["git_commit"], p["git_dirty"]) == ("a" * 40, False)
    git.update(head="b" * 40, status="M benchmarks/results/x.json\n M vlcompress/a.py")
    p = _common.provenance(ignore=own)
    assert (p["git_commit"], p["git_dirty"]) == ("a" * 40, False)  # the state at the start
    monkeypatch.setattr(_common, "_GIT_AT_START", None)
    p = _common.provenance(ignore=own)
    assert (p["git_commit"], p["git_dirty"]) == ("b" * 40, True)
