"""Visual token reduction (``--visual-tokens K``, VisionZip) on its own and on top of weight
sparsity: accuracy on tiny-llava, prefill time on the llava-qwen2-0.5b preset.

    OMP_NUM_THREADS=1 python benchmarks/visual_tokens.py

1. **Accuracy** (``--model tiny-llava``, shapes captions and questions, greedy generation in
   PyTorch, the path whose ONNX twin ``prune-export`` validates token for token): the dense
   model with every image token, dense with K = a quarter of the tower's tokens (tokens
   alone), ``--method`` at ``--sparsity`` unstructured (weights alone), and both. Caption
   attribute accuracy and VQA exact match with 95% Wilson intervals, ``retained`` = variant /
   dense. Targets: tokens alone retain >= 97%, weights and tokens >= 95%. ``--ablation``
   adds ``dense_tokens_renumbered``: the same K tokens numbered contiguously, as VisionZip
   builds its prompt (we keep each token's full-prompt position; models/visual_tokens.py).
2. **Prefill** (``--latency-model llava-qwen2-0.5b``, random weights: a SigLIP-so400m/14-384
   tower, 729 tokens, and the Qwen2-0.5B decoder), ONNX Runtime CPU, one process, full and
   quarter tokens interleaved repetition by repetition: the exported ``vision.onnx`` of each
   (the quarter one holds the reduction) and the prefill (embed the prompt, place the image
   embeddings, one decoder call on an empty cache, the arg-max first token) at the prompt
   length each variant produces, the kept tokens at their full-prompt positions.
   ``prefill_speedup`` (the target, >= 2.5x) is full / quarter prefill; ``ttft_speedup`` adds
   the vision graph's p50 to both (the reduction sits at the encoder's output, so the tower
   itself runs at full length either way: timed ``--vision-repeats`` times, fewer than the
   prefill). ``--parts prefill`` / ``--parts accuracy`` run one half and write
   ``visual_tokens_<part>.json`` (each half fits the 15-minute budget under a shared load).

Writes ``benchmarks/results/visual_tokens.json`` (or ``--out``) with the command, commit,
machine and load average (a shared machine: timings are indicative, the ratios interleaved).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import write_result  # noqa: E402

PROPORTIONS = ("attribute_accuracy", "vqa_accuracy")
TARGETS = {"tokens": 0.97, "pruned_tokens": 0.95, "prefill_speedup": 2.5}


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    import math

    if n == 0:
        return [0.0, 1.0]
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)]


def accuracy(args) -> dict:
    from vlcompress.data import generative_eval_data, load_calibration
    from vlcompress.eval.generative import generative_fidelity, generative_metrics, merged_runs, run_all
    from vlcompress.models import load_model
    from vlcompress.models.visual_tokens import reduced_tokens, split_tokens, tower_tokens
    from vlcompress.prune import prune

    dense = load_model(args.model)
    t_tokens = tower_tokens(dense.model.config)
    k = args.visual_tokens or max(1, t_tokens // 4)
    evals = generative_eval_data(args.eval_data, n=args.eval_size)
    calib = load_calibration(args.calibration, n=args.calibration_size, batch_size=8)

    def evaluate(vlm, tokens, keep_positions=True):
        t = time.perf_counter()
        with reduced_tokens(vlm.model, vlm.processor, tokens, keep_positions=keep_positions):
            runs = run_all(vlm, evals, max_new_tokens=args.max_new_tokens)
        return runs, time.perf_counter() - t

    variants = {}
    dense_runs, secs = evaluate(dense, None)
    variants["dense"] = (dense_runs, secs)
    variants["dense_tokens"] = evaluate(dense, k)
    if args.ablation:  # VisionZip's contiguous numbering of the K tokens (no target)
        variants["dense_tokens_renumbered"] = evaluate(dense, k, keep_positions=False)
    pruned = copy.deepcopy(dense)
    res = prune(pruned, args.method, args.sparsity, "unstructured", calibration=calib)
    variants["pruned"] = evaluate(pruned, None)
    variants["pruned_tokens"] = evaluate(pruned, k)
    rows, dm = {}, {}
    for r in dense_runs:
        dm.update(generative_metrics(r))
    for name, (runs, secs) in variants.items():
        m = {}
        for r in runs:
            for key, v in generative_metrics(r).items():
                m[key] = {"value": round(v, 4), "n": r.n,
                          "retained": round(v / dm[key], 4) if dm[key] else None}
                if key in PROPORTIONS:
                    m[key]["ci95"] = wilson(v, r.n)
        fid = generative_fidelity(merged_runs(dense_runs), merged_runs(runs))
        rows[name] = {"metrics": m, "fidelity": {a: round(b, 4) for a, b in fid.items()},
                      "seconds_eval": round(secs, 1)}
        print(name, {a: b["value"] for a, b in m.items()}, flush=True)
    checks = {}
    for name, target in (("dense_tokens", TARGETS["tokens"]),
                         ("pruned_tokens", TARGETS["pruned_tokens"])):
        worst = min(v["retained"] for key, v in rows[name]["metrics"].items() if key in PROPORTIONS)
        checks[name] = {"target_retained": target, "worst_retained": worst,
                        "met": worst >= target}
    dom, ctx = split_tokens(k)
    return {"model": args.model, "tower_tokens": t_tokens, "visual_tokens": k,
            "dominant": dom, "contextual": ctx, "method": args.method,
            "sparsity": args.sparsity, "achieved": round(res.achieved, 4),
            "calibration": f"{args.calibration} (n={args.calibration_size})",
            "eval": [f"{d.source} (n={len(d)})" for d in evals],
            "max_new_tokens": args.max_new_tokens, "variants": rows, "targets": checks}


def _ms(xs):
    return {"p50": round(statistics.median(xs), 2), "min": round(min(xs), 2),
            "samples": [round(x, 2) for x in xs]}


def prefill(args) -> dict:
    import numpy as np
    import torch

    from vlcompress.exporters.generative import export_generative
    from vlcompress.models import load_model
    from vlcompress.models.visual_tokens import position_ids, tower_tokens
    from vlcompress.runtime.ort_generate import OrtGenerator, _session, prompt_inputs, read_spec

    vlm = load_model(args.latency_model)
    if args.vision_layers:  # keep the first N encoder layers (memory: see --vision-layers)
        tower = vlm.model.model.vision_tower
        enc = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
        enc.layers = enc.layers[:args.vision_layers]
        vlm.model.config.vision_config.num_hidden_layers = args.vision_layers
    t_tokens = tower_tokens(vlm.model.config)
    k = args.latency_tokens or t_tokens // 4
    v = vlm.model.config.vision_config
    rng = np.random.default_rng(0)
    from PIL import Image

    img = Image.fromarray(rng.integers(0, 255, (v.image_size, v.image_size, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory(prefix="vistok-", dir=args.tmp) as d:
        t = time.perf_counter()
        export_generative(vlm, Path(d) / "full", images=[], validate=False)
        export_generative(vlm, Path(d) / "quarter", images=[], validate=False, visual_tokens=k,
                          reuse=Path(d) / "full")
        export_s = time.perf_counter() - t
        prompt = vlm.prompt(None)
        encs = {"full": prompt_inputs(vlm.processor, [prompt], [img], image_tokens=t_tokens),
                "quarter": prompt_inputs(vlm.processor, [prompt], [img], image_tokens=k)}
        del vlm
        gc.collect()
        # the two share embed.onnx and decoder.onnx (generation.json names them): one
        # session of each serves both; the quarter variant has its own vision graph
        full = OrtGenerator(Path(d) / "full", threads=args.threads)
        quarter = copy.copy(full)
        quarter.folder = Path(d) / "quarter"
        quarter.spec = read_spec(quarter.folder)
        shared = {part: full.sessions[part] for part in ("embed", "decoder")}  # lazily loaded
        quarter.sessions = {**shared,
                            "vision": _session(quarter.folder / "vision.onnx", args.threads)}
        gens = {"full": full, "quarter": quarter}
        lengths = {n: int(e["input_ids"].shape[1]) for n, e in encs.items()}

        vision_out = {}

        def vision(name):
            t0 = time.perf_counter()
            vision_out[name] = gens[name].image_outputs(encs[name]["pixel_values"])
            return (time.perf_counter() - t0) * 1e3

        def one(name):
            g, e = gens[name], encs[name]
            img_emb, index = vision_out[name]
            t1 = time.perf_counter()
            ids = e["input_ids"]
            is_image = ids == int(g.spec["image_token_id"])
            safe = np.where(is_image & (int(g.spec["image_token_id"]) >= int(g.spec["vocab_size"])),
                            0, ids)
            emb = g.sessions["embed"].run(None, {"input_ids": safe})[0]
            emb[is_image] = img_emb.reshape(-1, img_emb.shape[-1])
            mask = e["attention_mask"]
            pos = (np.where(mask == 1, np.cumsum(mask, -1) - 1, 0).astype(np.int64)
                   if index is None else position_ids(ids, mask, int(g.spec["image_token_id"]),
                                                      index, t_tokens))
            logits, _ = g.decode_step(emb, mask, pos, g.empty_past(1))
            first = int(logits[0, -1].argmax())
            t2 = time.perf_counter()
            return (t2 - t1) * 1e3, first

        times = {n: {"vision": [], "prefill": []} for n in gens}
        for name in gens:  # warm-up (first-run allocations), not timed
            vision(name)
            one(name)
        # the tower costs the same for both (it runs at full length): fewer repetitions
        for rep in range(args.vision_repeats):
            for name in (("full", "quarter") if rep % 2 == 0 else ("quarter", "full")):
                times[name]["vision"].append(vision(name))
        for rep in range(args.repeats):
            for name in (("full", "quarter") if rep % 2 == 0 else ("quarter", "full")):
                times[name]["prefill"].append(one(name)[0])
            print("rep", rep, {n: round(times[n]["prefill"][-1]) for n in times}, flush=True)
    out = {n: {part: _ms(xs) for part, xs in parts.items()} | {"prompt_tokens": lengths[n]}
           for n, parts in times.items()}
    for n in out:  # time to first token: the vision graph, then the prefill
        out[n]["ttft_p50"] = round(out[n]["vision"]["p50"] + out[n]["prefill"]["p50"], 2)
    p = {part: round(out["full"][part]["p50"] / out["quarter"][part]["p50"], 3)
         for part in ("vision", "prefill")}
    p["ttft"] = round(out["full"]["ttft_p50"] / out["quarter"]["ttft_p50"], 3)
    return {"model": args.latency_model, "runtime": "onnxruntime CPU",
            "vision_layers": args.vision_layers or "all",
            "threads": args.threads, "tower_tokens": t_tokens, "visual_tokens": k,
            "repeats": args.repeats, "vision_repeats": args.vision_repeats,
            "export_seconds": round(export_s, 1), "variants": out,
            "prefill_speedup": p["prefill"], "ttft_speedup": p["ttft"],
            "vision_ratio": p["vision"],
            "target": {"prefill_speedup": TARGETS["prefill_speedup"],
                       "met": p["prefill"] >= TARGETS["prefill_speedup"]},
            "torch_threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--visual-tokens", type=int, default=None, help="default: tower tokens / 4")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--calibration", default="shapes")
    ap.add_argument("--calibration-size", type=int, default=64)
    ap.add_argument("--eval-data", default="shapes")
    ap.add_argument("--eval-size", type=int, default=240)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--latency-model", default="llava-qwen2-0.5b")
    ap.add_argument("--latency-tokens", type=int, default=None, help="default: tower tokens / 4")
    ap.add_argument("--repeats", type=int, default=4, help="timed prefills per variant")
    ap.add_argument("--vision-repeats", type=int, default=2, help="timed vision calls per variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vision-layers", type=int, default=None,
                    help="keep only the first N vision encoder layers of the latency model (the "
                         "full SigLIP-so400m export is OOM-killed on a 24 GiB machine shared by "
                         "others); the prefill (decoder) is unchanged, the vision row is then "
                         "not the full tower's")
    ap.add_argument("--parts", default="accuracy,prefill")
    ap.add_argument("--tmp", default=None, help="folder for the preset's exports (several GB)")
    ap.add_argument("--ablation", action="store_true",
                    help="also dense with the K tokens numbered contiguously (VisionZip's prompt)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.manual_seed(0)
    load0 = os.getloadavg()
    parts = args.parts.split(",")
    payload = {}
    if "accuracy" in parts:
        payload["accuracy"] = accuracy(args)
    if "prefill" in parts:
        payload["prefill"] = prefill(args)
    payload["loadavg"] = {"start": load0, "end": os.getloadavg()}
    name = "visual_tokens" if len(parts) > 1 else f"visual_tokens_{parts[0]}"
    path = write_result(name, payload, out=args.out)
    print(path)


if __name__ == "__main__":
    main()
