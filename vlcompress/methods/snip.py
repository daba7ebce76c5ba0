"""SNIP (Lee, Ajanthan & Torr, ICLR 2019, "SNIP: Single-shot Network Pruning based on
Connection Sensitivity"): a weight matters by how much the loss would change if it were
removed, to first order ``|dL/dW_ij * W_ij|``.

    s_ij = |g_ij * W_ij|,   g = dL/dW summed over the calibration batches

``L`` is the model's own training loss on image-text pairs (:meth:`VLM.loss`: CLIP's
symmetric contrastive loss), so the saliency is task-agnostic like the other scorers here.
The gradients of the prunable weights only are accumulated (``torch.autograd.grad``, no
``.grad`` left on the model, ``requires_grad`` restored afterwards); memory: one float32
tensor per prunable weight. Allocation ``global``: one threshold over every layer, as in the
paper. Our own implementation from the paper's definition.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..progress import NULL
from .registry import Method, Prepared, register_method


def model_loss(vlm, encoded, method: str) -> torch.Tensor:
    """``vlm.loss(encoded)``, or a :class:`ConfigError` naming the family that has none."""
    try:
        return vlm.loss(encoded)
    except NotImplementedError:
        raise ConfigError(f"method {method!r} needs the model's own loss; family "
                          f"{vlm.family!r} does not define one") from None


def loss_gradients(vlm, layers, data, progress=NULL) -> tuple[dict[str, torch.Tensor], float]:
    """(``{layer name: sum over batches of dL/dW}`` as float32, mean loss) over ``data``."""
    params = [ly.weight for ly in layers]
    grads = {ly.name: torch.zeros(ly.weight.shape, dtype=torch.float32, device=ly.weight.device)
             for ly in layers}
    saved = [(p, p.requires_grad) for p in vlm.model.parameters()]
    losses = []
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad(), progress.task("gradients", total=data.num_batches) as task:
            for batch in data.batches():
                loss = model_loss(vlm, vlm.encode(batch), "snip")
                gs = torch.autograd.grad(loss, params, allow_unused=True)
                for ly, g in zip(layers, gs, strict=True):
                    if g is not None:
                        grads[ly.name] += g.detach().float()
                losses.append(float(loss.detach()))
                task.advance()
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    return grads, (sum(losses) / len(losses) if losses else float("nan"))


def prepare(ctx, layers, stats) -> Prepared:
    grads, loss = loss_gradients(ctx.vlm, layers, ctx.data, ctx.progress or NULL)
    return Prepared(extra=grads, details={"loss": loss, "batches": ctx.data.num_batches})


def snip(layer, stats=None, *, seed: int = 0, extra=None) -> torch.Tensor:
    """``|g * W|`` as float32; ``extra`` is the layer's accumulated loss gradient ``g``."""
    if extra is None:
        raise ConfigError(f"method 'snip' needs loss gradients for layer {layer.name} (its "
                          "prepare step computes them; prune() runs it)")
    w = layer.weight.detach().float()
    if tuple(extra.shape) != tuple(w.shape):
        raise ConfigError(f"gradient for layer {layer.name} has shape {tuple(extra.shape)}; "
                          f"the weight has {tuple(w.shape)}")
    return (extra.to(w.device).float() * w).abs()


register_method(Method(
    name="snip", kind="prepare+score", allocation="global", prepare=prepare, score=snip,
    needs=("calibration", "loss"), patterns=("unstructured", "nm"),
    description="|dL/dW * W| with the model's own (contrastive) loss, global"))
