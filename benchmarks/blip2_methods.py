"""Every one-shot method on a small BLIP-2 / OPT model: fidelity to the dense model, ECoFLaP's
allocation across vision and language, and the ONNX export's token-exactness.

    OMP_NUM_THREADS=1 python benchmarks/blip2_methods.py

The model is a BLIP-2 built from a config (``--size``: ``small``, ViT 128 wide x 4 layers at
64 px, a Q-Former 128 wide x 2 layers with 16 queries, OPT 128 wide x 4 layers; ``tiny``: the
test model's 32-wide shapes), RANDOM WEIGHTS (no trained BLIP-2 fits this machine), saved in
the hub layout and loaded as a user's folder is. Caption and VQA scores of random weights mean
nothing; the rows report fidelity to the dense model on the bundled shapes evaluation data
(next-token KL on the target tokens, next-token and greedy-token agreement). For each method x
{unstructured ``--sparsity``, 2:4}: prune vision and language (the Q-Former stays dense, as in
ECoFLaP's BLIP-2 setting; ``--parts`` to change) on ``--calibration`` sequences, then score.
ECoFLaP's rows give its per-block sparsities (one budget across the ViT's and OPT's blocks)
and what they add up to per part. ``--export`` exports the dense model and the sparsegpt 2:4
model (vision/embed/decoder ONNX) and validates greedy generation on ONNX Runtime token for
token against PyTorch. Writes ``benchmarks/results/blip2_methods.json`` with the command,
commit, machine and load average (a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import parse_spec, write_result  # noqa: E402
from generative_quality import _metrics  # noqa: E402

SIZES = {  # vision (hidden, layers, image, patch), qformer (hidden, layers, queries), OPT (hidden, layers)
    "tiny": ((32, 3, 32, 8), (32, 2, 6), (32, 2)),
    "small": ((128, 4, 64, 8), (128, 2, 16), (128, 4)),
}


def build_folder(root: Path, size: str, seed: int = 0) -> Path:
    """A random BLIP-2 / OPT in the hub layout, its weights scaled so generation depends on the
    image and varies along a sequence (as tests/blip2_factory.py does)."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from vlcompress.models.blip2 import IMAGE_TOKEN, build_processor, build_tokenizer

    (vh, vl, img, patch), (qh, ql, nq), (th, tl) = SIZES[size]
    tok = build_tokenizer()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.manual_seed(seed)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vl,
                           num_attention_heads=4, image_size=img, patch_size=patch,
                           initializer_range=0.02),
        qformer_config=dict(hidden_size=qh, intermediate_size=4 * qh, num_hidden_layers=ql,
                            num_attention_heads=4, encoder_hidden_size=vh,
                            cross_attention_frequency=1),
        text_config=dict(model_type="opt", hidden_size=th, ffn_dim=4 * th, num_hidden_layers=tl,
                         num_attention_heads=4, vocab_size=image_id + 1,
                         max_position_embeddings=256, word_embed_proj_dim=th, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3),
        num_query_tokens=nq, image_token_index=image_id)
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for sub in (model.qformer, model.language_model.model.decoder.layers):
            for p in sub.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.5 * (32 / (qh if sub is model.qformer else th)) ** 0.5)
        model.language_model.lm_head.weight.normal_(0, 0.5)
        model.language_projection.weight.normal_(0, 0.5)
    folder = root / f"blip2-{size}"
    model.save_pretrained(folder)
    build_processor(cfg, tok).save_pretrained(folder)
    return folder


def per_part(details: dict, vlm) -> dict:
    """ECoFLaP's block sparsities summed per part (weighted by the blocks' weights)."""
    sizes: dict[str, int] = {}
    for ly in vlm.prunable_layers():
        k = f"{ly.modality}.{ly.block}"
        sizes[k] = sizes.get(k, 0) + ly.weight.numel()
    out: dict[str, list[float]] = {}
    for k, b in details["blocks"].items():
        part = k.split(".")[0]
        acc = out.setdefault(part, [0.0, 0.0])
        acc[0] += b["sparsity"] * sizes[k]
        acc[1] += sizes[k]
    return {p: round(a / n, 4) for p, (a, n) in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,multiflow,ecoflap")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--parts", default="vision,language")
    ap.add_argument("--calibration", default="shapes")
    ap.add_argument("--calibration-size", type=int, default=32)
    ap.add_argument("--eval-data", default="shapes")
    ap.add_argument("--eval-size", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--export", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from vlcompress.data import generative_eval_data, load_calibration
    from vlcompress.eval.generative import run_all
    from vlcompress.models import load_model
    from vlcompress.prune import prune

    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="blip2-bench-"))
    dense = load_model(str(build_folder(tmp, args.size)))
    params = {p: sum(ly.weight.numel() for ly in dense.prunable_layers() if ly.modality == p)
              for p in dense.towers}
    calib = load_calibration(args.calibration, n=args.calibration_size, batch_size=8)
    evals = generative_eval_data(args.eval_data, n=args.eval_size)
    dense_runs = run_all(dense, evals, max_new_tokens=args.max_new_tokens)
    rows = [{"method": "dense", "pattern": None, "metrics": _metrics(evals, dense_runs)}]
    scope = tuple(args.parts.split(","))
    exported = {}
    for spec in args.methods.split(","):
        method, opts = parse_spec(spec)
        for pattern in args.patterns.split(","):
            vlm = copy.deepcopy(dense)
            t = time.perf_counter()
            sparsity = args.sparsity if pattern == "unstructured" else None
            res = prune(vlm, method, sparsity, pattern, calibration=calib, scope=scope,
                        method_options=opts or None)
            secs = time.perf_counter() - t
            runs = run_all(vlm, evals, max_new_tokens=args.max_new_tokens)
            m = _metrics(evals, runs, dense_runs)
            row = {"method": spec, "pattern": pattern, "achieved": round(res.achieved, 4),
                   "per_part": {k: round(v, 4) for k, v in res.per_modality.items()},
                   "seconds_prune": round(secs, 1), "fidelity": m["fidelity"]}
            blocks = (res.details or {}).get("blocks")
            if method == "ecoflap" and blocks:
                row["ecoflap_allocation"] = {
                    "per_part": per_part(res.details, vlm), "cap": res.details["cap"],
                    "per_block": {k: round(b["sparsity"], 4) for k, b in blocks.items()}}
            rows.append(row)
            print(spec, pattern, row["per_part"], m["fidelity"], flush=True)
            if args.export and method == "sparsegpt" and pattern == "2:4":
                exported["sparsegpt 2:4"] = vlm
            else:
                del vlm
    export = {}
    if args.export:
        from vlcompress.eval.generative import validation_items
        from vlcompress.exporters.generative import export_generative

        images, questions = validation_items(evals, 8)
        for name, vlm in {"dense": dense, **exported}.items():
            t = time.perf_counter()
            r = export_generative(vlm, tmp / name.replace(" ", "_").replace(":", "-"),
                                  images=images, questions=questions,
                                  max_new_tokens=args.max_new_tokens)
            v = r.validation
            export[name] = {"token_exact": v["token_exact"], "prompts": v["prompts"],
                            "max_abs_diff": {k: float(f"{d:.3g}") for k, d in
                                             v["max_abs_diff"].items()},
                            "seconds": round(time.perf_counter() - t, 1)}
            print("export", name, export[name], flush=True)
    path = write_result("blip2_methods", {
        "model": f"BLIP-2 / OPT, {args.size} config, RANDOM WEIGHTS (fidelity only)",
        "config": {"vision": SIZES[args.size][0], "qformer": SIZES[args.size][1],
                   "opt": SIZES[args.size][2]},
        "prunable_params": params, "parts": args.parts,
        "note": "the bridge (Q-Former + projection) is kept dense unless --parts names it, "
                "as in ECoFLaP's BLIP-2 setting",
        "calibration": f"{args.calibration} (n={args.calibration_size})",
        "eval": [f"{d.source} (n={len(d)})" for d in evals],
        "max_new_tokens": args.max_new_tokens, "sparsity": args.sparsity,
        "rows": rows, "export": export,
        "loadavg": {"start": load0, "end": os.getloadavg()},
        "threads": torch.get_num_threads()}, out=args.out)
    print(path)


if __name__ == "__main__":
    main()
