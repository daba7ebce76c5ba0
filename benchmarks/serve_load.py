"""Serving under load: the python-backend Triton repository of a run, on the real tritonserver.

A generative run (NAME `llava`: tiny-llava; NAME `blip`: a BLIP captioning model of
tiny-clip's sizes, `blip_caption_structured.py`'s `TINY` config with 64 positions, random
init, built into
`<RUN_DIR>-model` first) is served by its `*_generate` models: one request = one image (PNG
bytes) and one prompt (BLIP captioning: no prompt, so the run's caption prompt "a picture of"
starts the caption), answered with up to `--max-new-tokens` greedy tokens; the rows add the
tokens each answer has and generated tokens per second (requests/s x tokens per answer), and
the latency percentiles are per generated answer.

    python benchmarks/serve_load.py --runs blip=runs/serve-blip-caption-s50 --serve-check \
        --concurrency 1,4,8 --seconds 10 --out benchmarks/results/serve_load_blip_caption.json

`--serve-check` first runs `vlcompress serve-check` on each repository (the served answers
against the direct run: for a generation model token for token, plus its refusals of
malformed requests) and records it under `serve_check`; a failed check exits 1 after the
result is written.

For each run (tiny-clip, and clip-vit-b16 structured 50%), `vlcompress export-triton RUN
--backend python` is served by the `tritonserver` of the `[serve]` extra (127.0.0.1 only) and
driven with `tritonclient` (HTTP), one request = one image (batch 1; Triton's dynamic batching
forms the batches), closed loop, at each concurrency for a bounded time and request count.
Dense and pruned models are served by the same server and measured interleaved in rounds
(dense, pruned, pruned, dense, ...), so their ratio comes from one run: requests per second,
p50 / p99 latency, failed requests, and pruned / dense throughput at each concurrency.

    python benchmarks/serve_load.py                       # builds the runs if absent
    python benchmarks/serve_load.py --runs tiny=runs/tiny --concurrency 1,4,16 --seconds 8

A run given as NAME=PATH that does not exist is built with `vlcompress.prune_export` (magnitude
scores, structured 50%, the settings printed in the result under `runs`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from vlcompress.exporters.triton import GENERATE, export_triton  # noqa: E402
from vlcompress.serve import (  # noqa: E402
    TritonServer,
    answer_tokens,
    concurrent_infer,
    drive_load,
    example_inputs,
    generate_examples,
    generate_feeds,
    serve_check,
)

RUN_SETTINGS = {"method": "magnitude", "pattern": "structured", "sparsity": 0.5,
                "calibration_size": 32, "eval_size": 16, "iterations": 10, "batch_sizes": "1,4,16"}
#: a generative run: structured 50% of the decoder (heads and MLP neurons) so that pruned
#: answers cost fewer weight bytes per token; batch sizes = the server's max batch
GEN_RUN_SETTINGS = {"method": "magnitude", "pattern": "structured", "sparsity": 0.5,
                    "calibration_size": 8, "eval_size": 8, "max_new_tokens": 16,
                    "batch_sizes": "1,4,8"}
MODELS = {"tiny": "tiny-clip", "b16": "clip-vit-b16", "llava": "tiny-llava"}
GENERATIVE = {"llava", "blip"}


def _git() -> dict:
    def run(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()

    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "-uno"))}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("nvidia-pytriton", "tritonclient"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def _run_summary(path: Path) -> dict:
    import json

    r = json.loads((path / "report.json").read_text())
    c, p = r.get("config", {}), r.get("prune", {})
    return {"model": c.get("model"), "method": c.get("method"), "pattern": c.get("pattern"),
            "sparsity": c.get("sparsity"), "achieved": p.get("achieved"),
            "params_total": r.get("model", {}).get("params_total"),
            "towers": r.get("model", {}).get("towers")}


def ensure_run(name: str, path: Path) -> dict:
    if (path / "report.json").is_file():
        return {"path": str(path), "built": False, **_run_summary(path)}
    from vlcompress import prune_export

    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    settings = GEN_RUN_SETTINGS if name in GENERATIVE else RUN_SETTINGS
    model = MODELS.get(name, name)
    if name == "blip":  # no BLIP captioning preset of test size: the benchmarks' tiny config
        from blip_caption_structured import tiny_model

        from vlcompress import load_calibration, load_eval
        from vlcompress.data import save_pairs

        folder = path.with_name(path.name + "-model")
        if not (folder / "config.json").is_file():
            tiny_model(folder, context=64)  # prune-export times 32 decode tokens
        model = str(folder)
        # captions only: the bundled "shapes" source also holds questions, which a captioning
        # model does not answer (its calibration and eval pairs saved as caption folders)
        data = {}
        for key, pairs in (("calibration", load_calibration("shapes", n=settings[
                "calibration_size"], batch_size=8)), ("eval_data", load_eval(
                "shapes", n=settings["eval_size"]))):
            dst = path.with_name(f"{path.name}-{key}")
            if not (dst / "captions.jsonl").is_file():
                save_pairs(pairs, dst, captions=pairs.retrieval_captions)
            data[key] = str(dst)
        settings = {**settings, **data}
    prune_export(model=model, out=str(path), **settings)
    return {"path": str(path), "built": True, "settings": settings, **_run_summary(path),
            "seconds": round(time.perf_counter() - t, 1)}


def _generate_request(srv, m, max_new_tokens: int, seed: int) -> tuple[dict, int]:
    """One generation request (a shapes image as PNG bytes and a prompt) and the number of
    tokens its answer has (asked once, before the timing)."""
    kind = m.parameters.get("kind", "llava")
    files, prompts = generate_examples(1, seed=seed, kind=kind)
    feeds = generate_feeds(None if kind == "blip-caption" else prompts, images=files,
                           max_new_tokens=max_new_tokens)
    answer = concurrent_infer(srv.url, m, [feeds])[0]
    if isinstance(answer, BaseException):
        raise answer
    return feeds, len(answer_tokens(answer)[0])


def _serve_check(path: Path) -> dict:
    """`vlcompress serve-check` on the repository before the load: the served answers equal
    the direct run's (a generation model: token for token), so the load numbers time correct
    answers."""
    res = serve_check(path).to_dict()
    return {"passed": res["passed"], "rows": [
        {k: r.get(k) for k in ("model", "kind", "batch", "requests", "passed", "rows_equal",
                               "rows", "new_tokens", "refused", "bad_requests", "reference",
                               "max_abs_diff", "error") if k in r} for r in res["rows"]]}


def measure(run: Path, tower: str, levels: list[int], seconds: float, max_requests: int,
            rounds: int, max_new_tokens: int = 16, check: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        repo = export_triton(run, Path(tmp) / "repo", backend="python")
        checked = _serve_check(repo.path) if check else None
        if checked is not None:
            print(f"{run.name}: serve-check {'passed' if checked['passed'] else 'FAILED'}",
                  flush=True)
        if any(m.tower == GENERATE for m in repo.models):
            tower = GENERATE
        models = {m.variant: m for m in repo.models if m.tower == tower}
        with TritonServer(repo.path) as srv:
            feeds, tokens = {}, {}
            for v, m in models.items():
                for r in range(rounds):
                    if tower == GENERATE:  # the same image and prompt every round: the
                        # variants' answers differ in length, so tokens/s is their comparison
                        feeds[v, r], tokens[v, r] = _generate_request(srv, m, max_new_tokens, 0)
                    else:
                        feeds[v, r], tokens[v, r] = example_inputs(m, batch=1, seed=r), None
            rows = []
            for c in levels:
                acc = {v: [] for v in models}
                order = list(models)
                for r in range(rounds):  # interleaved: dense, pruned, pruned, dense, ...
                    for v in (order if r % 2 == 0 else order[::-1]):
                        m = models[v]
                        res = drive_load(srv.url, m, feeds[v, r], concurrency=c,
                                         seconds=seconds / rounds,
                                         max_requests=max_requests // rounds)
                        res["tokens_per_answer"] = tokens[v, r]
                        acc[v].append(res)
                        print(f"{run.name} c={c} {v}: {res['rps']:.1f} req/s p50 {res['p50_ms']:.1f} ms "
                              f"p90 {res['p90_ms']:.1f} ms p99 {res['p99_ms']:.1f} ms failed "
                              f"{res['failed']}", flush=True)
                row = {"concurrency": c}
                for v, parts in acc.items():
                    n = sum(p["requests"] for p in parts)
                    wall = sum(p["seconds"] for p in parts)
                    row[v] = {"requests": n, "failed": sum(p["failed"] for p in parts),
                              "seconds": round(wall, 2), "rps": n / wall if wall else 0.0,
                              # per-round percentiles: the median of rounds is reported
                              "p50_ms": sorted(p["p50_ms"] for p in parts)[len(parts) // 2],
                              "p90_ms": sorted(p["p90_ms"] for p in parts)[len(parts) // 2],
                              "p99_ms": max(p["p99_ms"] for p in parts),
                              "errors": [e for p in parts for e in p["errors"]][:3]}
                    if tower == GENERATE:  # generated tokens/s over the rounds' answers
                        toks = sum(p["requests"] * p["tokens_per_answer"] for p in parts)
                        row[v]["tokens_per_answer"] = [p["tokens_per_answer"] for p in parts]
                        row[v]["tokens_per_s"] = toks / wall if wall else 0.0
                if "dense" in row and "pruned" in row and row["dense"]["rps"]:
                    row["pruned_over_dense_rps"] = row["pruned"]["rps"] / row["dense"]["rps"]
                    if tower == GENERATE and row["dense"]["tokens_per_s"]:
                        row["pruned_over_dense_tokens_per_s"] = (row["pruned"]["tokens_per_s"]
                                                                 / row["dense"]["tokens_per_s"])
                rows.append(row)
        return {"start_seconds": round(srv.start_seconds or 0.0, 2), "notes": srv.notes,
                **({"serve_check": checked} if checked is not None else {}),
                "tower": tower, **({"max_new_tokens": max_new_tokens} if tower == GENERATE else {}),
                "batching": {v: {"max_batch_size": m.max_batch_size,
                                 "preferred_batch_size": m.preferred_batch_size,
                                 "max_queue_delay_microseconds": m.max_queue_delay_microseconds,
                                 "rule": m.rule} for v, m in models.items()},
                "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="tiny=runs/serve-tiny-s50,b16=runs/serve-b16-s50",
                    help="NAME=RUN_DIR,... (built when absent; NAME tiny or b16 picks the model)")
    ap.add_argument("--tower", default="vision")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=12.0, help="per concurrency and variant")
    ap.add_argument("--max-requests", type=int, default=5000, help="per concurrency and variant")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per concurrency")
    ap.add_argument("--max-new-tokens", type=int, default=16,
                    help="per generation request (generative runs)")
    ap.add_argument("--serve-check", action="store_true",
                    help="run serve-check on each repository before the load (recorded)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",")]
    git = _git()  # the code that measured: taken before the run, not after
    load_before = os.getloadavg()  # a shared machine: the load the numbers were taken under
    results = {}
    for item in a.runs.split(","):
        name, path = item.split("=", 1)
        info = ensure_run(name, Path(path))
        results[name] = {"run": info, **measure(Path(path), a.tower, levels, a.seconds,
                                                a.max_requests, a.rounds, a.max_new_tokens,
                                                a.serve_check)}
    payload = {"command": "python " + " ".join(sys.argv), "git": git, "serve": _versions(),
               "tower": a.tower, "request_batch": 1, "concurrency": levels,
               "seconds_per_level_and_variant": a.seconds, "rounds": a.rounds,
               "loopback_only": True, "results": results,
               "loadavg_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())}}
    path = write_result("serve_load", payload, a.out)
    for name, r in results.items():
        for row in r["rows"]:
            ratio = row.get("pruned_over_dense_rps")
            toks = (f", tokens/s dense {row['dense']['tokens_per_s']:.1f} pruned "
                    f"{row['pruned']['tokens_per_s']:.1f}" if "tokens_per_s" in row["dense"] else "")
            print(f"{name} c={row['concurrency']}: dense {row['dense']['rps']:.1f} req/s, pruned "
                  f"{row['pruned']['rps']:.1f} req/s, ratio {ratio:.2f}x{toks}, failed "
                  f"{row['dense']['failed'] + row['pruned']['failed']}")
    print(f"wrote {path}")
    failed = [n for n, r in results.items() if not r.get("serve_check", {"passed": True})["passed"]]
    if failed:
        print(f"serve-check FAILED on {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
