"""What the training-based structured searches (UPop, EfficientVLM) share: mask values on
heads and neurons applied through forward hooks, the encoded search batches, global ranking
into keep counts, and distillation retraining after slicing on the training data prune() was
given."""

from __future__ import annotations

import torch

from ..distill import DEFAULTS as DISTILL_DEFAULTS
from ..distill import SCHEDULES
from ..errors import ConfigError
from .registry import Option

#: Pairs per search step.
SEARCH_BATCH = 32


# --------------------------------------------------------------------------------------------
# mask values on heads and neurons (shared with efficientvlm)
# --------------------------------------------------------------------------------------------
class GroupGates:
    """One value per head and per neuron of every block, applied through forward pre-hooks:
    a head's value scales its ``head_dim`` inputs of ``out_proj``, a neuron's its fc2 input
    (the out-projection's and the fc2's input, whatever the family calls them: BLIP's
    ``projection``, ``attention.output.dense``, ``output.dense``; a block without an MLP, a
    cross-attention, has head values only). ``head_values`` / ``neuron_values``
    (overridable) turn the parameters into the multipliers."""

    def __init__(self, blocks, units, init: float = 1.0):
        self.blocks = list(blocks)
        self.units = tuple(units)
        self.heads = {b.prefix: torch.nn.Parameter(torch.full((b.num_heads,), float(init)))
                      for b in self.blocks} if "heads" in self.units else {}
        self.neurons = {b.prefix: torch.nn.Parameter(torch.full((b.mlp_width,), float(init)))
                        for b in self.blocks if b.has_mlp} if "neurons" in self.units else {}
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


def search_setup(ctx):
    """Shared preamble of the training-based searches: ``(units, target, batches, teacher)``."""
    from ..distill import dense_copy

    vlm, cfg = ctx.vlm, ctx.cfg
    return tuple(cfg.units), float(cfg.sparsity), search_batches(vlm, ctx.data), dense_copy(vlm)


def fill_untouched(blocks, head_s: dict, neur_s: dict) -> None:
    """Untouched unit types keep every group: zero scores, only used for ordering."""
    for b in blocks:
        head_s.setdefault(b.prefix, torch.zeros(b.num_heads))
        neur_s.setdefault(b.prefix, torch.zeros(b.mlp_width))


def zscore_pooled(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """z-score every tensor of ``values`` with one mean and one standard deviation pooled over
    all of them (UPop: one pool per unit type over both modalities; the sample std, as
    ``torch.std``)."""
    if not values:
        return {}
    allv = torch.cat([v.double().flatten() for v in values.values()])
    mu = allv.mean()
    sd = allv.std() if allv.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    sd = sd if float(sd) > 0 else torch.tensor(1.0, dtype=torch.float64)
    return {k: ((v.double() - mu) / sd).float() for k, v in values.items()}


def round_counts(blocks, raw_h: dict[str, float], raw_f: dict[str, float], units, round_to: int
                 ) -> dict[str, tuple[int, int]]:
    """Per-block ``(heads, neurons)`` kept, each raw count rounded as every structured method
    (:mod:`vlcompress.sparsity.structured`: multiples of ``round_to``; ``round_to=1`` keeps the
    raw counts), at least one head."""
    from ..sparsity.structured import round_heads, round_neurons

    out = {}
    for b in blocks:
        h = round_heads(raw_h.get(b.prefix, b.num_heads), b.num_heads, b.head_dim, round_to) \
            if "heads" in units else b.num_heads
        f = round_neurons(raw_f.get(b.prefix, b.mlp_width), b.mlp_width, round_to) \
            if "neurons" in units else b.mlp_width
        out[b.prefix] = (max(1, h), f)
    return out


def kept_per_modality(blocks, counts) -> dict[str, dict[str, float]]:
    """Fraction of heads and of neurons kept per modality (what the search decided)."""
    acc: dict[str, list[float]] = {}
    for b in blocks:
        h, f = counts[b.prefix]
        a = acc.setdefault(b.modality, [0, 0, 0, 0])
        a[0] += h
        a[1] += b.num_heads
        a[2] += f
        a[3] += b.mlp_width
    # a modality without MLPs (BLIP's cross-attention, ``fusion``) has no neurons: None
    return {m: {"heads": round(a[0] / a[1], 4), "neurons": round(a[2] / a[3], 4) if a[3] else None}
            for m, a in acc.items()}


#: the retraining options both searches expose (``--method-option retrain_steps=...``)
RETRAIN_OPTIONS = (
    Option("retrain_steps", int, 600, "distillation steps after slicing", minimum=0),
    Option("retrain_lr", float, 2e-4, "AdamW learning rate of the retraining", minimum=0.0),
    Option("retrain_schedule", str, DISTILL_DEFAULTS["schedule"], "learning-rate schedule of "
           "the retraining (as vlcompress recover --schedule)", choices=SCHEDULES),
)


def retrain(ctx, dense, *, steps: int, lr: float, schedule: str = DISTILL_DEFAULTS["schedule"]
            ) -> dict:
    """Distillation retraining of the sliced model (pattern kept) on ``ctx.train``, the
    training data prune() was given (the user's; its source is recorded)."""
    from ..distill import train_student

    if steps <= 0:
        return {"steps": 0}
    data = ctx.train
    if data is None:
        raise ConfigError("retraining after slicing needs training pairs; pass train= to prune()")
    _, losses = train_student(ctx.vlm, dense, data, steps=steps, lr=lr, seed=ctx.cfg.seed,
                              progress=ctx.progress, schedule=schedule)
    return {"steps": steps, "lr": lr, "schedule": schedule,
            "data": f"{getattr(data, 'source', '') or 'pairs'} (n={len(data)})",
            "loss_first": losses[0], "loss_last": losses[-1]}


def retrain_with_options(ctx, dense) -> dict:
    """:func:`retrain` with the method's :data:`RETRAIN_OPTIONS`."""
    o = ctx.cfg.method_options
    return retrain(ctx, dense, steps=o["retrain_steps"], lr=o["retrain_lr"],
                   schedule=o["retrain_schedule"])
