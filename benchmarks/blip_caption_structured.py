"""UPop and EfficientVLM at 50% structured on BLIP captioning shapes (the
``blip-image-captioning-base`` preset: ViT-B/16 at 384 px, BERT-base text decoder with
cross-attention), end to end: prune, slice, save, reload, fidelity, ONNX export.

    python benchmarks/blip_caption_structured.py --model tiny   # ..._structured_tiny.json
    python benchmarks/blip_caption_structured.py   # the preset: ..._structured.json

No trained BLIP captioner exists offline (nothing is downloaded), so this measures what a
randomly initialised model allows, and says so in the JSON (``init``):

- the search runs over every head of the fused-qkv vision attention, of the decoder's
  self-attention and cross-attention, and every MLP neuron, and slices a smaller dense model
  (parameters before / after; ``verify_max_abs_diff``: slicing equals masking, checked by
  ``prune`` on every run);
- the saved folder reloads (``load_model``, manifest) with next-token logits identical to the
  in-memory model's and the same greedy tokens;
- fidelity of the pruned model to the dense one on bundled shapes images (``token_kl``,
  ``next_token_agreement``, ``greedy_agreement``: :mod:`vlcompress.eval.generative`): of a
  random model it says little about captioning quality, only that the pruned model computes
  something close to the dense one;
- the ONNX export (vision.onnx + decoder.onnx with cross-attention and a KV cache) of the
  dense model and of each pruned model: greedy generation on ONNX Runtime token for token
  against PyTorch's ``generate`` on the validation prompts (``token_exact``, target 1.0).

Step counts are sized for a few minutes per method on a shared CPU (``--search-steps``,
``--gate-steps``, ``--retrain-steps``); EfficientVLM uses the faster gate / multiplier schedule
of ``blip_structured.py`` so it gets near 50% within them, and the JSON records what it reached.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import provenance, write_result  # noqa: E402
from blip_structured import (  # noqa: E402
    SEARCH_MEMORY,
    PeakRSS,
    model_bytes,
    n_params,
    prune_structured,
    rss_bytes,
)

from vlcompress import load_calibration, load_eval, load_model  # noqa: E402
from vlcompress.eval.generative import generative_fidelity, run_generative  # noqa: E402
from vlcompress.exporters.generative_blip import export_blip  # noqa: E402
from vlcompress.models.surgery import is_sliced  # noqa: E402

#: ``--model tiny``: a BLIP captioning config of tiny-clip's sizes (128 wide, 4 layers, 4
#: heads, 48 px at patch 8), random init, the shapes words (the issue's "tiny-clip-sized
#: BLIP configs"; the preset's 224M parameters take an hour of one shared core)
TINY = {"vision": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, image_size=48, patch_size=8,
                       initializer_range=0.02),
        "text": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=40,
                     encoder_hidden_size=128, pad_token_id=0, sep_token_id=3,
                     eos_token_id=3, bos_token_id=4)}


def tiny_model(folder: Path, context: int | None = None):
    """The ``TINY`` config, randomly initialised, saved in the hub layout and loaded as a
    user's folder is; ``context``: other position embeddings than its 40 (a prune-export
    that times 32 decode tokens needs more)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    from vlcompress.data import shapes
    from vlcompress.models.blip_caption import build_blip_tokenizer, build_processor

    tc = {**TINY["text"], **({"max_position_embeddings": context} if context else {})}
    tok = build_blip_tokenizer(shapes.vocabulary(), pad_id=tc["pad_token_id"],
                               sep_id=tc["sep_token_id"], bos_id=tc["bos_token_id"])
    torch.manual_seed(0)
    cfg = BlipConfig(text_config={**tc, "vocab_size": len(tok)}, vision_config=TINY["vision"])
    model = BlipForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    build_processor(cfg, tok).save_pretrained(folder)
    return load_model(str(folder))


def params_per_part(vlm) -> dict[str, int]:
    out = {"vision": 0, "decoder": 0, "other": 0}
    for name, p in vlm.model.named_parameters():
        key = "vision" if name.startswith("vision_model.") else \
            "decoder" if name.startswith("text_decoder.") else "other"
        out[key] += p.numel()
    return out


def reinit_vision(vlm, std: float) -> None:
    """The preset's vision tower drawn again at ``initializer_range`` ``std`` (BLIP's default
    1e-10 gives a constant image embedding: the decoder would not see the image)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in vlm.model.vision_model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()


def export_check(vlm, folder, images, max_new_tokens: int) -> dict:
    t = time.perf_counter()
    res = export_blip(vlm, folder, images=images, max_new_tokens=max_new_tokens)
    v = res.validation
    return {"token_exact": v["token_exact"], "prompts": v["prompts"],
            "max_abs_diff": v["max_abs_diff"], "seconds": round(time.perf_counter() - t, 1)}


def run_method(method: str, load_dense, dense_info: dict, dense_run, calib, evals, a,
               tmp: Path) -> dict:
    """Prune a fresh load of the dense folder (``load_dense``: no dense model stays resident
    beside the one being pruned), save, reload, compare, fidelity, ONNX (unless skipped)."""
    with PeakRSS() as mem_all:
        with PeakRSS() as mem:
            vlm, res, opts, secs, blocks = prune_structured(method, load_dense, calib, a)
        row = _after_prune(method, vlm, res, opts, secs, blocks, dense_info, dense_run, calib,
                           evals, a, tmp)
    row["peak_rss_bytes_prune"] = mem.peak
    row["rss_bytes_before_prune"] = mem.start
    row["peak_rss_bytes_method"] = mem_all.peak
    print(f"{method:12s} peak RSS {mem.peak / 1e9:.2f} GB in prune, {mem_all.peak / 1e9:.2f} GB "
          f"in the whole method (before: {mem.start / 1e9:.2f} GB)", flush=True)
    return row


def _after_prune(method, vlm, res, opts, secs, blocks, dense_info, dense_run, calib, evals, a,
                 tmp: Path) -> dict:
    d = res.details[method]
    t2 = time.perf_counter()
    folder = tmp / f"{method}-model"
    vlm.save(folder)
    again = load_model(str(folder))
    batch = next(iter(calib.batches()))
    enc = vlm.encode(batch)
    ref, got = vlm.logits(enc), again.logits(enc)
    images = list(evals.images)[:a.export_prompts]
    same_tokens = vlm.generate(images, max_new_tokens=a.max_new_tokens) == \
        again.generate(images, max_new_tokens=a.max_new_tokens)
    reload = {"seconds": round(time.perf_counter() - t2, 1), "is_sliced": is_sliced(again),
              "class": type(again.model).__name__, "family": again.family,
              "logits_max_abs_diff": float((ref - got).abs().max()),
              "greedy_tokens_equal": bool(same_tokens)}
    pruned_run = run_generative(vlm, evals, max_new_tokens=a.max_new_tokens)
    fid = generative_fidelity(dense_run, pruned_run)
    onnx = None if a.skip_onnx else export_check(vlm, tmp / f"{method}-onnx", images,
                                                 a.max_new_tokens)
    row = {"method": method, "target": a.sparsity, "achieved": round(res.achieved, 4),
           "per_modality": {k: round(v, 4) for k, v in res.per_modality.items()},
           "params_before": dense_info["params"], "params_after": n_params(vlm),
           "params_ratio": round(n_params(vlm) / dense_info["params"], 4),
           "params_per_part_before": dense_info["parts"],
           "params_per_part_after": params_per_part(vlm),
           "prune_seconds": round(secs, 1), "method_options": opts,
           "verify_max_abs_diff": res.details["structured"]["verify_max_abs_diff"],
           "kept": d.get("kept_by_search") or d.get("kept_by_gates"),
           "expected_sparsity_final": d.get("expected_sparsity_final"),
           "budget_fit": d.get("budget_fit"), "retrain": d.get("retrain"),
           "peak_rss_by_phase": res.details["peak_rss_by_phase"],
           "heads_mlp_per_unit": {k: list(v) for k, v in blocks.items()},
           "reload": reload, "fidelity": fid,
           "examples": [{"dense": x, "pruned": y} for x, y in
                        zip(dense_run.texts[:3], pruned_run.texts[:3], strict=False)],
           "onnx_pruned": onnx}
    print(f"{method:12s} achieved={res.achieved:.4f} params {row['params_before'] / 1e6:.1f}M -> "
          f"{row['params_after'] / 1e6:.1f}M ({secs:.0f}s) reload diff "
          f"{reload['logits_max_abs_diff']:.2g} tokens equal {same_tokens} kl "
          f"{fid['token_kl']:.4f} greedy agreement {fid['greedy_agreement']:.3f} onnx "
          f"token-exact {'skipped' if onnx is None else format(onnx['token_exact'], '.2f')}",
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="blip-image-captioning-base",
                    help="a preset, a model folder, or 'tiny' (tiny-clip-sized, TINY)")
    ap.add_argument("--methods", default="upop,efficientvlm")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=2, help="calibration pairs (one search batch)")
    ap.add_argument("--eval-pairs", type=int, default=8, help="bundled pairs for fidelity")
    ap.add_argument("--export-prompts", type=int, default=4, help="images the export is "
                    "validated on (token-exact greedy)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--search-steps", type=int, default=3, help="upop search steps")
    ap.add_argument("--gate-steps", type=int, default=4, help="efficientvlm gate training steps")
    ap.add_argument("--retrain-steps", type=int, default=1)
    ap.add_argument("--vision-init", type=float, default=0.02,
                    help="a preset's vision initializer_range (BLIP's 1e-10 makes a random "
                         "vision tower's output constant); 0: the preset's own")
    ap.add_argument("--skip-onnx", action="store_true",
                    help="no ONNX export check (the preset's export is minutes per model)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    provenance()  # the commit this run starts from, whatever lands in the checkout meanwhile
    torch.manual_seed(0)
    t0 = time.perf_counter()
    holder = tempfile.TemporaryDirectory()
    folder = Path(holder.name) / "dense"
    if a.model == "tiny":
        dense = tiny_model(folder)
    else:
        dense = load_model(a.model)
        if a.vision_init:
            reinit_vision(dense, a.vision_init)
        dense.save(folder)  # the methods load it from here: no resident dense copy
        dense = load_model(str(folder))
    calib = load_calibration("shapes", n=a.pairs, batch_size=a.pairs, seed=0)
    evals = load_eval("shapes", n=a.eval_pairs)
    dense_run = run_generative(dense, evals, max_new_tokens=a.max_new_tokens)
    dense_info = {"params": n_params(dense), "parts": params_per_part(dense),
                  "model_bytes": model_bytes(dense), "family": dense.family,
                  "caption_prompt": dense.prompts["caption"]}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        images = list(evals.images)[:a.export_prompts]
        dense_onnx = None
        if not a.skip_onnx:
            dense_onnx = export_check(dense, tmp / "dense-onnx", images, a.max_new_tokens)
            print(f"dense        onnx token-exact {dense_onnx['token_exact']:.2f} "
                  f"({dense_onnx['seconds']:.0f}s)", flush=True)
        del dense  # from here on only the model being pruned (and its teacher) is resident
        gc.collect()
        rss_idle = rss_bytes()
        rows = [run_method(m, lambda: load_model(str(folder)), dense_info, dense_run, calib,
                           evals, a, tmp) for m in a.methods.split(",")]
    holder.cleanup()
    res = {"model": a.model, "family": dense_info["family"],
           "config": TINY if a.model == "tiny" else None,
           "init": "random (preset): no trained BLIP captioner is available offline, so "
                   "the quality figures are fidelity to the dense model, not CIDEr",
           "vision_initializer_range": TINY["vision"]["initializer_range"] if a.model == "tiny"
           else (a.vision_init or "preset default"),
           "steps": {"search_steps": a.search_steps, "gate_steps": a.gate_steps,
                     "retrain_steps": a.retrain_steps},
           "model_bytes": dense_info["model_bytes"], "search_holds": SEARCH_MEMORY,
           "rss_bytes_idle": rss_idle,
           "peak_rss_note": "per row: peak_rss_bytes_prune (prune() alone) and "
                            "peak_rss_bytes_method (prune, save, reload, fidelity, export), "
                            "this process's resident set sampled every 20 ms; no dense model "
                            "is resident beside them (each method loads the dense folder)",
           "pattern": "structured", "units": "heads,neurons", "round_to": a.round_to,
           "calibration_pairs": a.pairs, "fidelity_images": dense_run.n,
           "max_new_tokens": a.max_new_tokens, "caption_prompt": dense_info["caption_prompt"],
           "dense_examples": dense_run.texts[:3],
           "dense_onnx": dense_onnx if dense_onnx is not None else "skipped (--skip-onnx)",
           "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
           "loadavg_note": "2-core machine shared with other developers: seconds are "
                           "disturbed by their load",
           "rows": rows, "seconds_total": round(time.perf_counter() - t0, 1)}
    name = "blip_caption_structured" + ("_tiny" if a.model == "tiny" else "")
    path = write_result(name, res, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
