"""UPop and EfficientVLM at 50% structured on BLIP retrieval shapes (the ``blip-itm-base``
preset: ViT-B/16 at 384 px, BERT-base text encoder with cross-attention), end to end.

    python benchmarks/blip_structured.py      # writes benchmarks/results/blip_structured.json

No trained BLIP exists offline, so this measures what a randomly initialised model allows:
that the search runs over every head of the fused-qkv vision attention, of the text
self-attention and of the cross-attention and every MLP neuron, slices a smaller dense model
(parameters before / after), that the slicing equals the masked model (``prune`` checks it on
every run: ``verify_max_abs_diff``), that the saved folder reloads (``load_model``) with
outputs identical to the in-memory model, and the fidelity of the pruned model to the dense
one on a few bundled pairs (cosine of the ITC image and text embeddings, |delta| of the ITM
match probability). Fidelity of a random model says little about accuracy; it is there to
show the pruned model still computes something close to the dense one.

Step counts are sized so each method runs in a few minutes on one shared CPU core
(``--search-steps``, ``--gate-steps``, ``--retrain-steps``; a step of 2 pairs at 384 px
is about 30 CPU-seconds); the pairs per step are ``--pairs`` (the search
and the retraining see the same calibration pairs). Both methods give the asked sparsity
within ``budget_fit.tolerance`` (0.005), whatever their search reached in so few steps
(``expected_sparsity_final``: EfficientVLM's Lagrangian; ``budget_fit``: what the fit of the
rounded widths did); EfficientVLM uses a faster gate / multiplier schedule than the defaults
(``EFFICIENTVLM_OPTIONS``). ``peak_rss_bytes_prune`` is the process's peak resident set during
each prune (``model_bytes``: one fp32 copy; ``search_holds``: what the search holds).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import provenance, write_result  # noqa: E402

from vlcompress import load_calibration, load_eval, load_model, prune  # noqa: E402
from vlcompress.models.surgery import find_blocks, is_sliced  # noqa: E402
from vlcompress.progress import Progress, _NullTask  # noqa: E402
from vlcompress.sparsity.structured import probe_inputs, tower_outputs  # noqa: E402

EFFICIENTVLM_OPTIONS = {"gate_lr": 2.0, "lambda_lr": 5.0, "warmup_fraction": 0.25}


def rss_bytes() -> int:
    """This process's resident set now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The peak resident set of this process while the block runs: a thread samples
    ``/proc/self/statm`` every ``every`` seconds (``ru_maxrss`` is the peak since the process
    started, not the block's). ``peak`` and ``start`` in bytes after the block."""

    def __init__(self, every: float = 0.02):
        import threading

        self.every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = self.peak = 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.every)

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class PhaseRSS(Progress):
    """A progress sink for prune(): the process's peak resident set while each task it opens
    runs (``upop search``, ``efficientvlm``, ``slice``, the retraining's ...), by name."""

    def __init__(self):
        self.peaks: dict[str, int] = {}

    @contextmanager
    def task(self, description: str, total: int | None = None):
        with PeakRSS() as m:
            yield _NullTask()
        key = description.split(" (")[0]
        self.peaks[key] = max(self.peaks.get(key, 0), m.peak)


def model_bytes(vlm) -> int:
    return sum(p.numel() * p.element_size() for p in vlm.model.parameters())


#: what the training-based searches hold at their peak, in model copies (``search_holds``)
SEARCH_MEMORY = ("the model being pruned, one frozen dense teacher (shared by the search and "
                 "the retraining), the weights' gradients and AdamW's two moments: about 5x the "
                 "model's bytes, plus the activations of one search batch")


def reinit_vision(vlm, std: float):
    """The same architecture built again with the vision config's ``initializer_range`` at
    ``std``: BLIP's default (1e-10, what the preset gets) makes a random vision tower's output
    ~1e-6 (``dense_tower_output_std`` below), constant image embeddings, and every image
    fidelity number vacuous."""
    from vlcompress.models.blip import BLIP

    cfg = copy.deepcopy(vlm.model.config)
    cfg.vision_config.initializer_range = float(std)
    torch.manual_seed(0)
    return BLIP(type(vlm.model)(cfg).eval(), vlm.tokenizer, vlm.image_processor, name=vlm.name,
                source=f"{vlm.source} (vision initializer_range {std:g})")


def n_params(vlm) -> int:
    return sum(p.numel() for p in vlm.model.parameters())


def params_per_part(vlm) -> dict[str, int]:
    out = {"vision": 0, "text": 0, "other": 0}
    for name, p in vlm.model.named_parameters():
        key = "vision" if name.startswith("vision_model.") else \
            "text" if name.startswith("text_encoder.") else "other"
        out[key] += p.numel()
    return out


@torch.no_grad()
def fidelity(dense, pruned, pairs) -> dict:
    """Cosine of the pruned model's ITC embeddings to the dense model's, per pair, and the
    ITM match probability's absolute difference."""
    out = {}
    img_d, tok_d = dense.embed_images_with_tokens(pairs.images)
    img_p, tok_p = pruned.embed_images_with_tokens(pairs.images)
    txt_d, txt_p = dense.embed_texts(pairs.captions), pruned.embed_texts(pairs.captions)
    out["image_cosine"] = F.cosine_similarity(img_d, img_p, dim=-1).tolist()
    out["text_cosine"] = F.cosine_similarity(txt_d, txt_p, dim=-1).tolist()
    itm_d = dense.itm_scores_from_embeds(tok_d, list(pairs.captions))
    itm_p = pruned.itm_scores_from_embeds(tok_p, list(pairs.captions))
    out["itm_prob_abs_diff"] = (itm_d - itm_p).abs().tolist()
    for k in ("image_cosine", "text_cosine", "itm_prob_abs_diff"):
        out[f"{k}_mean"] = round(sum(out[k]) / len(out[k]), 5)
    return out


def prune_structured(method: str, dense, calib, a):
    """A copy of ``dense`` (or, a callable, what it returns: a fresh load, so no dense model
    need stay resident) pruned by ``method`` (upop / efficientvlm) at ``a.sparsity``
    structured with the run's step counts: ``(vlm, result, options, seconds, {unit: (heads,
    MLP width)})`` (shared with blip_caption_structured.py)."""
    vlm = dense() if callable(dense) else copy.deepcopy(dense)
    if method == "upop":
        opts = {"search_steps": a.search_steps, "retrain_steps": a.retrain_steps}
    else:
        opts = {"train_steps": a.gate_steps, "retrain_steps": a.retrain_steps,
                **EFFICIENTVLM_OPTIONS}
    t = time.perf_counter()
    phases = PhaseRSS()
    res = prune(vlm, method, a.sparsity, "structured", calibration=calib, round_to=a.round_to,
                method_options=opts, progress=phases)
    secs = time.perf_counter() - t
    res.details["peak_rss_by_phase"] = phases.peaks
    blocks = {b.prefix: (b.num_heads, b.mlp_width) for b in find_blocks(vlm)}
    return vlm, res, opts, secs, blocks


def run_method(method: str, dense, calib, pairs, a) -> dict:
    with PeakRSS() as mem:
        vlm, res, opts, secs, blocks = prune_structured(method, dense, calib, a)
    st = res.details["structured"]
    d = res.details[method]
    with tempfile.TemporaryDirectory() as tmp:
        t2 = time.perf_counter()
        vlm.save(tmp)
        again = load_model(tmp)
        probe = probe_inputs(vlm, calib)
        ref, got = tower_outputs(vlm, probe), tower_outputs(again, probe)
        reload = {"seconds": round(time.perf_counter() - t2, 1), "is_sliced": is_sliced(again),
                  "class": type(again.model).__name__,
                  "max_abs_diff": {k: float((ref[k] - got[k]).abs().max()) for k in ref}}
    row = {"method": method, "target": a.sparsity, "achieved": round(res.achieved, 4),
           "per_modality": {k: round(v, 4) for k, v in res.per_modality.items()},
           "params_before": n_params(dense), "params_after": n_params(vlm),
           "params_ratio": round(n_params(vlm) / n_params(dense), 4),
           "params_per_part_before": params_per_part(dense),
           "params_per_part_after": params_per_part(vlm),
           "prune_seconds": round(secs, 1), "method_options": opts,
           "verify_max_abs_diff": st["verify_max_abs_diff"],
           "kept": d.get("kept_by_search") or d.get("kept_by_gates"),
           "kept_after_rounding": d.get("kept_after_rounding"),
           "expected_sparsity_final": d.get("expected_sparsity_final"),
           "budget_fit": d.get("budget_fit"),
           "peak_rss_bytes_prune": mem.peak, "rss_bytes_before_prune": mem.start,
           "peak_rss_by_phase": res.details["peak_rss_by_phase"],
           "retrain": d.get("retrain"),
           "heads_mlp_per_unit": {k: list(v) for k, v in blocks.items()},
           "reload": reload, "fidelity": fidelity(dense, vlm, pairs)}
    f = row["fidelity"]
    print(f"{method:12s} achieved={res.achieved:.4f} peak RSS {mem.peak / 1e9:.2f} GB params "
          f"{row['params_before'] / 1e6:.1f}M -> "
          f"{row['params_after'] / 1e6:.1f}M ({secs:.0f}s) reload diff "
          f"{max(reload['max_abs_diff'].values()):.2g} image cos {f['image_cosine_mean']:.4f} "
          f"text cos {f['text_cosine_mean']:.4f} itm |d| {f['itm_prob_abs_diff_mean']:.4f}",
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="blip-itm-base")
    ap.add_argument("--methods", default="upop,efficientvlm")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=2, help="calibration pairs (one search batch)")
    ap.add_argument("--eval-pairs", type=int, default=4, help="bundled pairs for fidelity")
    ap.add_argument("--search-steps", type=int, default=4, help="upop search steps")
    ap.add_argument("--gate-steps", type=int, default=5, help="efficientvlm gate training steps")
    ap.add_argument("--retrain-steps", type=int, default=1)
    ap.add_argument("--vision-init", type=float, default=0.02,
                    help="vision initializer_range of the random model (0: the preset's own)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    provenance()  # the commit this run starts from, whatever lands in the checkout meanwhile
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dense = load_model(a.model)
    if a.vision_init:
        dense = reinit_vision(dense, a.vision_init)
    calib = load_calibration("shapes", n=a.pairs, batch_size=a.pairs, seed=0)
    pairs = load_eval("shapes", n=a.eval_pairs)
    probe = tower_outputs(dense, probe_inputs(dense, calib))
    rows = [run_method(m, dense, calib, pairs, a) for m in a.methods.split(",")]
    res = {"model": a.model, "init": "random (preset: no trained BLIP is available offline)",
           "vision_initializer_range": a.vision_init or "preset default",
           "pattern": "structured", "units": "heads,neurons", "round_to": a.round_to,
           "calibration_pairs": a.pairs, "fidelity_pairs": a.eval_pairs,
           "dense_tower_output_std": {k: float(v.std()) for k, v in probe.items()},
           "model_bytes": model_bytes(dense), "search_holds": SEARCH_MEMORY,
           "peak_rss_note": "peak_rss_bytes_prune: this process's peak resident set during "
                            "prune() (sampled every 20 ms), the benchmark's own dense model "
                            "(kept for fidelity) included",
           "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
           "loadavg_note": "2-core machine shared with other developers: seconds are "
                           "disturbed by their load",
           "rows": rows, "seconds_total": round(time.perf_counter() - t0, 1)}
    path = write_result("blip_structured", res, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
