"""Generative ONNX export validation on tiny-llava: dense, and pruned (sparsegpt 2:4 on every
part) against its PyTorch twin.

    python benchmarks/generative_export.py     # writes benchmarks/results/generative_export.json

Each variant is exported to vision/embed/decoder ONNX (:mod:`vlcompress.exporters.generative`)
and validated on the first ``--prompts`` items of each bundled evaluation set (shapes
captions: the model card's caption prompt; shapes VQA: its questions), ``--max-new-tokens``
new tokens: max abs diff of the vision, embed and decoder (prefill, decode) outputs, and the
fraction of prompts whose greedy generation on ONNX Runtime is token for token PyTorch's
``generate``. Exit 1 when a variant is not 100% token-exact (the message names how many).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--prompts", type=int, default=32, help="validation items per data set")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from vlcompress.data import generative_eval_data, load_calibration
    from vlcompress.errors import ExportError
    from vlcompress.eval.generative import validation_items
    from vlcompress.exporters.generative import export_generative
    from vlcompress.models import load_model
    from vlcompress.prune import prune

    vlm = load_model(a.model)
    evals = generative_eval_data("shapes", n=a.prompts)
    images, questions = validation_items(evals, a.prompts)
    res = {"model": a.model, "prompts": len(images), "max_new_tokens": a.max_new_tokens,
           "data": [d.source for d in evals], "loadavg": list(os.getloadavg()),
           "loadavg_note": "the machine is shared; no timings are compared here"}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("dense", "pruned"):
            if variant == "pruned":
                calib = load_calibration("shapes", n=16, batch_size=8, seed=0)
                r = prune(vlm, "sparsegpt", 0.5, "2:4", calibration=calib)
                res["prune"] = {"method": "sparsegpt", "pattern": "2:4",
                                "achieved": r.to_dict()["achieved"]}
            try:
                out = export_generative(vlm, Path(tmp) / variant, images=images,
                                        questions=questions, max_new_tokens=a.max_new_tokens)
                res[variant] = out.validation
                print(f"{variant}: token-exact {out.validation['token_exact']:.3f} on "
                      f"{out.validation['prompts']} prompts; max abs diff "
                      f"{max(out.validation['max_abs_diff'].values()):.2e}")
            except ExportError as exc:
                ok = False
                res[variant] = {"error": str(exc)}
                print(f"{variant}: {exc}")
    path = write_result("generative_export", res, a.out)
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
