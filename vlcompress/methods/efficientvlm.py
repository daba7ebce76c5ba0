"""EfficientVLM: modal-adaptive structured pruning with L0 gates (Wang, Wang, Zhou, Li, Wang,
Wang, Zhang, Zhang, "EfficientVLM: Fast and Accurate Vision-Language Models via Knowledge
Distillation and Modal-adaptive Pruning", Findings of ACL 2023).

Our own implementation of the paper's recipe, sized for a CPU:

- a **hard-concrete gate** (Louizos et al., L0 regularisation) on every attention head and
  every MLP neuron of every encoder layer of every modality, with a learnable ``log_alpha``;
  gates are sampled in training (``z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta)
  * (zeta - gamma) + gamma, 0, 1)``, beta = 2/3, gamma = -0.1, zeta = 1.1);
- one **global expected-sparsity constraint**: the expected fraction of pruned weights
  (each gate's ``P(z != 0)`` weighted by its group's weight count) must reach the target
  (ramped linearly over the first half of training), enforced by a Lagrangian
  ``lambda1 * (s_hat - s) + lambda2 * (s_hat - s)^2`` whose multipliers are learned by gradient
  *ascent* — no per-modality budget, so the optimiser decides how much each modality loses;
- trained **jointly with distillation** from the dense model (contrastive + embedding +
  logit distillation, :func:`vlcompress.recover.distill_loss`), gates and weights together;
- then the gates are made deterministic, ranked globally (heads in one pool, neurons in
  another, across modalities) to the exact target, the kept gate values are folded into the
  weights, the model is **sliced** with the structured surgery, and briefly retrained with
  distillation (:mod:`vlcompress.recover`).
"""

from __future__ import annotations

import math

import torch

from ..progress import NULL
from ._search import GroupGates, counts_from_scores, fill_untouched, retrain, search_setup
from .registry import Method, register_method

TRAIN_STEPS = 30
RETRAIN_STEPS = 20
GATE_LR = 0.2
WEIGHT_LR = 5e-5
LAMBDA_LR = 1.0
RETRAIN_LR = 1e-4
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
LOG_ALPHA_INIT = 1.0


class HardConcreteGates(GroupGates):
    """Hard-concrete gates on heads and neurons; the parameters are ``log_alpha``."""

    def __init__(self, blocks, units):
        super().__init__(blocks, units, init=LOG_ALPHA_INIT)
        self.sample = True

    def _gate(self, log_alpha: torch.Tensor) -> torch.Tensor:
        if self.sample:
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
        else:
            s = torch.sigmoid(log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def head_values(self, prefix):
        return self._gate(self.heads[prefix])

    def neuron_values(self, prefix):
        return self._gate(self.neurons[prefix])

    @staticmethod
    def p_open(log_alpha: torch.Tensor) -> torch.Tensor:
        """P(z != 0) of each gate."""
        return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def _expected_sparsity(gates: HardConcreteGates, blocks) -> torch.Tensor:
    from ..sparsity.structured import _group_sizes

    kept = 0.0
    total = 0.0
    for b in blocks:
        hsz, fsz = _group_sizes(b)
        if b.prefix in gates.heads:
            kept = kept + hsz * gates.p_open(gates.heads[b.prefix]).sum()
            total += hsz * b.num_heads
        if b.prefix in gates.neurons:
            kept = kept + fsz * gates.p_open(gates.neurons[b.prefix]).sum()
            total += fsz * b.mlp_width
    return 1.0 - kept / total


def _search(ctx, blocks):
    from ..distill import distill_loss, features

    vlm, cfg, progress = ctx.vlm, ctx.cfg, ctx.progress or NULL
    units, target, batches, teacher = search_setup(ctx)
    torch.manual_seed(cfg.seed)
    gates = HardConcreteGates(blocks, units)
    lam = torch.zeros(2, requires_grad=True)
    opt = torch.optim.AdamW([{"params": gates.parameters(), "lr": GATE_LR},
                             {"params": [p for p in vlm.model.parameters() if p.requires_grad],
                              "lr": WEIGHT_LR, "weight_decay": 0.0}])
    opt_lam = torch.optim.SGD([lam], lr=LAMBDA_LR)
    T = TRAIN_STEPS
    trace = []
    model = vlm.model
    model.train()
    try:
        with gates, progress.task("efficientvlm (L0 gates)", total=T) as task:
            for t in range(1, T + 1):
                enc = batches[(t - 1) % len(batches)]
                with torch.no_grad():
                    t_out = features(teacher, enc)
                dist = distill_loss(features(vlm, enc), t_out)
                s_hat = _expected_sparsity(gates, blocks)
                s_t = target * min(1.0, t / max(1, T // 2))
                gap = s_hat - s_t
                lagr = lam[0] * gap + lam[1] * gap * gap
                loss = dist + lagr
                opt.zero_grad(set_to_none=True)
                opt_lam.zero_grad(set_to_none=True)
                loss.backward()
                lam.grad.neg_()  # gradient ascent on the multipliers
                opt.step()
                opt_lam.step()
                trace.append({"step": t, "expected_sparsity": round(s_hat.item(), 4),
                              "target": round(s_t, 4), "lambda1": round(lam[0].item(), 4),
                              "lambda2": round(lam[1].item(), 4)})
                task.advance()
                task.update(description=f"efficientvlm (loss {dist.item():.3f}, "
                                        f"E[s] {s_hat.item():.2f})")
        gates.sample = False
        with torch.no_grad():
            head_s = {k: v.detach().clone() for k, v in gates.heads.items()}
            neur_s = {k: v.detach().clone() for k, v in gates.neurons.items()}
            counts = counts_from_scores(blocks, head_s, neur_s, target, units, cfg.round_to)
            # fold the deterministic gate values of the surviving groups into the weights
            gates.fold({b.prefix: (gates.head_values(b.prefix) if b.prefix in gates.heads else None,
                                   gates.neuron_values(b.prefix) if b.prefix in gates.neurons
                                   else None) for b in blocks})
    finally:
        model.eval()  # adapters keep HF models in eval mode
    fill_untouched(blocks, head_s, neur_s)
    per_mod: dict[str, list[float]] = {}
    for b in blocks:
        h, f = counts[b.prefix]
        per_mod.setdefault(b.modality, []).append((h / b.num_heads + f / b.mlp_width) / 2)
    details = {"train_steps": T, "final": trace[-1] if trace else None,
               "trace": trace[:: max(1, T // 10)],
               "kept_fraction_per_modality": {m: round(sum(v) / len(v), 4)
                                              for m, v in per_mod.items()}}
    return head_s, neur_s, counts, details


def _retrain(ctx, dense) -> dict:
    return retrain(ctx, dense, steps=RETRAIN_STEPS, lr=RETRAIN_LR)


register_method(Method(
    name="efficientvlm", kind="search+retrain", allocation="global", search=_search,
    retrain=_retrain, structured_allocation="l0-global", patterns=("structured",),
    needs=("calibration", "image_text", "training"),
    description="EfficientVLM: hard-concrete (L0) gates on heads / neurons under one global "
                "expected-sparsity Lagrangian, trained with distillation, then slicing"))
