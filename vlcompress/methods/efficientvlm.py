"""EfficientVLM: modal-adaptive structured pruning with L0 gates (Wang, Wang, Zhou, Li, Wang,
Wang, Zhang, Zhang, "EfficientVLM: Fast and Accurate Vision-Language Models via Knowledge
Distillation and Modal-adaptive Pruning", Findings of ACL 2023). Reference code:
swaggy-TN/EfficientVLM, ``efficient_models/xvlm_l0_module.py`` (``XVLML0Module``:
``reset_loga``, ``constrain_parameters``, ``cdf_qz``, ``_sample_z``,
``lagrangian_regularization``, ``_deterministic_z``). Our own code, following the reference:

- a **hard-concrete gate** (Louizos et al.) on every attention head and every MLP neuron of
  every encoder layer of every modality, parameter ``log_alpha``: heads start near open
  (``N(head_init=10, 0.01)``), neurons at ``log(1 - d) - log(d)`` with ``droprate_init d = 0.5``,
  i.e. 0 (``reset_loga``); after every step ``log_alpha`` is clamped to
  ``[log 1e-2, log 1e2]`` (``constrain_parameters``). Training samples
  ``z = hardtanh(sigmoid((log u - log(1 - u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)``,
  ``beta = 2/3``, ``gamma = -0.1``, ``zeta = 1.1``;
- one **global expected-sparsity Lagrangian**: the expected fraction of pruned weights (each
  gate's ``P(z != 0) = 1 - cdf_qz(0)`` times its group's weight count) against a target ramped
  linearly over ``warmup_fraction`` of the steps (``lagrangian_warmup``),
  ``lambda1 * (s_hat - s) + lambda2 * (s_hat - s)^2``, multipliers learned by gradient
  *ascent*. No budget per modality or per unit type: the Lagrangian decides the head / neuron
  and vision / text split;
- trained **jointly with distillation** from the dense model, gates and weights together;
- at the end **deterministic gates per layer** (``_deterministic_z``): in each layer and unit
  type, ``round(expected zeros)`` units (``size - sum P(z != 0)``) with the lowest soft mask
  ``sigmoid(log_alpha / beta * 0.8)`` are removed and the survivors' gates are set to 1 (no
  gate value is folded into the weights); then the model is **sliced** and retrained with
  distillation.

**The asked sparsity, kept (a deviation, measured).** In the reference the sliced model has
whatever expected sparsity the Lagrangian reached: the multipliers start at 0 and are
learned by ascent, so the expected sparsity swings around the ramped target (overshoots,
then undershoots) and settles only after many steps (the reference: thousands, its warm-up
a fraction of several epochs). Measured on the 4-layer BLIP captioner of
``benchmarks/blip_caption_structured.py --model tiny`` at an asked 0.5 (8 pairs,
``round_to=1``; sliced sparsity with the reference's deterministic gates):

============================  ======  ======  ======  ======
train_steps                      5      20      60     200
============================  ======  ======  ======  ======
expected sparsity, defaults    0.126   0.193   0.693   0.502
sliced, defaults               0.125   0.190   0.733   0.534
expected, fast schedule [1]_   0.703   0.259   0.478   0.500
sliced, fast schedule          0.659   0.258   0.454   0.414
============================  ======  ======  ======  ======

.. [1] ``gate_lr=2, lambda_lr=5, warmup_fraction=0.25``, the benchmarks' schedule.

Even a settled Lagrangian (200 steps, expected 0.500) slices 0.414: ``round(expected
zeros)`` per layer keeps all 4 heads of a layer whose heads are each 89% open (0.44 expected
zeros), and the reference may close every head of a layer (CoFi removes the whole attention)
where we keep at least one. So, after the training, (1) every ``log_alpha`` is shifted by one
constant ``c`` (bisection, ``budget_offset``) so the expected sparsity is exactly the asked
one (``c`` is ~0 where the Lagrangian settled; the order of the gates, hence which units the
deterministic gates remove, is unchanged), (2) the reference's per-layer deterministic gates
are taken at ``log_alpha + c``, and (3) the rounded widths are fitted to the budget
(:func:`vlcompress.methods._search.fit_counts`: only when off by more than the tolerance,
one rounding step at a time on the layer rounded furthest from the gates' count). The sliced
model then has the asked sparsity within ``_search.BUDGET_TOLERANCE`` (0.005; on a model so
small that one rounding step weighs more, half that step), or the run is refused in one
line (a sparsity the floors of one head and ``round_to`` neurons per layer cannot reach is
refused before any training). ``details.efficientvlm`` records ``expected_sparsity_final``
(what the Lagrangian reached), ``budget_offset``, ``deterministic_gates_sparsity`` and
``budget_fit``.

Other deviations, on purpose: the loss is :func:`vlcompress.distill.distill_loss` (the reference
distils X-VLM with its own task losses); the multipliers use AdamW on the negated gradient
(the reference: an optimiser with a negative learning rate, the same update); kept widths are
rounded as every structured method (``round_to``; 1 keeps the gates' counts); steps and
learning rates are sized for a CPU (options below).
"""

from __future__ import annotations

import math

import torch

from ..progress import NULL
from ._search import (
    RETRAIN_OPTIONS,
    GroupGates,
    checkpointed,
    counts_sparsity,
    fill_untouched,
    fit_counts,
    kept_per_modality,
    retrain_with_options,
    round_counts,
    search_setup,
)
from .registry import Method, Option, register_method

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
MAGICAL_NUMBER = 0.8  # the reference's soft-mask sharpening for the deterministic gates
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))

OPTIONS = (
    Option("train_steps", int, 60, "gate + weight training steps", minimum=1),
    Option("gate_lr", float, 0.1, "AdamW learning rate of the gates (log_alpha)", minimum=0.0),
    Option("weight_lr", float, 1e-4, "AdamW learning rate of the weights while gating",
           minimum=0.0),
    Option("lambda_lr", float, 0.5, "learning rate of the Lagrange multipliers (ascent)",
           minimum=0.0),
    Option("warmup_fraction", float, 0.5, "fraction of the steps over which the target ramps",
           minimum=0.0),
    Option("droprate_init", float, 0.5, "initial drop rate of the neuron gates", minimum=1e-6),
    Option("head_init", float, 10.0, "initial log_alpha of the head gates (near open)"),
    *RETRAIN_OPTIONS,
)


def p_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(z != 0) = 1 - cdf_qz(0, log_alpha)`` of each gate."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """The reference's ``_deterministic_z`` for one layer's gates: the ``round(expected zeros)``
    gates with the lowest ``sigmoid(log_alpha / beta * 0.8)`` are 0, all others 1."""
    size = log_alpha.numel()
    zeros = round(size - float(p_open(log_alpha).sum()))
    out = torch.ones_like(log_alpha)
    if zeros > 0:
        soft = torch.sigmoid(log_alpha / BETA * MAGICAL_NUMBER)
        out[torch.topk(soft, k=min(zeros, size), largest=False).indices] = 0.0
    return out


class HardConcreteGates(GroupGates):
    """Hard-concrete gates on heads and neurons; the parameters are ``log_alpha``."""

    def __init__(self, blocks, units, *, head_init: float, neuron_init: float):
        super().__init__(blocks, units, init=0.0)
        with torch.no_grad():
            for v in self.heads.values():
                v.normal_(head_init, 1e-2)
            for v in self.neurons.values():
                v.normal_(neuron_init, 1e-2)
        self.sample = True

    def _gate(self, log_alpha: torch.Tensor) -> torch.Tensor:
        if self.sample:
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
            return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        return deterministic_gate(log_alpha)

    def head_values(self, prefix):
        return self._gate(self.heads[prefix])

    def neuron_values(self, prefix):
        return self._gate(self.neurons[prefix])

    @torch.no_grad()
    def constrain(self) -> None:
        for v in self.parameters():
            v.clamp_(*LOG_ALPHA_RANGE)


def expected_sparsity(gates: HardConcreteGates, blocks, offset: float = 0.0) -> torch.Tensor:
    """1 - expected kept weights / prunable weights (heads and neurons in ``gates``), with
    every ``log_alpha`` shifted by ``offset``."""
    from ..sparsity.structured import _group_sizes

    kept = torch.zeros(())
    total = 0.0
    for b in blocks:
        hsz, fsz = _group_sizes(b)
        if b.prefix in gates.heads:
            kept = kept + hsz * p_open(gates.heads[b.prefix] + offset).sum()
            total += hsz * b.num_heads
        if b.prefix in gates.neurons:
            kept = kept + fsz * p_open(gates.neurons[b.prefix] + offset).sum()
            total += fsz * b.mlp_width
    return 1.0 - kept / total


@torch.no_grad()
def budget_offset(gates: HardConcreteGates, blocks, target: float, iters: int = 80) -> float:
    """The one shift ``c`` of every ``log_alpha`` at which the expected sparsity is
    ``target`` (bisection: the expected sparsity falls monotonically in ``c``)."""
    lo, hi = -60.0, 60.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(expected_sparsity(gates, blocks, mid)) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _search(ctx, blocks):
    from ..distill import distill_loss, features

    vlm, cfg, progress = ctx.vlm, ctx.cfg, ctx.progress or NULL
    o = cfg.method_options
    units, target, batches, teacher = search_setup(ctx)
    torch.manual_seed(cfg.seed)
    d = float(o["droprate_init"])
    gates = HardConcreteGates(blocks, units, head_init=o["head_init"],
                              neuron_init=math.log(1 - d) - math.log(d) if d < 1 else -10.0)
    lam = torch.zeros(2, requires_grad=True)
    opt = torch.optim.AdamW([{"params": gates.parameters(), "lr": o["gate_lr"], "weight_decay": 0.0},
                             {"params": [p for p in vlm.model.parameters() if p.requires_grad],
                              "lr": o["weight_lr"], "weight_decay": 0.0}])
    opt_lam = torch.optim.AdamW([lam], lr=o["lambda_lr"], weight_decay=0.0)
    T = int(o["train_steps"])
    warm = max(1, round(T * float(o["warmup_fraction"])))
    trace = []
    model = vlm.model
    model.train()
    try:
        with checkpointed(model) as ckpt, gates, progress.task("efficientvlm (L0 gates)", total=T) as task:
            for t in range(1, T + 1):
                enc = batches[(t - 1) % len(batches)]
                with torch.no_grad():
                    t_out = features(teacher, enc)
                dist = distill_loss(features(vlm, enc), t_out)
                s_hat = expected_sparsity(gates, blocks)
                s_t = target * min(1.0, t / warm)
                gap = s_hat - s_t
                loss = dist + lam[0] * gap + lam[1] * gap * gap
                opt.zero_grad(set_to_none=True)
                opt_lam.zero_grad(set_to_none=True)
                loss.backward()
                lam.grad.neg_()  # gradient ascent on the multipliers
                opt.step()
                opt_lam.step()
                gates.constrain()
                trace.append({"step": t, "expected_sparsity": round(s_hat.item(), 4),
                              "target": round(s_t, 4), "lambda1": round(lam[0].item(), 4),
                              "lambda2": round(lam[1].item(), 4)})
                task.advance()
                task.update(description=f"efficientvlm (loss {dist.item():.3f}, "
                                        f"E[s] {s_hat.item():.2f})")
        with torch.no_grad():
            s_final = float(expected_sparsity(gates, blocks))
            offset = budget_offset(gates, blocks, target)
            head_s = {k: v.detach() + offset for k, v in gates.heads.items()}
            neur_s = {k: v.detach() + offset for k, v in gates.neurons.items()}
            raw_h = {k: float(deterministic_gate(v).sum()) for k, v in head_s.items()}
            raw_f = {k: float(deterministic_gate(v).sum()) for k, v in neur_s.items()}
    finally:
        model.eval()  # adapters keep HF models in eval mode
        opt.zero_grad(set_to_none=True)  # no gradient outlives the search
    gate_sparsity = counts_sparsity(blocks, round_counts(blocks, raw_h, raw_f, units, 1))
    counts, fit = fit_counts(blocks, raw_h, raw_f, units, cfg.round_to, target, "efficientvlm")
    # within a layer the slicing keeps the highest soft masks, as the deterministic gates
    head_s = {k: torch.sigmoid(v / BETA * MAGICAL_NUMBER) for k, v in head_s.items()}
    neur_s = {k: torch.sigmoid(v / BETA * MAGICAL_NUMBER) for k, v in neur_s.items()}
    fill_untouched(blocks, head_s, neur_s)
    searched = {b.prefix: (int(raw_h.get(b.prefix, b.num_heads)),
                           int(raw_f.get(b.prefix, b.mlp_width))) for b in blocks}
    details = {"train_steps": T, "gate_lr": o["gate_lr"], "weight_lr": o["weight_lr"],
               "activation_checkpointing": ckpt,
               "lambda_lr": o["lambda_lr"], "warmup_steps": warm,
               "expected_sparsity_final": round(s_final, 4), "target": target,
               "budget_offset": round(offset, 4),
               "deterministic_gates_sparsity": round(gate_sparsity, 4), "budget_fit": fit,
               "final": trace[-1] if trace else None, "trace": trace[:: max(1, T // 10)],
               "kept_by_gates": kept_per_modality(blocks, searched),
               "kept_after_rounding": kept_per_modality(blocks, counts)}
    return head_s, neur_s, counts, details


register_method(Method(
    name="efficientvlm", kind="search+retrain", allocation="global", search=_search,
    retrain=retrain_with_options, structured_allocation="l0-global", patterns=("structured",),
    needs=("calibration", "image_text", "training"), options=OPTIONS,
    description="EfficientVLM: hard-concrete (L0) gates on heads / neurons under one global "
                "expected-sparsity Lagrangian, trained with distillation, per-layer "
                "deterministic gates, then slicing"))
