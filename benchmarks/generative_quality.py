"""Quality of one-shot methods on a generative VLM (llava family), dense vs pruned, all parts.

    OMP_NUM_THREADS=1 python benchmarks/generative_quality.py --model tiny-llava \
        --methods magnitude,wanda,multiflow,sparsegpt,ecoflap --patterns unstructured,2:4

For each method x pattern the dense model is copied, pruned whole (vision, bridge, language;
``--parts`` to choose) on ``--calibration`` sequences, and scored on the evaluation data
(``shapes``: held-out captions and questions) with greedy generation: caption attribute
accuracy, CIDEr, VQA exact match (each with a 95% Wilson interval where it is a proportion),
and fidelity to the dense model (next-token KL, greedy-token agreement). ``retained`` is
pruned / dense. ``--patterns structured`` slices the chosen parts at ``--structured-sparsity``
(decoder: query heads, the same number per KV group, and gated-MLP neurons);
``--recover-steps N`` then distils the dense model into each pruned one (next-token logit KL
on training sequences, masks kept: ``vlcompress.distill.train_student``, the loop ``recover``
runs) on ``--train-data`` (``shapes``: the train split's captions and questions, alternating
batches) before it is scored. Writes ``benchmarks/results/generative_quality.json`` (or ``--out``) with the
command, commit, machine and the load average (a shared machine: timings are indicative).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import parse_spec, write_result  # noqa: E402

PROPORTIONS = ("attribute_accuracy", "vqa_accuracy")


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion ``p`` measured on ``n`` items."""
    if n == 0:
        return [0.0, 1.0]
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)]


def _metrics(evals, runs, dense_runs=None):
    from vlcompress.eval.generative import generative_fidelity, generative_metrics

    out = {}
    for r in runs:
        for k, v in generative_metrics(r).items():
            out[k] = {"value": round(v, 4), "n": r.n}
            if k in PROPORTIONS:
                out[k]["ci95"] = wilson(v, r.n)
    if dense_runs is not None:
        from vlcompress.eval.generative import merged_runs

        out["fidelity"] = {k: round(v, 4) for k, v in
                           generative_fidelity(merged_runs(dense_runs), merged_runs(runs)).items()}
    return out


class _Mixed:
    """Training sequences from several sources (captions and questions), batches alternating."""

    def __init__(self, parts):
        self.parts = parts
        self.batch_size = parts[0].batch_size
        self.source = " + ".join(f"{p.source} (n={len(p)})" for p in parts)

    def __len__(self):
        return sum(len(p) for p in self.parts)

    def batches(self):
        lists = [list(p.batches()) for p in self.parts]
        return [b for group in zip(*lists, strict=False) for b in group]


def _train_data(args):
    from vlcompress.data import load_train
    from vlcompress.data.vqa import shapes_vqa

    caps = load_train(args.train_data, n=args.train_size, batch_size=16)
    if args.train_data != "shapes":
        return _Mixed([caps])
    return _Mixed([caps, shapes_vqa("train", args.train_size, 16)])


def _recover(vlm, dense, train, args):
    """Distil ``dense`` into the pruned ``vlm`` in place; masks (the zeros) kept."""
    from vlcompress.distill import check_pattern, train_student, zero_masks

    for p in vlm.model.parameters():  # a copy of the teacher, which training froze
        p.requires_grad_(True)
    masks = zero_masks(vlm)
    t = time.perf_counter()
    _, losses = train_student(vlm, dense, train, steps=args.recover_steps, lr=args.recover_lr,
                              masks=masks, schedule="cosine")
    if not check_pattern(vlm, masks):
        raise RuntimeError("recovery changed the sparsity pattern")
    return {"steps": args.recover_steps, "seconds": round(time.perf_counter() - t, 1),
            "loss_first": round(losses[0], 4), "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "masked_layers": len(masks), "pattern_preserved": True}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--methods", default="magnitude,wanda,multiflow,sparsegpt,ecoflap")
    ap.add_argument("--patterns", default="unstructured,2:4",
                    help="comma list; unstructured uses --sparsity")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--parts", default=None, help="e.g. language (default: every part)")
    ap.add_argument("--calibration", default="shapes")
    ap.add_argument("--calibration-size", type=int, default=64)
    ap.add_argument("--eval-data", default="shapes")
    ap.add_argument("--eval-size", type=int, default=240)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--structured-sparsity", type=float, default=0.3)
    ap.add_argument("--units", default="heads,neurons")
    ap.add_argument("--recover-steps", type=int, default=0)
    ap.add_argument("--recover-lr", type=float, default=None,
                    help="default: the model card's recover_recipe lr, else 1e-3")
    ap.add_argument("--reconstruct", choices=("default", "off"), default="default",
                    help="default: prune()'s policy (reconstruction after a scorer's mask, on "
                         "wherever it applies); off: the scorer's mask alone")
    ap.add_argument("--train-data", default="shapes")
    ap.add_argument("--train-size", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from vlcompress.data import generative_eval_data, load_calibration
    from vlcompress.eval.generative import run_all
    from vlcompress.models import load_model
    from vlcompress.prune import prune

    torch.manual_seed(0)
    load0 = os.getloadavg()
    dense = load_model(args.model)
    calib = load_calibration(args.calibration, n=args.calibration_size, batch_size=8)
    evals = generative_eval_data(args.eval_data, n=args.eval_size)
    train = _train_data(args) if args.recover_steps else None
    if args.recover_steps and args.recover_lr is None:
        from vlcompress.recover import recovery_recipe

        args.recover_lr = recovery_recipe(dense)[0].get("lr", 1e-3)
    t = time.perf_counter()
    dense_runs = run_all(dense, evals, max_new_tokens=args.max_new_tokens)
    rows = [{"method": "dense", "pattern": None, "seconds_eval": round(time.perf_counter() - t, 1),
             "metrics": _metrics(evals, dense_runs),
             "examples": [{"dense": r.texts[i], "references": r.references[i][:2]}
                          for r in dense_runs for i in range(min(2, r.n))]}]
    scope = tuple(args.parts.split(",")) if args.parts else None
    for spec in args.methods.split(","):
        method, opts = parse_spec(spec)
        for pattern in args.patterns.split(","):
            vlm = copy.deepcopy(dense)
            t = time.perf_counter()
            sparsity = {"unstructured": args.sparsity,
                        "structured": args.structured_sparsity}.get(pattern)
            extra = {"units": args.units} if pattern == "structured" else {}
            res = prune(vlm, method, sparsity, pattern, calibration=calib, scope=scope,
                        method_options=opts or None,
                        reconstruct=False if args.reconstruct == "off" else None, **extra)
            secs = time.perf_counter() - t
            rec = None
            if args.recover_steps:
                rec = _recover(vlm, dense, train, args)
            runs = run_all(vlm, evals, max_new_tokens=args.max_new_tokens)
            m = _metrics(evals, runs, dense_runs)
            for k, v in m.items():
                if k != "fidelity" and rows[0]["metrics"][k]["value"] > 0:
                    v["retained"] = round(v["value"] / rows[0]["metrics"][k]["value"], 4)
            rows.append({"method": spec, "pattern": pattern, "achieved": round(res.achieved, 4),
                         "per_part": {k: round(v, 4) for k, v in res.per_modality.items()},
                         "seconds_prune": round(secs, 1), "metrics": m,
                         "reconstruct": {k: (res.reconstruct or {}).get(k)
                                         for k in ("enabled", "why", "seconds")},
                         **({"structured": {k: v for k, v in res.details["structured"].items()
                                            if k in ("units", "allocation", "layers")}}
                            if pattern == "structured" else {}),
                         **({"recover": rec} if rec else {})})
            print(spec, pattern, {k: v.get("value", v) for k, v in m.items()}, flush=True)
            del vlm
    path = write_result("generative_quality", {
        "model": args.model, "parts": args.parts or "vision,bridge,language",
        "calibration": f"{args.calibration} (n={args.calibration_size})",
        "eval": [f"{d.source} (n={len(d)})" for d in evals],
        "max_new_tokens": args.max_new_tokens, "sparsity": args.sparsity,
        "structured_sparsity": args.structured_sparsity, "units": args.units,
        "reconstruct": args.reconstruct,
        "recover": ({"steps": args.recover_steps, "lr": args.recover_lr, "schedule": "cosine",
                     "train": train.source, "n": len(train)} if train is not None else None),
        "rows": rows, "loadavg": {"start": load0, "end": os.getloadavg()},
        "threads": torch.get_num_threads()}, out=args.out)
    print(path)


if __name__ == "__main__":
    main()
