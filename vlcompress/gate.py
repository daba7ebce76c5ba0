"""The CI gate: compare a fresh report with a baseline report, threshold by threshold.

    result = compare_reports(current, baseline, GateConfig(max_latency_regression=0.10))
    result.exit_code        # 0 every check holds, 1 at least one threshold broken
    result.markdown()       # for a CI job summary
    result.junit_xml()      # one <testcase> per check

Unusable input (no such file, another ``schema_version``, a field the comparison needs is
missing, reports of different eval data or latency cells) raises :class:`BaselineError`
naming the field: exit code 2 in the CLI. A broken threshold is a normal outcome, not an
exception.

**Latency** is gated per latency cell (runtime, device, tower, batch) on the *pruned*
model. By default (``basis="relative"``) the statistic of a run is
``Q(pruned_ms) / Q(dense_ms)``, with ``Q`` the lower quartile (``quantile=0.25``) of the
per-iteration times: the dense model, timed interleaved with the pruned one in the same
process, is the in-run reference, so machine speed and slow drift cancel out, and the lower
quartile is the time of an undisturbed call, which a busy shared machine (calls
descheduled, thread pools stalled) leaves alone where it wrecks the mean and even the
median. The regression is ``stat(current) / stat(baseline) - 1``; a seeded bootstrap over
iterations (each report resampled on its own) gives a one-sided lower confidence bound,
and the check fails only when that lower bound is above the threshold: the regression is
beyond both the threshold and the noise. ``basis="absolute"`` compares ``Q(pruned_ms)``
instead (only meaningful on one pinned machine); ``basis="both"`` gates both. See
docs/ci.md for why.

**Accuracy** is gated per metric on the pruned model's value: it fails when
``baseline - current > max_accuracy_drop`` (absolute, e.g. 0.01 = 1 point). Evaluation
is deterministic on fixed data, so no interval is needed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from .errors import BaselineError, ConfigError
from .report import METRIC_NAMES, RAW_METRICS, SCHEMA_VERSION

BASES = ("relative", "absolute", "both")
_EPS = 1e-9  # float noise in accuracy values (an unchanged model evaluates bit-identically)


@dataclass(frozen=True)
class GateConfig:
    """Thresholds and the statistics of the comparison; validated on construction."""

    max_latency_regression: float = 0.10
    max_accuracy_drop: float = 0.01
    basis: str = "relative"
    quantile: float = 0.25  # of per-iteration times: the lower quartile, robust to load spikes
    confidence: float = 0.95
    bootstrap: int = 2000
    seed: int = 0
    metrics: tuple[str, ...] | None = None  # accuracy metrics to gate; None: all in both reports

    def __post_init__(self):
        if not (isinstance(self.max_latency_regression, (int, float))
                and 0 <= self.max_latency_regression < 100):
            raise ConfigError(f"max latency regression {self.max_latency_regression!r} is not "
                              "valid; allowed: a fraction >= 0 (0.10 = 10% slower)")
        if not (isinstance(self.max_accuracy_drop, (int, float)) and 0 <= self.max_accuracy_drop <= 1):
            raise ConfigError(f"max accuracy drop {self.max_accuracy_drop!r} is not valid; "
                              "allowed: 0 <= drop <= 1 (0.01 = 1 point)")
        if self.basis not in BASES:
            raise ConfigError(f"latency basis {self.basis!r} is not valid; allowed: {', '.join(BASES)}")
        if not 0 < self.quantile < 1:
            raise ConfigError(f"latency quantile {self.quantile!r} is not valid; allowed: 0 < q < 1 "
                              "(0.5 = median, 0.25 = lower quartile)")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"confidence {self.confidence!r} is not valid; allowed: 0.5 <= c < 1")
        if not isinstance(self.bootstrap, int) or self.bootstrap < 100:
            raise ConfigError(f"bootstrap {self.bootstrap!r} is not valid; allowed: an integer >= 100")
        if isinstance(self.metrics, str):
            object.__setattr__(self, "metrics", tuple(m.strip() for m in self.metrics.split(",")
                                                      if m.strip()) or None)


@dataclass
class Check:
    """One threshold check: one latency cell on one basis, or one accuracy metric."""

    kind: str  # "latency" | "accuracy"
    name: str  # e.g. "latency onnxruntime/cpu vision@8 (pruned/dense)", "accuracy zeroshot_top1"
    passed: bool
    baseline: float
    current: float
    change: float  # relative latency regression, or absolute accuracy drop (positive = worse)
    threshold: float
    message: str
    ci: tuple[float, float] | None = None  # bootstrap interval of ``change`` (latency)
    unit: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci) if self.ci else None
        return d


@dataclass
class GateResult:
    checks: list[Check]
    config: GateConfig
    notes: list[str] = field(default_factory=list)
    baseline: str = ""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict:
        return {"passed": self.passed, "baseline": self.baseline,
                "config": {**asdict(self.config),
                           "metrics": list(self.config.metrics) if self.config.metrics else None},
                "checks": [c.to_dict() for c in self.checks], "notes": list(self.notes)}

    def markdown(self) -> str:
        return gate_markdown(self)

    def junit_xml(self) -> str:
        return gate_junit_xml(self)


# ---------------------------------------------------------------------------- loading

def load_report(path: str | Path, role: str = "baseline") -> dict:
    """Read a report JSON; :class:`BaselineError` when missing, unreadable or not a report."""
    p = Path(path)
    if not p.is_file():
        raise BaselineError(f"{role} report {str(p)!r} does not exist")
    try:
        r = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineError(f"{role} report {str(p)!r} is not valid JSON: {exc}") from None
    if not isinstance(r, dict):
        raise BaselineError(f"{role} report {str(p)!r} is not a JSON object")
    return r


def check_compatible(report: dict, role: str = "baseline") -> None:
    """The fields every comparison needs, with the schema version of this release."""
    if "schema_version" not in report:
        raise BaselineError(f"{role} report has no field 'schema_version'")
    if report["schema_version"] != SCHEMA_VERSION:
        raise BaselineError(f"{role} report has schema_version {report['schema_version']!r}; this "
                            f"vlcompress reads schema_version {SCHEMA_VERSION} (regenerate it)")
    for key in ("accuracy", "latency"):
        if key not in report:
            raise BaselineError(f"{role} report has no field {key!r}")
    if report["latency"] is not None and not isinstance(report["latency"], list):
        raise BaselineError(f"{role} report field 'latency' is not a list of rows")
    for i, row in enumerate(report["latency"] or []):
        for k in ("runtime", "device", "tower", "batch", "dense_samples_ms", "pruned_samples_ms"):
            if not isinstance(row, dict) or k not in row:
                raise BaselineError(
                    f"{role} report field 'latency[{i}].{k}' is missing"
                    + (" (raw per-iteration samples, needed for the confidence interval; "
                       "regenerate the report with this vlcompress)" if k.endswith("samples_ms") else ""))
        d, p = row["dense_samples_ms"], row["pruned_samples_ms"]
        if not d or len(d) != len(p):
            raise BaselineError(f"{role} report field 'latency[{i}].dense_samples_ms' is empty or "
                                "not paired with 'pruned_samples_ms' (lengths differ)")
    acc = report["accuracy"]
    if acc is not None:
        if not isinstance(acc, dict) or "metrics" not in acc or "dataset" not in acc:
            missing = "metrics" if isinstance(acc, dict) and "metrics" not in acc else "dataset"
            raise BaselineError(f"{role} report field 'accuracy.{missing}' is missing")
        for m, v in acc["metrics"].items():
            if not isinstance(v, dict) or "pruned" not in v:
                raise BaselineError(f"{role} report field 'accuracy.metrics.{m}.pruned' is missing")


def _cell(row: dict) -> tuple:
    return (row["runtime"], row["device"], row["tower"], int(row["batch"]))


def _cell_name(key: tuple) -> str:
    return f"{key[0]}/{key[1]} {key[2]}@{key[3]}"


# ---------------------------------------------------------------------------- statistics

def run_statistic(dense: np.ndarray, pruned: np.ndarray | None, quantile: float,
                  axis: int | None = None) -> np.ndarray:
    """``Q(pruned) / Q(dense)`` (relative) or ``Q(pruned)`` (absolute, ``dense=None``)."""
    qp = np.quantile(pruned, quantile, axis=axis)
    if dense is None:
        return qp
    return qp / np.maximum(np.quantile(dense, quantile, axis=axis), 1e-12)


def paired_bootstrap(dense, pruned, *, quantile: float, n: int, rng,
                     relative: bool = True) -> tuple[float, np.ndarray]:
    """:func:`run_statistic` of one run's samples and ``n`` bootstrap replicates of it: the
    iterations are resampled with replacement, an iteration's dense and pruned times together
    (they were timed back to back, interleaved)."""
    d, p = np.asarray(dense, dtype=np.float64), np.asarray(pruned, dtype=np.float64)
    idx = rng.integers(0, p.size, (n, p.size))
    point = run_statistic(d if relative else None, p, quantile)
    boot = run_statistic(d[idx] if relative else None, p[idx], quantile, axis=1)
    return float(point), boot


def bootstrap_speedup(dense, pruned, *, quantile: float = 0.5, confidence: float = 0.95,
                      n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """In-run speedup ``Q(dense) / Q(pruned)`` of one latency row's paired samples and its
    two-sided bootstrap interval ``(lo, hi)`` at ``confidence`` (:func:`paired_bootstrap`)."""
    point, boot = paired_bootstrap(dense, pruned, quantile=quantile, n=n,
                                   rng=np.random.default_rng(seed))
    lo, hi = np.quantile(1.0 / boot, [(1.0 - confidence) / 2, (1.0 + confidence) / 2])
    return 1.0 / point, float(lo), float(hi)


def bootstrap_regression(cur: tuple, base: tuple, *, quantile: float = 0.25,
                         confidence: float = 0.95, n: int = 2000, seed: int = 0,
                         relative: bool = True) -> tuple[float, float, float]:
    """``stat(cur) / stat(base) - 1`` and its bootstrap interval ``(lo, hi)``.

    ``cur`` and ``base`` are ``(dense_ms, pruned_ms)`` sample arrays of one latency cell;
    ``stat`` is :func:`run_statistic`. Each run's iterations are resampled with replacement
    on their own (the two runs are independent; an iteration's dense and pruned times stay
    together), ``n`` times with a seeded generator; ``lo``/``hi`` are the
    ``1 - confidence`` and ``confidence`` quantiles, each a one-sided bound at ``confidence``.
    """
    rng = np.random.default_rng(seed)

    def stats(d, p):
        return paired_bootstrap(d, p, quantile=quantile, n=n, rng=rng, relative=relative)

    pc, bc = stats(*cur)
    pb, bb = stats(*base)
    reg = bc / bb - 1.0
    lo, hi = np.quantile(reg, [1.0 - confidence, confidence])
    return pc / pb - 1.0, float(lo), float(hi)


def _samples(row: dict) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(row["dense_samples_ms"], dtype=np.float64),
            np.asarray(row["pruned_samples_ms"], dtype=np.float64))


# ---------------------------------------------------------------------------- comparison

def compare_reports(current: dict, baseline: dict, config: GateConfig | None = None,
                    baseline_name: str = "", *, latency: bool = True,
                    accuracy: bool = True) -> GateResult:
    """Every threshold check of ``current`` against ``baseline`` (both report dicts).

    ``latency=False`` / ``accuracy=False``: that part was deliberately not measured
    (``bench --no-latency``); it is not gated, and a note says so.
    """
    cfg = config or GateConfig()
    check_compatible(baseline, "baseline")
    check_compatible(current, "current")
    notes: list[str] = []
    bm, cm = baseline.get("model") or {}, current.get("model") or {}
    if bm.get("name") != cm.get("name"):
        notes.append(f"model differs: baseline {bm.get('name')!r}, current {cm.get('name')!r}")
    checks = []
    if latency:
        checks += _latency_checks(current, baseline, cfg, notes)
    else:
        notes.append("latency not measured in this run: not gated")
    if accuracy:
        checks += _accuracy_checks(current, baseline, cfg, notes)
    else:
        notes.append("accuracy not measured in this run: not gated")
    if not checks:
        raise BaselineError("nothing to compare: neither latency rows nor accuracy metrics are "
                            "in both reports (fields 'latency', 'accuracy')")
    return GateResult(checks, cfg, notes, baseline_name)


def _latency_checks(current: dict, baseline: dict, cfg: GateConfig, notes: list[str]) -> list[Check]:
    base_rows = {_cell(r): r for r in baseline["latency"] or []}
    cur_rows = {_cell(r): r for r in current["latency"] or []}
    if not base_rows:
        if cur_rows:
            notes.append("baseline has no latency rows: latency not gated")
        return []
    missing = [k for k in base_rows if k not in cur_rows]
    if missing:
        raise BaselineError(
            "current report has no latency row for the baseline's "
            + ", ".join(f"'latency[{_cell_name(k)}]'" for k in missing)
            + "; measure the same runtime, device, towers and batch sizes")
    extra = [k for k in cur_rows if k not in base_rows]
    if extra:
        notes.append("not in the baseline, not gated: " + ", ".join(_cell_name(k) for k in extra))
    bases = ("relative", "absolute") if cfg.basis == "both" else (cfg.basis,)
    thr = cfg.max_latency_regression
    checks = []
    for i, (key, brow) in enumerate(base_rows.items()):
        crow = cur_rows[key]
        for basis in bases:
            rel = basis == "relative"
            c, b = _samples(crow), _samples(brow)
            point, lo, hi = bootstrap_regression(c, b, quantile=cfg.quantile, confidence=cfg.confidence,
                                                 n=cfg.bootstrap, seed=cfg.seed + i, relative=rel)
            passed = not (lo > thr)  # fail only beyond both the threshold and the noise
            qn = f"p{100 * cfg.quantile:g}"
            what = f"pruned/dense {qn} ratio" if rel else f"pruned {qn} ms"
            bval = float(run_statistic(b[0] if rel else None, b[1], cfg.quantile))
            cval = float(run_statistic(c[0] if rel else None, c[1], cfg.quantile))
            fmt = "{:.3f}" if basis == "relative" else "{:.3f} ms"
            verdict = "ok" if passed else "BROKEN"
            msg = (f"latency {_cell_name(key)} ({what}): baseline {fmt.format(bval)}, current "
                   f"{fmt.format(cval)}, change {100 * point:+.1f}% "
                   f"({int(100 * cfg.confidence)}% CI {100 * lo:+.1f}% .. {100 * hi:+.1f}%); "
                   f"max regression {100 * thr:.0f}%: {verdict}")
            checks.append(Check("latency", f"latency {_cell_name(key)} {basis}", passed, bval, cval,
                                point, thr, msg, (lo, hi), "" if basis == "relative" else "ms"))
    return checks


def _accuracy_checks(current: dict, baseline: dict, cfg: GateConfig, notes: list[str]) -> list[Check]:
    ba, ca = baseline["accuracy"], current["accuracy"]
    if ba is None:
        if ca is not None:
            notes.append("baseline has no accuracy section: accuracy not gated")
        if cfg.metrics:
            raise BaselineError("baseline report field 'accuracy' is empty; cannot gate "
                                + ", ".join(cfg.metrics))
        return []
    if ca is None:
        raise BaselineError("current report field 'accuracy' is empty but the baseline has one; "
                            "evaluate on the same data")
    if ba["dataset"] != ca["dataset"]:
        raise BaselineError(f"field 'accuracy.dataset' differs: baseline {ba['dataset']!r}, "
                            f"current {ca['dataset']!r}")
    if "n" in ba and "n" in ca and ba["n"] != ca["n"]:
        raise BaselineError(f"field 'accuracy.n' differs: baseline {ba['n']}, current {ca['n']} "
                            "evaluation pairs")
    names = list(cfg.metrics) if cfg.metrics else [m for m in ba["metrics"] if m in ca["metrics"]]
    for m in names:
        for role, acc in (("baseline", ba), ("current", ca)):
            if m not in acc["metrics"]:
                from .eval.generative import check_caption_metric

                check_caption_metric(m, acc["dataset"])  # asked of questions-only data
                raise BaselineError(f"{role} report field 'accuracy.metrics.{m}' is missing")
    thr = cfg.max_accuracy_drop
    checks = []
    for m in names:
        b, c = float(ba["metrics"][m]["pruned"]), float(ca["metrics"][m]["pruned"])
        drop = b - c
        passed = drop <= thr + _EPS
        if m in RAW_METRICS:  # a score (CIDEr), not a fraction: the drop is in its units
            msg = (f"accuracy {METRIC_NAMES.get(m, m)} (pruned): baseline {b:.3f}, current "
                   f"{c:.3f}, drop {drop + 0.0:.3f}; max drop {thr:.3f}: "
                   f"{'ok' if passed else 'BROKEN'}")
        else:
            msg = (f"accuracy {METRIC_NAMES.get(m, m)} (pruned): baseline {100 * b:.2f}%, "
                   f"current {100 * c:.2f}%, drop {100 * drop + 0.0:.2f} pt; max drop "
                   f"{100 * thr:.2f} pt: {'ok' if passed else 'BROKEN'}")
        checks.append(Check("accuracy", f"accuracy {m}", passed, b, c, drop, thr, msg))
    return checks


# ---------------------------------------------------------------------------- rendering

def _fmt_value(c: Check, v: float) -> str:
    if c.kind == "accuracy":
        return f"{100 * v:.2f}%"
    return f"{v:.3f}{' ms' if c.unit == 'ms' else ''}"


def _fmt_change(c: Check) -> str:
    if c.kind == "accuracy":
        return f"{-100 * c.change + 0.0:+.2f} pt"  # + 0.0: no "-0.00"
    s = f"{100 * c.change:+.1f}%"
    if c.ci:
        s += f" [{100 * c.ci[0]:+.1f}%, {100 * c.ci[1]:+.1f}%]"
    return s


def _fmt_threshold(c: Check) -> str:
    return f"≤ {100 * c.threshold:.2f} pt drop" if c.kind == "accuracy" else f"≤ +{100 * c.threshold:.0f}%"


def gate_markdown(res: GateResult) -> str:
    """A Markdown section for a CI job summary: verdict, one table row per check, notes."""
    n, k = len(res.checks), len(res.failures)
    head = (f"✅ **PASSED**: all {n} checks hold" if res.passed
            else f"❌ **FAILED**: {k} of {n} checks broken")
    lines = ["## vlcompress gate", "", head + (f" (baseline `{res.baseline}`)" if res.baseline else ""),
             ""]
    if res.failures:
        lines += [f"- {c.message}" for c in res.failures] + [""]
    lines += [f"| check | baseline | current | change ({int(100 * res.config.confidence)}% CI) | "
              "threshold | result |", "|---|---:|---:|---:|---:|---|"]
    for c in res.checks:
        lines.append(f"| {c.name} | {_fmt_value(c, c.baseline)} | {_fmt_value(c, c.current)} | "
                     f"{_fmt_change(c)} | {_fmt_threshold(c)} | {'pass' if c.passed else '**FAIL**'} |")
    lines.append("")
    if res.config.basis != "absolute":
        lines.append(f"_Latency compares the pruned/dense ratio of p{100 * res.config.quantile:g} "
                     "times measured in the same run (dense is the in-run reference); a check "
                     "fails only when the lower bound of the bootstrap interval is above the "
                     "threshold._")
        lines.append("")
    for note in res.notes:
        lines.append(f"- note: {note}")
    if res.notes:
        lines.append("")
    return "\n".join(lines)


def gate_junit_xml(res: GateResult) -> str:
    """JUnit XML: one ``<testsuite>``, one ``<testcase>`` per check, ``<failure>`` when broken."""
    suite = ET.Element("testsuite", name="vlcompress-gate", tests=str(len(res.checks)),
                       failures=str(len(res.failures)), errors="0", skipped="0")
    for c in res.checks:
        tc = ET.SubElement(suite, "testcase", classname=f"vlcompress.gate.{c.kind}", name=c.name)
        if not c.passed:
            f = ET.SubElement(tc, "failure", message=c.message, type="ThresholdBroken")
            f.text = c.message
        out = ET.SubElement(tc, "system-out")
        out.text = c.message
    root = ET.Element("testsuites", name="vlcompress", tests=str(len(res.checks)),
                      failures=str(len(res.failures)))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
