"""ONNX Runtime GenAI beside vlcompress's OrtGenerator on the same generative export (CPU).

For each variant (dense, pruned) of a generative run, both runtimes load the same
``vision.onnx`` / ``decoder.onnx`` (GenAI through its ``gemma3`` multimodal pipeline and the
``embed_merge.onnx`` adapter, see ``vlcompress/runtime/genai_generate.py``) and:

1. generate greedily on every validation item (shapes images x prompts, batch 1): the share of
   answers that are token for token equal (``token_exact``);
2. are timed interleaved, in one process, on one item at batch 1: ``prefill`` = a call with
   ``max_new_tokens=1`` (vision, embedding, the prompt's decoder call, one token); ``full`` =
   a call with ``--max-new-tokens``; decode per token = (full - prefill) / the decoder calls
   after the first (the answer's tokens, plus the end token's call when it stopped there).
   Only the public ``generate`` of each runtime is timed, so the per-token number includes
   each loop's own overhead (Python for OrtGenerator, C++ for GenAI). p50 / p90 over
   ``--repeats``; the runtimes alternate order every repeat.

    python benchmarks/genai_decode.py                      # builds runs/serve-llava-s50 if absent
    python benchmarks/genai_decode.py --run RUN --repeats 40 --threads 1

The machine is shared: the result records os.getloadavg() before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

PROMPTS = ("describe the picture.", "what color is it ?", "what shape is it ?")
RUN_SETTINGS = {"method": "magnitude", "pattern": "structured", "sparsity": 0.5,
                "calibration_size": 8, "eval_size": 8, "max_new_tokens": 16,
                "batch_sizes": "1,4,8"}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("onnxruntime", "onnxruntime-genai"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def _percentiles(xs: list[float]) -> dict:
    import numpy as np

    a = np.array(xs)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "n": len(xs)}


def measure_variant(folder: Path, encoder, items: list, max_new: int, repeats: int,
                    threads: int) -> dict:
    from vlcompress.runtime.genai_generate import GenaiGenerator
    from vlcompress.runtime.ort_generate import OrtGenerator

    runtimes = {"onnxruntime": OrtGenerator(folder, threads), "genai": GenaiGenerator(folder, threads)}
    exact, answers = 0, []
    for image, prompt in items:
        e = encoder.encode([image], [prompt])
        outs = {k: g.generate(e["input_ids"], e["attention_mask"], e["pixel_values"], max_new)[0]
                for k, g in runtimes.items()}
        exact += outs["onnxruntime"] == outs["genai"]
        answers.append({"prompt": prompt, "onnxruntime": outs["onnxruntime"],
                        "genai": outs["genai"]})
    image, prompt = items[0]
    e = encoder.encode([image], [prompt])
    feeds = (e["input_ids"], e["attention_mask"], e["pixel_values"])
    tokens = runtimes["onnxruntime"].generate(*feeds, max_new)[0]
    calls_after_first = len(tokens) if len(tokens) < max_new else max_new - 1
    times = {k: {"prefill_ms": [], "full_ms": [], "decode_ms_per_token": []} for k in runtimes}
    order = list(runtimes)
    for _ in range(2):  # warm-up
        for g in runtimes.values():
            g.generate(*feeds, max_new)
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            g = runtimes[k]
            t0 = time.perf_counter()
            g.generate(*feeds, 1)
            t1 = time.perf_counter()
            g.generate(*feeds, max_new)
            t2 = time.perf_counter()
            times[k]["prefill_ms"].append((t1 - t0) * 1e3)
            times[k]["full_ms"].append((t2 - t1) * 1e3)
            if calls_after_first > 0:
                times[k]["decode_ms_per_token"].append(((t2 - t1) - (t1 - t0)) * 1e3
                                                       / calls_after_first)
    runtimes["genai"].close()
    out = {"token_exact": exact / len(items), "items": len(items), "answers": answers[:6],
           "timed_prompt": prompt, "timed_new_tokens": len(tokens),
           "decoder_calls_after_prefill": calls_after_first}
    for k, t in times.items():
        out[k] = {name: _percentiles(v) for name, v in t.items() if v}
        dec = out[k].get("decode_ms_per_token")
        if dec:
            out[k]["tokens_per_s"] = 1000.0 / dec["p50"] if dec["p50"] > 0 else None
    if times["genai"]["decode_ms_per_token"]:
        out["genai_decode_speedup"] = (out["onnxruntime"]["decode_ms_per_token"]["p50"]
                                       / out["genai"]["decode_ms_per_token"]["p50"])
    out["genai_prefill_speedup"] = (out["onnxruntime"]["prefill_ms"]["p50"]
                                    / out["genai"]["prefill_ms"]["p50"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/serve-llava-s50",
                    help="a generative prune-export run (built from tiny-llava when absent)")
    ap.add_argument("--variants", default="dense,pruned")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--items", type=int, default=8, help="validation images (x 3 prompts)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import json

    from vlcompress.data import load_eval
    from vlcompress.exporters.triton import processor_dir
    from vlcompress.runtime.gen_inputs import PromptEncoder
    from vlcompress.runtime.ort_generate import read_spec

    run = Path(a.run)
    built = False
    if not (run / "report.json").is_file():
        from vlcompress import prune_export

        run.parent.mkdir(parents=True, exist_ok=True)
        prune_export(model="tiny-llava", out=str(run), **RUN_SETTINGS)
        built = True
    report = json.loads((run / "report.json").read_text())
    load_before = os.getloadavg()
    variants = [v for v in a.variants.split(",") if v]
    spec = read_spec(run / variants[0])
    encoder = PromptEncoder(processor_dir(run, report), report["model"]["name"], int(spec["context"]))
    images = load_eval("shapes", n=a.items, batch_size=a.items).images
    items = [(im, PROMPTS[i % len(PROMPTS)]) for i, im in enumerate(images)]
    items += [(im, PROMPTS[(i + 1) % len(PROMPTS)]) for i, im in enumerate(images)]
    results = {v: measure_variant(run / v, encoder, items, a.max_new_tokens, a.repeats, a.threads)
               for v in variants}
    payload = {"command": "python " + " ".join(sys.argv), "run": str(run), "run_built": built,
               "run_settings": RUN_SETTINGS if built else report.get("config"),
               "model": report["model"]["name"], "batch": 1, "threads": a.threads,
               "max_new_tokens": a.max_new_tokens, "repeats": a.repeats,
               "versions": _versions(), "results": results,
               "loadavg_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())}}
    path = write_result("genai_decode", payload, a.out)
    for v, r in results.items():
        print(f"{v}: token_exact {r['token_exact']:.3f} over {r['items']} answers; decode p50 "
              f"onnxruntime {r['onnxruntime']['decode_ms_per_token']['p50']:.3f} ms/token, genai "
              f"{r['genai']['decode_ms_per_token']['p50']:.3f} ms/token "
              f"(genai {r.get('genai_decode_speedup', float('nan')):.2f}x); prefill p50 "
              f"{r['onnxruntime']['prefill_ms']['p50']:.2f} vs {r['genai']['prefill_ms']['p50']:.2f} ms")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
