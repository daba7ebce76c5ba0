"""``--method auto``: try the candidate methods, keep the one most faithful to the dense model.

No single scorer wins on every model (the MULTIFLOW paper's tables, and ours), so ``auto``
measures instead of guessing. The calibration pairs are split: the first ``1 - 0.25`` calibrate
the candidates, the last quarter is held out. Each candidate prunes the model (from the
dense weights, restored from a copy between candidates) at the requested sparsity, pattern,
scope and seed; then the held-out pairs are embedded and compared with the dense model's
embeddings of the same pairs:

- ``image_cosine``, ``text_cosine``: mean cosine similarity of pruned to dense embeddings;
- ``i2t_agreement``: fraction of images whose top-1 caption (among the held-out captions) is
  the one the dense model retrieves (same caption text counts as the same);
- ``t2i_agreement``: the same for captions retrieving images.

The candidate's ``score`` is the mean of the four (higher is better); the best one's weights
are kept (exactly what was measured, not a re-run) and :class:`~vlcompress.prune.PruneResult`
``details`` (so the report's ``prune.details``) record the ``winner``, its ``margin`` over the
``runner_up`` and every candidate's metrics and seconds. Memory: two extra copies of the
prunable weights (dense, and best so far). The activation statistics of the fit pairs are
collected once, on the dense model, and shared by every candidate that scores from them.

Registered as the method ``auto`` of kind ``solve`` (it runs prune() for each candidate
through ``Context.prune``, so it never imports the orchestrator above it).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..progress import NULL
from .registry import Method, Solved, register_method

CANDIDATES = ("magnitude", "lamp", "wanda", "multiflow", "snip", "ecoflap", "sparsegpt")
HELDOUT_FRACTION = 0.25


def split_heldout(data, fraction: float = HELDOUT_FRACTION):
    """(fit, held-out) :class:`PairData` from ``data``: the last ``fraction`` is held out (at
    least one pair). With a single pair both are that pair."""
    from ..data.pairs import PairData

    n = len(data)
    n_held = min(n - 1, max(1, round(n * fraction))) if n > 1 else n
    cut = n - n_held if n > 1 else n

    def part(sl: slice) -> PairData:
        return PairData(None if data.images is None else data.images[sl], data.captions[sl],
                        data.batch_size,
                        None if data.labels is None else data.labels[sl],
                        source=f"{getattr(data, 'source', '') or 'pairs'}[{sl.start}:{sl.stop}]")

    fit = part(slice(0, cut))
    held = part(slice(cut if n > 1 else 0, n))
    return fit, held


@torch.no_grad()
def embed_pairs(vlm, data) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Normalised (image, caption) embeddings of every pair of ``data``, float32 on the CPU;
    None for the side a one-tower model does not have (token features are flattened)."""
    ims, txt = [], []
    has_image, has_text = "vision" in vlm.towers, "text" in vlm.towers
    for b in data.batches():
        if has_image:
            ims.append(vlm.embed_images(b.images).float().cpu())
        if has_text:
            txt.append(vlm.embed_texts(list(b.captions)).float().cpu())

    def norm(xs):
        if not xs:
            return None
        x = torch.cat(xs)
        return F.normalize(x.flatten(0, -2) if x.dim() > 2 else x, dim=-1)

    return norm(ims), norm(txt)


def fidelity_to_dense(dense, pruned, captions: list[str] | None = None) -> dict[str, float]:
    """The fidelity metrics above and their mean ``score`` (a one-tower model: the cosine of
    its side alone)."""
    di, dt = dense
    pi, pt = pruned
    out = {}
    if di is not None:
        out["image_cosine"] = (di * pi).sum(-1).mean().item()
    if dt is not None:
        out["text_cosine"] = (dt * pt).sum(-1).mean().item()
    if di is not None and dt is not None and di.shape[0] == dt.shape[0]:
        if captions is not None:
            ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
            cid = torch.tensor([ids[c] for c in captions])
        else:
            cid = torch.arange(dt.shape[0])
        out["i2t_agreement"] = (cid[(di @ dt.t()).argmax(1)] == cid[(pi @ pt.t()).argmax(1)]
                                ).float().mean().item()
        out["t2i_agreement"] = ((dt @ di.t()).argmax(1) == (pt @ pi.t()).argmax(1)).float().mean().item()
    out["score"] = sum(out.values()) / len(out)
    return out


def auto_select(ctx, layers, *, candidates=CANDIDATES) -> Solved:
    """Prune ``ctx.vlm`` in place with the candidate most faithful to the dense model (see the
    module doc); ``layers`` are the layers :func:`prune` selected, ``ctx.cfg`` its config and
    ``ctx.prune`` prune() itself (it runs each candidate)."""
    vlm, data, cfg, progress, prune = ctx.vlm, ctx.data, ctx.cfg, ctx.progress or NULL, ctx.prune
    if data is None:
        raise ConfigError("method 'auto' needs calibration pairs to hold some out")
    fit, held = split_heldout(data)
    dense = embed_pairs(vlm, held)
    all_layers = vlm.prunable_layers()
    original = {ly.name: ly.weight.detach().clone() for ly in all_layers}

    def restore(weights):
        with torch.no_grad():
            for ly in all_layers:
                if ly.name in weights:
                    ly.weight.copy_(weights[ly.name])

    # One calibration capture shared by the candidates that score from activation statistics
    # (wanda, multiflow, ecoflap's inner wanda): the dense model's, over the fit pairs, which
    # is what each would collect itself after restore(original). Solvers (sparsegpt) capture
    # block by block on the weights they prune; snip and ecoflap add their own gradient /
    # loss passes.
    from ..calibrate import collect_stats
    from .registry import get_method

    t = time.perf_counter()
    shared = (collect_stats(vlm, fit, layers)
              if any(get_method(c).needs_calibration and get_method(c).kind != "solve"
                     for c in candidates) else None)
    calib = time.perf_counter() - t
    rows: list[dict] = []
    best = None  # (score, name, weights, masks, allocation)
    try:
        with progress.task("auto", total=len(candidates)) as task:
            for name in candidates:
                restore(original)
                t = time.perf_counter()
                try:
                    res = prune(vlm, name, cfg.sparsity, cfg.pattern, calibration=fit,
                                scope=cfg.scope, skip_incompatible=cfg.skip_incompatible,
                                seed=cfg.seed, layerwise=cfg.layerwise, stats=shared)
                except ConfigError as exc:  # e.g. a family without a loss for snip/ecoflap
                    rows.append({"method": name, "error": str(exc)})
                    task.advance()
                    continue
                secs = time.perf_counter() - t
                calib += res.calibration_seconds
                fid = fidelity_to_dense(dense, embed_pairs(vlm, held), held.captions)
                rows.append({"method": name, **{k: round(v, 6) for k, v in fid.items()},
                             "seconds": round(secs, 3)})
                if best is None or fid["score"] > best[0]:
                    best = (fid["score"], name,
                            {ly.name: ly.weight.detach().clone() for ly in layers},
                            res.masks, res.allocation)
                task.advance()
    except BaseException:
        restore(original)
        raise
    if best is None:
        restore(original)
        raise ConfigError("method 'auto': no candidate could prune this model: "
                          + "; ".join(r.get("error", "") for r in rows))
    restore(original)
    restore(best[2])
    scored = sorted((r for r in rows if "score" in r), key=lambda r: -r["score"])
    runner = scored[1] if len(scored) > 1 else None
    details = {
        "winner": best[1],
        "winner_score": round(best[0], 6),
        "runner_up": runner["method"] if runner else None,
        "margin": round(best[0] - runner["score"], 6) if runner else None,
        "criterion": "mean of image/text cosine and i2t/t2i top-1 agreement with the dense "
                     "model on held-out calibration pairs",
        "fit_pairs": len(fit), "heldout_pairs": len(held),
        "candidates": rows,
    }
    return Solved(best[3], details, allocation=f"auto:{best[4]}", calibration_seconds=calib)


def solve(ctx, layers) -> Solved:
    return auto_select(ctx, layers)


register_method(Method(
    name="auto", kind="solve", allocation="auto", solve=solve, needs=("calibration",),
    patterns=("unstructured", "nm"),
    description="tries " + ", ".join(CANDIDATES) + "; keeps the most faithful to the dense "
                "model on held-out calibration pairs"))
