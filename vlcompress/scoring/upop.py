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

from ..errors import ConfigError
from . import register_scorer

#: Search steps (mask-value updates) and distillation steps after slicing.
SEARCH_STEPS = 24
RETRAIN_STEPS = 40
SEARCH_LR = 0.05
RETRAIN_LR = 1e-4
#: Pairs per search step.
SEARCH_BATCH = 32


# --------------------------------------------------------------------------------------------
# mask values on heads and neurons (shared with efficientvlm)
# --------------------------------------------------------------------------------------------
class GroupGates:
    """One value per head and per neuron of every block, applied through forward pre-hooks:
    a head's value scales its ``head_dim`` inputs of ``out_proj``, a neuron's its fc2 input.
    ``values()`` (overridable) turns the parameters into the multipliers."""

    def __init__(self, blocks, units, init: float = 1.0):
        self.blocks = list(blocks)
        self.units = tuple(units)
        self.heads = {b.prefix: torch.nn.Parameter(torch.full((b.num_heads,), float(init)))
                      for b in self.blocks} if "heads" in self.units else {}
        self.neurons = {b.prefix: torch.nn.Parameter(torch.full((b.mlp_width,), float(init)))
                        for b in self.blocks} if "neurons" in self.units else {}
        self._handles = []
        self.enabled = True

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.heads.values()) + list(self.neurons.values())

    def head_values(self, prefix: str) -> torch.Tensor:
        return self.heads[prefix]

    def neuron_values(self, prefix: str) -> torch.Tensor:
        return self.neurons[prefix]

    def __enter__(self):
        for b in self.blocks:
            if b.prefix in self.heads:
                hd = b.head_dim

                def pre_o(mod, args, p=b.prefix, hd=hd):
                    if not self.enabled:
                        return None
                    g = self.head_values(p).repeat_interleave(hd)
                    return (args[0] * g.to(args[0].dtype),) + tuple(args[1:])
                self._handles.append(b.lin("attn.o").register_forward_pre_hook(pre_o))
            if b.prefix in self.neurons:
                def pre_f(mod, args, p=b.prefix):
                    if not self.enabled:
                        return None
                    return (args[0] * self.neuron_values(p).to(args[0].dtype),) + tuple(args[1:])
                self._handles.append(b.lin("mlp.out").register_forward_pre_hook(pre_f))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def fold(self, values: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]) -> None:
        """Multiply the given per-group values into the weights (out_proj / fc2 columns)."""
        for b in self.blocks:
            hv, fv = values.get(b.prefix, (None, None))
            if hv is not None:
                w = b.lin("attn.o").weight
                w.mul_(hv.repeat_interleave(b.head_dim).to(w)[None, :])
            if fv is not None:
                w = b.lin("mlp.out").weight
                w.mul_(fv.to(w)[None, :])


def search_batches(vlm, data, batch_size: int = SEARCH_BATCH) -> list[dict]:
    """The calibration pairs, encoded, in batches of at least 2 pairs."""
    from ..data.pairs import PairBatch

    images, captions = [], []
    for b in data.batches():
        images += list(b.images)
        captions += list(b.captions)
    if len(images) < 2:
        raise ConfigError("training-based structured pruning needs at least 2 calibration pairs")
    out = []
    for i in range(0, len(images), batch_size):
        im, cap = images[i:i + batch_size], captions[i:i + batch_size]
        if len(im) >= 2:
            with torch.no_grad():
                out.append(vlm.encode(PairBatch(im, cap)))
    return out


def search_setup(vlm, data, cfg, method: str):
    """Shared preamble of the training-based searches: ``(units, target, batches, teacher)``."""
    from ..recover import dense_copy

    check_family(vlm, method)
    return tuple(cfg.units), float(cfg.sparsity), search_batches(vlm, data), dense_copy(vlm)


def fill_untouched(blocks, head_s: dict, neur_s: dict) -> None:
    """Untouched unit types keep every group: zero scores, only used for ordering."""
    for b in blocks:
        head_s.setdefault(b.prefix, torch.zeros(b.num_heads))
        neur_s.setdefault(b.prefix, torch.zeros(b.mlp_width))


def check_family(vlm, method: str) -> None:
    if len(getattr(vlm, "towers", ())) < 2:
        raise ConfigError(f"method {method!r} distils image-text models with two towers; "
                          f"{vlm.name} has {', '.join(vlm.towers)}")


def standardise(scores: dict[str, torch.Tensor], modality: dict[str, str]) -> dict[str, torch.Tensor]:
    """z-score the scores of each modality (pooled over its layers)."""
    out = {}
    for m in set(modality.values()):
        keys = [k for k in scores if modality[k] == m]
        if not keys:
            continue
        allv = torch.cat([scores[k].double() for k in keys])
        mu, sd = allv.mean(), allv.std(unbiased=False)
        for k in keys:
            out[k] = ((scores[k].double() - mu) / (sd if sd > 0 else 1.0)).float()
    return out


def global_prune_sets(scores: dict[str, torch.Tensor], ratio: float, protect: dict[str, int]
                      ) -> dict[str, torch.Tensor]:
    """Bool ``pruned`` per key: the lowest ``ratio`` of all scores pooled together; the top
    ``protect[key]`` of each key are never pruned."""
    keys = list(scores)
    adj = []
    for k in keys:
        s = scores[k].double().clone()
        n = min(int(protect.get(k, 0)), s.numel())
        if n:
            s[torch.argsort(s, descending=True, stable=True)[:n]] = float("inf")
        adj.append(s)
    flat = torch.cat(adj)
    k = int(math.floor(ratio * flat.numel()))
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        pruned[torch.argsort(flat, stable=True)[:k]] = True
    out, i = {}, 0
    for key, s in zip(keys, adj, strict=True):
        out[key] = pruned[i:i + s.numel()]
        i += s.numel()
    return out


def counts_from_scores(blocks, head_s, neur_s, target: float, units, round_to: int
                       ) -> dict[str, tuple[int, int]]:
    """Keep counts from one global ranking per unit type (heads, neurons) over all blocks,
    rounded as every structured method (:mod:`vlcompress.sparsity.structured`)."""
    from ..sparsity.structured import head_step, round_heads, round_neurons

    raw_h = {b.prefix: float(b.num_heads) for b in blocks}
    raw_f = {b.prefix: float(b.mlp_width) for b in blocks}
    if "heads" in units and head_s:
        protect = {b.prefix: min(b.num_heads, head_step(b.head_dim, round_to)) for b in blocks}
        pr = global_prune_sets(head_s, target, protect)
        raw_h = {p: float((~m).sum()) for p, m in pr.items()}
    if "neurons" in units and neur_s:
        protect = {b.prefix: min(b.mlp_width, round_to) for b in blocks}
        pr = global_prune_sets(neur_s, target, protect)
        raw_f = {p: float((~m).sum()) for p, m in pr.items()}
    out = {}
    for b in blocks:
        h = round_heads(raw_h[b.prefix], b.num_heads, b.head_dim, round_to) \
            if "heads" in units else b.num_heads
        f = round_neurons(raw_f[b.prefix], b.mlp_width, round_to) if "neurons" in units \
            else b.mlp_width
        out[b.prefix] = (max(1, h), f)
    return out


def retrain(vlm, dense, cfg, *, steps: int, lr: float, progress) -> dict:
    """Distillation retraining of the sliced model (pattern kept), as :mod:`vlcompress.recover`."""
    from ..recover import DEFAULTS, _train_data, train_student

    if steps <= 0:
        return {"steps": 0}
    data = _train_data("shapes", DEFAULTS["n"], DEFAULTS["batch_size"], cfg.seed)
    _, losses = train_student(vlm, dense, data, steps=steps, lr=lr, seed=cfg.seed,
                              progress=progress)
    return {"steps": steps, "lr": lr, "loss_first": losses[0], "loss_last": losses[-1]}


# --------------------------------------------------------------------------------------------
# the scorer
# --------------------------------------------------------------------------------------------
@register_scorer("upop", needs_calibration=True, allocation="global",
                 description="UPop: unified progressive search of heads / neurons across "
                             "modalities by standardised gradient importance, then slicing and "
                             "distillation retraining (structured only)")
def upop(layer, stats=None, *, seed: int = 0) -> torch.Tensor:
    """UPop searches whole heads and neurons: it only runs with pattern ``structured``."""
    raise ConfigError("method 'upop' removes whole heads and neurons; use --pattern structured")


def _search(vlm, blocks, data, cfg, *, progress):
    from ..recover import _outputs, distill_loss

    units, target, batches, teacher = search_setup(vlm, data, cfg, "upop")
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
                    t_out = _outputs(teacher, enc)
                loss = distill_loss(_outputs(vlm, enc), t_out)
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


def _after_slice(vlm, dense, data, cfg, *, progress) -> dict:
    return retrain(vlm, dense, cfg, steps=RETRAIN_STEPS, lr=RETRAIN_LR, progress=progress)


upop.structured_search = _search
upop.structured_only = True
upop.after_slice = _after_slice
upop.structured_allocation = "upop-global"
