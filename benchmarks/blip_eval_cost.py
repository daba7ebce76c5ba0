"""What ITM re-ranking costs in BLIP evaluation: wall time of ``embed_eval`` with ITM
re-ranking (top-k=8 both directions) vs contrastive (ITC) only, interleaved in one process.

Each image is encoded once per model; ITM re-ranks from the cached vision tokens, each
(image, caption) pair scored once, one image's cross-attention keys/values computed once for
all its candidate texts. Before this, ITM re-encoded the query image k=8 times per query
(``prune-export --model blip-itm-base --eval-size 48`` did not finish in 20 minutes on 2 cores).

    python benchmarks/blip_eval_cost.py --n 48 --rounds 2

Target: ITM / ITC <= 2.5. Random weights (the ``blip-itm-base`` preset): the cost does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's vlcompress, then _common
from _common import write_result  # noqa: E402

TARGET = 2.5


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="blip-itm-base")
    ap.add_argument("--n", type=int, default=48, help="shapes eval pairs")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved (ITC, ITM) rounds")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import vlcompress
    from vlcompress.data import load_eval
    from vlcompress.eval import embed_eval, metrics_from_embeddings
    from vlcompress.models import blip as blip_mod

    vlm = vlcompress.load_model(args.model)
    data = load_eval("shapes", n=args.n)
    calls = {"vision": 0, "itm_calls": 0, "itm_pairs": 0}
    vision = vlm.model.vision_model
    vision.register_forward_hook(lambda m, a, o: calls.__setitem__("vision", calls["vision"] + 1))
    orig = blip_mod.BLIP.itm_scores_from_embeds

    def counted(self, image_embeds, texts):
        calls["itm_calls"] += 1
        calls["itm_pairs"] += len(texts)
        return orig(self, image_embeds, texts)

    blip_mod.BLIP.itm_scores_from_embeds = counted
    embed_eval(vlm, load_eval("shapes", n=4), itm=True)  # warm-up (allocator, kernels)
    times = {"itc": [], "itm": []}
    metrics = {}
    for _ in range(args.rounds):
        for mode in ("itc", "itm"):
            before = dict(calls)
            t0 = time.perf_counter()
            emb = embed_eval(vlm, data, itm=(mode == "itm"))
            times[mode].append(time.perf_counter() - t0)
            metrics[mode] = metrics_from_embeddings(emb)
            counts = {k: calls[k] - before[k] for k in calls}
    itc, itm = min(times["itc"]), min(times["itm"])
    ratio = itm / itc
    payload = {
        "command": "python " + " ".join(sys.argv),
        "commit": _commit(),
        "model": args.model, "weights": "random (preset)", "eval": f"shapes:eval n={args.n}",
        "itm_candidates": 8, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "itc_only_s": round(itc, 3), "with_itm_s": round(itm, 3),
        "ratio_itm_over_itc": round(ratio, 3), "target_ratio": TARGET, "meets_target": ratio <= TARGET,
        "calls_per_itm_eval": counts,
        "old_protocol_vision_passes": args.n + 2 * 8 * args.n,
        "metrics": metrics,
    }
    path = write_result("blip_eval_cost", payload, args.out)
    print(f"ITC only {itc:.2f}s, with ITM {itm:.2f}s, ratio {ratio:.2f} (target <= {TARGET}); "
          f"vision passes {counts['vision']} (old protocol {payload['old_protocol_vision_passes']}); "
          f"-> {path}")


if __name__ == "__main__":
    main()
