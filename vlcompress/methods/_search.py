"""What the training-based structured searches (UPop, EfficientVLM) share: mask values on
heads and neurons applied through forward hooks, the encoded search batches, global ranking
into keep counts, and distillation retraining after slicing on the training data prune() was
given."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..distill import DEFAULTS as DISTILL_DEFAULTS
from ..distill import SCHEDULES
from ..errors import ConfigError, PatternError
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


@contextmanager
def checkpointed(model):
    """Activation checkpointing for the duration of a search, where the HF model supports
    it (``activation_checkpointing_enable``, non-reentrant: the RNG state is restored for the
    recomputation, so EfficientVLM's sampled gates are the same twice): each layer's
    activations are recomputed in the backward pass instead of kept, so a search step holds
    about one layer's activations, not the whole stack's (at 384 px on BLIP-base, 2 pairs,
    the difference is about 2 GB; it grows with the pairs per step). Yields whether it is on.
    The gradients are the same; a step costs about one more forward."""
    new = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5.x's name
    on = bool(getattr(model, "supports_gradient_checkpointing", False)) and \
        (new or hasattr(model, "gradient_checkpointing_enable"))
    if on:
        kw = {"use_reentrant": False}
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    try:
        yield on
    finally:
        if on:
            (model.activation_checkpointing_disable if new
             else model.gradient_checkpointing_disable)()


def search_setup(ctx):
    """Shared preamble of the training-based searches: ``(units, target, batches, teacher)``.
    The teacher is the dense copy prune() keeps for the retraining (``ctx.dense``), not a
    second one: on BLIP-base shapes each copy is 0.9 GB."""
    from ..distill import dense_copy

    vlm, cfg = ctx.vlm, ctx.cfg
    teacher = ctx.dense if ctx.dense is not None else dense_copy(vlm)
    return tuple(cfg.units), float(cfg.sparsity), search_batches(vlm, ctx.data), teacher


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


# --------------------------------------------------------------------------------------------
# the asked sparsity, kept: budget-fitted rounding, reachability, the final check
# --------------------------------------------------------------------------------------------
#: How far the sliced model's sparsity (of the weights of the searched blocks, what
#: ``PruneResult.achieved`` measures) may sit from the asked one: 0.005 absolute, or half of the
#: finest rounding step's share on a model so small that one step weighs more.
BUDGET_TOLERANCE = 0.005


def _steps(b, units, round_to: int) -> tuple[int, int]:
    """The keep-count steps of ``b``'s heads and neurons (as :func:`round_counts` rounds)."""
    from ..sparsity.structured import head_step

    return max(1, head_step(b.head_dim, round_to)), max(1, int(round_to))


def _floors(b, units, round_to: int) -> tuple[int, int]:
    """The fewest heads / neurons :func:`round_counts` can keep in ``b`` (untouched unit
    types keep all)."""
    hs, fs = _steps(b, units, round_to)
    h = (hs if hs <= b.num_heads else b.num_heads) if "heads" in units else b.num_heads
    f = (fs if fs <= b.mlp_width else b.mlp_width) if "neurons" in units else b.mlp_width
    return h, f


def budget(blocks, units, round_to: int) -> dict:
    """The weight arithmetic of a structured budget over ``blocks``: ``total`` weights, the
    most that can be pruned (``max_sparsity``: every layer at its floor, one head and
    ``round_to`` neurons) and the ``tolerance`` the fitted counts are held to."""
    from ..sparsity.structured import _group_sizes

    total = floor_kept = 0.0
    finest = None
    for b in blocks:
        hsz, fsz = _group_sizes(b)
        total += hsz * b.num_heads + fsz * b.mlp_width
        h, f = _floors(b, units, round_to)
        floor_kept += hsz * h + fsz * f
        hs, fs = _steps(b, units, round_to)
        for cost, on in ((hsz * hs, "heads" in units), (fsz * fs, "neurons" in units and b.has_mlp)):
            if on and cost > 0:
                finest = cost if finest is None else min(finest, cost)
    total = max(total, 1.0)
    tol = max(BUDGET_TOLERANCE, 0.5 * (finest or 0.0) / total)
    return {"total": total, "max_sparsity": 1.0 - floor_kept / total, "tolerance": tol}


def counts_sparsity(blocks, counts) -> float:
    """The fraction of the blocks' weights that keeping ``counts`` (heads, neurons) removes."""
    from ..sparsity.structured import _group_sizes

    total = kept = 0.0
    for b in blocks:
        hsz, fsz = _group_sizes(b)
        h, f = counts[b.prefix]
        total += hsz * b.num_heads + fsz * b.mlp_width
        kept += hsz * h + fsz * f
    return 1.0 - kept / max(total, 1.0)


def check_reachable(method: str, blocks, units, round_to: int, target: float) -> dict:
    """Refuse, before any search, a sparsity the floors make unreachable (one line)."""
    bud = budget(blocks, units, round_to)
    if target > bud["max_sparsity"] + bud["tolerance"]:
        raise PatternError(
            f"{method} cannot reach structured sparsity {target:g} on these blocks with --units "
            f"{','.join(units)} and --round-to {round_to}: every layer keeps at least one head "
            f"(its kept width a multiple of {round_to}) and {round_to} neurons, so at most "
            f"{bud['max_sparsity']:.4f} of their weights can go; allowed: --sparsity <= "
            f"{bud['max_sparsity']:.4f}, or a smaller --round-to")
    return bud


def _next(count: int, total: int, step: int, down: bool) -> int | None:
    """The allowed keep count next to ``count`` (multiples of ``step`` in [step, total] and
    ``total``), below it (``down``) or above it; None past the ends."""
    if step > total:
        return None
    top = total - total % step
    if down:
        if count > top:
            return top if top >= step else None
        return count - step if count - step >= step else None
    if count >= total:
        return None
    return count + step if count + step <= top else total


def fit_counts(blocks, raw_h: dict[str, float], raw_f: dict[str, float], units, round_to: int,
               target: float, method: str) -> tuple[dict[str, tuple[int, int]], dict]:
    """:func:`round_counts`, then, only where the blocks' sparsity is off the ``target`` by
    more than :func:`budget`'s tolerance, moved step by step until it is within it (the
    search's own counts can miss: per-layer rounding of EfficientVLM's deterministic gates,
    UPop's per-layer floor; so can rounding every layer to its nearest allowed width).

    Each move takes one rounding step off (or back onto) the layer and unit type whose
    rounded count sits furthest above (below) the search's raw count, relative to its step,
    so the search's decision moves least; a move that brings the sparsity no nearer the
    target ends the fit. A result still outside the tolerance raises :class:`PatternError`:
    never a silently smaller prune. Returns ``(counts, {"sparsity", "target", "tolerance",
    "moves", "nearest_rounding_sparsity"})``."""
    from ..sparsity.structured import _group_sizes

    counts = round_counts(blocks, raw_h, raw_f, units, round_to)
    bud = budget(blocks, units, round_to)
    total, tol = bud["total"], bud["tolerance"]
    sizes = {b.prefix: _group_sizes(b) for b in blocks}
    raw = {b.prefix: (float(raw_h.get(b.prefix, b.num_heads)),
                      float(raw_f.get(b.prefix, b.mlp_width))) for b in blocks}
    work = {k: list(v) for k, v in counts.items()}
    first = counts_sparsity(blocks, counts)
    moves = 0
    for _ in range(sum(b.num_heads + b.mlp_width for b in blocks)):  # each move nears the target
        s = counts_sparsity(blocks, work)
        gap = s - target  # > 0: too much pruned, keep more
        if abs(gap) <= tol:
            break
        down = gap < 0
        best = None
        for b in blocks:
            hs, fs = _steps(b, units, round_to)
            for i, (on, n, step, cost) in enumerate((
                    ("heads" in units, b.num_heads, hs, sizes[b.prefix][0]),
                    ("neurons" in units and b.has_mlp, b.mlp_width, fs, sizes[b.prefix][1]))):
                if not on or cost <= 0:
                    continue
                cur = work[b.prefix][i]
                nxt = _next(cur, n, step, down)
                if nxt is None or (i == 0 and nxt < 1):
                    continue
                dw = (cur - nxt) * cost / total  # sparsity gained by the move
                if abs(gap + dw) >= abs(gap):
                    continue
                excess = (cur - raw[b.prefix][i]) / step  # rounded up by this many steps
                key = excess if down else -excess
                if best is None or key > best[0]:
                    best = (key, b.prefix, i, nxt)
        if best is None:
            break
        work[best[1]][best[2]] = best[3]
        moves += 1
    out = {k: (int(v[0]), int(v[1])) for k, v in work.items()}
    got = counts_sparsity(blocks, out)
    info = {"sparsity": round(got, 6), "target": target, "tolerance": round(tol, 6),
            "moves": moves, "nearest_rounding_sparsity": round(first, 6)}
    if abs(got - target) > tol:
        raise PatternError(
            f"{method} reached structured sparsity {got:.4f}, not the asked {target:g} (tolerance "
            f"{tol:.4f}), after fitting the rounded widths (--round-to {round_to}); nothing was "
            f"pruned: use --sparsity <= {bud['max_sparsity']:.4f} or a smaller --round-to")
    return out, info


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
