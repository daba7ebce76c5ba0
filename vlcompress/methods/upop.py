"""UPop: unified and progressive structured pruning (Shi, Chen, Lin, Huang, Liu, Zhang, Wang,
"UPop: Unified and Progressive Pruning for Compressing Vision-Language Transformers",
ICML 2023).

Our own implementation of the paper's recipe, sized to run on a CPU for tiny-clip:

1. **unified search space**: a learnable mask value ``zeta`` per attention head (it scales
   the head's output before the out-projection, i.e. the head's ``head_dim`` columns of
   ``out_proj``) and per MLP neuron (its fc2 input) in every encoder layer of every modality;
2. **importance**: the gradient magnitude ``|dL/dzeta|`` of a distillation loss (contrastive
   + embedding + logit distillation from the dense model, :func:`vlcompress.recover.distill_loss`),
   accumulated over the search steps; standardised per modality and unit type (z-scores), so
   the towers compare, then **ranked together** across all layers and modalities (heads in one
   pool, neurons in another);
3. **progressive**: at search step t the pruned ratio follows the cosine ramp
   ``p_t = s * (1 - cos(pi * t / T)) / 2`` to the target ``s``; the mask values of the units
   currently ranked in the lowest ``p_t`` are pulled to ``1 - t / T`` (0 at the end), so
   the model gets used to losing them gradually while the importance keeps being measured;
4. **slicing** with the structured surgery (kept widths rounded as every structured method),
   then **distillation retraining** (:func:`vlcompress.recover.train_student`) with the
   pattern kept.

Simplifications (to keep it affordable): the search learns the mask values only (the paper
also trains the weights during the search; here the weights are trained in the retraining
phase), and runs ``SEARCH_STEPS`` steps on the calibration pairs, then ``RETRAIN_STEPS``
distillation steps on the bundled training split.
"""

from __future__ import annotations

import math

import torch

from ..progress import NULL
from ._search import (
    GroupGates,
    counts_from_scores,
    fill_untouched,
    global_prune_sets,
    retrain,
    search_setup,
    standardise,
)
from .registry import Method, register_method

#: Search steps (mask-value updates) and distillation steps after slicing.
SEARCH_STEPS = 24
RETRAIN_STEPS = 40
SEARCH_LR = 0.05
RETRAIN_LR = 1e-4


def _search(ctx, blocks):
    from ..distill import distill_loss, features

    vlm, cfg, progress = ctx.vlm, ctx.cfg, ctx.progress or NULL
    units, target, batches, teacher = search_setup(ctx)
    model = vlm.model
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    gates = GroupGates(blocks, units)
    opt = torch.optim.Adam(gates.parameters(), lr=SEARCH_LR)
    imp = {("h", k): torch.zeros_like(v) for k, v in gates.heads.items()}
    imp.update({("f", k): torch.zeros_like(v) for k, v in gates.neurons.items()})
    modality = {b.prefix: b.modality for b in blocks}
    T = SEARCH_STEPS
    ratios = []
    try:
        with gates, progress.task("upop search", total=T) as task:
            for t in range(1, T + 1):
                enc = batches[(t - 1) % len(batches)]
                with torch.no_grad():
                    t_out = features(teacher, enc)
                loss = distill_loss(features(vlm, enc), t_out)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for k, v in gates.heads.items():
                    imp[("h", k)] += v.grad.detach().abs()
                for k, v in gates.neurons.items():
                    imp[("f", k)] += v.grad.detach().abs()
                opt.step()
                p_t = target * (1 - math.cos(math.pi * t / T)) / 2
                ratios.append(round(p_t, 4))
                h_s, f_s = _standardised(imp, modality)
                with torch.no_grad():
                    for sc, vals in ((h_s, gates.heads), (f_s, gates.neurons)):
                        if not sc:
                            continue
                        pr = global_prune_sets(sc, p_t, {})
                        for k, v in vals.items():
                            v.clamp_(0.0, 1.0)
                            v[pr[k]] = v[pr[k]].clamp(max=1.0 - t / T)
                task.advance()
                task.update(description=f"upop search (loss {loss.item():.4f})")
    finally:
        for p, r in req.items():
            p.requires_grad_(r)
    head_s, neur_s = _standardised(imp, modality)
    counts = counts_from_scores(blocks, head_s, neur_s, target, units, cfg.round_to)
    fill_untouched(blocks, head_s, neur_s)
    details = {"search_steps": T, "ratio_schedule": "cosine", "ratios": ratios,
               "standardised": "per modality and unit type", "ranking": "global"}
    return head_s, neur_s, counts, details


def _standardised(imp, modality):
    h = standardise({k: v for (kind, k), v in imp.items() if kind == "h"}, modality)
    f = standardise({k: v for (kind, k), v in imp.items() if kind == "f"}, modality)
    return h, f


def _retrain(ctx, dense) -> dict:
    return retrain(ctx, dense, steps=RETRAIN_STEPS, lr=RETRAIN_LR)


register_method(Method(
    name="upop", kind="search+retrain", allocation="global", search=_search, retrain=_retrain,
    structured_allocation="upop-global", patterns=("structured",),
    needs=("calibration", "image_text", "training"),
    description="UPop: unified progressive search of heads / neurons across modalities by "
                "standardised gradient importance, then slicing and distillation retraining"))
