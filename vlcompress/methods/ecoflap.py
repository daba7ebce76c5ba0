"""ECoFLaP (Sung, Yoon & Bansal, ICLR 2024, "ECoFLaP: Efficient Coarse-to-Fine Layer-Wise
Pruning for Vision-Language Models"): a coarse, global step decides how sparse each block
is; a fine, local step (wanda) decides which weights go inside each layer.

Coarse step (zeroth order, forward passes only). A block is one encoder layer of one tower
(``(modality, block)``). For each block B and calibration batch t (the batches holding the
first 128 pairs, the paper's default), draw ``z ~ N(0, I)`` on
B's prunable weights from a generator seeded by ``(seed, B, t)``, and measure the model's own
loss (:meth:`VLM.loss`, contrastive for CLIP) at ``W_B + eps z`` and ``W_B - eps z``:

    c_Bt = (L(W_B + eps z_t) - L(W_B - eps z_t)) / (2 eps)      (a directional derivative)
    g_B  = mean_t c_Bt z_t                                       (SPSA estimate of dL/dW_B)
    I_B  = mean over B's weights of |W * g_B|                    (first-order importance)

No backward pass and no gradient is stored: the weights are restored from a copy of one block
after each pair of passes, and ``g_B`` is rebuilt from the seeds one layer at a time.

Budget: with N prunable weights, keep ``K = N - floor(s N)``. Every block keeps at least
``(1 - cap) n_B`` (``cap``, the most a block may lose, defaults to ``s + 0.1``); the rest is
shared in proportion to ``I_B``, a block never keeping more than it has (water-filling, as in
the paper's code). So ``sum_B s_B n_B = floor(s N)`` and ``s_B <= cap``
(:func:`block_sparsities`). Each layer of block B then loses ``s_B`` of every output row by
wanda's ``|W| * ||x_j||`` (rounded to whole weights per row, the total kept within one row
count of the budget; allocation ``per_block``). Under N:M (or ``layerwise``) there is no
per-block ratio to set and ECoFLaP prunes exactly like wanda. Our own implementation from the
paper's description.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..calibrate import activation_norm
from ..progress import NULL
from .registry import Method, Prepared, register_method
from .snip import model_loss

EPS = 1e-3
CAP_MARGIN = 0.1
ZO_PAIRS = 128  # calibration pairs for the coarse step (the paper's default)


def _seed(seed: int, key: tuple, t: int) -> int:
    d = hashlib.sha256(f"ecoflap:{int(seed)}:{key[0]}:{key[1]}:{t}".encode()).digest()
    return int.from_bytes(d[:8], "little") & ((1 << 63) - 1)


def _noise(gen: torch.Generator, ly) -> torch.Tensor:
    return torch.randn(tuple(ly.weight.shape), generator=gen, dtype=torch.float32)


def block_importance(vlm, layers, data, *, eps: float = EPS, seed: int = 0,
                     max_batches: int | None = None, progress=NULL) -> dict[tuple, float]:
    """``{(modality, block): I_B}``, the zeroth-order importance above (forward passes only).

    ``max_batches`` limits the calibration batches used (default: those holding the first
    ``ZO_PAIRS`` pairs). Cost: two forward passes per block and batch.
    """
    if max_batches is None:
        max_batches = max(1, -(-ZO_PAIRS // max(1, data.batch_size)))
    groups: dict[tuple, list] = {}
    for ly in layers:
        groups.setdefault((ly.modality, int(ly.block)), []).append(ly)
    encoded = []
    for i, batch in enumerate(data.batches()):
        if max_batches is not None and i >= max_batches:
            break
        encoded.append(vlm.encode(batch))
    out: dict[tuple, float] = {}
    with progress.task("zeroth-order", total=len(groups)) as task, torch.no_grad():
        for key, group in groups.items():
            orig = [ly.weight.detach().clone() for ly in group]
            coef = []
            for t, enc in enumerate(encoded):
                gen = torch.Generator(device="cpu").manual_seed(_seed(seed, key, t))
                zs = [_noise(gen, ly).to(ly.weight.device, ly.weight.dtype) for ly in group]
                try:
                    for ly, w0, z in zip(group, orig, zs, strict=True):
                        ly.weight.copy_(w0 + eps * z)
                    lp = float(model_loss(vlm, enc, "ecoflap"))
                    for ly, w0, z in zip(group, orig, zs, strict=True):
                        ly.weight.copy_(w0 - eps * z)
                    lm = float(model_loss(vlm, enc, "ecoflap"))
                finally:
                    for ly, w0 in zip(group, orig, strict=True):
                        ly.weight.copy_(w0)
                coef.append((lp - lm) / (2 * eps))
            # I_B = mean |W * g_B|, g_B = mean_t c_t z_t rebuilt from the seeds layer by layer
            total, count = 0.0, 0
            gens = [torch.Generator(device="cpu").manual_seed(_seed(seed, key, t))
                    for t in range(len(encoded))]
            for ly, w0 in zip(group, orig, strict=True):
                g = torch.zeros(tuple(ly.weight.shape), dtype=torch.float32)
                for c, gen in zip(coef, gens, strict=True):
                    g += c * _noise(gen, ly)  # generators advance layer by layer, as above
                g /= max(1, len(coef))
                total += float((w0.float().cpu() * g).abs().sum())
                count += w0.numel()
            out[key] = total / max(1, count)
            del orig
            task.advance()
    return out


def block_sparsities(importance: dict, sizes: dict, sparsity: float,
                     cap: float | None = None) -> dict:
    """Per-block sparsity ``{key: s_B}`` under the global budget, each at most ``cap``.

    ``importance`` and ``sizes`` (weights per block) share keys. Keeps ``K = N - floor(s N)``
    in all: ``keep_B = min(n_B, ceil((1 - cap) n_B) + lam * I_B)`` with ``lam`` set so the
    keeps add up to ``K`` (bisection); ``cap`` defaults to ``min(s + 0.1, 0.99)``. Blocks of
    zero importance still keep their floor; if every importance is zero (or not finite) the
    split is uniform.
    """
    from ..sparsity.allocation import prune_count

    keys = list(sizes)
    n = {k: int(sizes[k]) for k in keys}
    total = sum(n.values())
    if cap is None:
        cap = min(sparsity + CAP_MARGIN, 0.99)
    cap = float(cap)
    if cap < sparsity - 1e-12:
        raise ValueError(f"cap {cap} is below the target sparsity {sparsity}")
    keep_total = total - prune_count(sparsity, total)
    lo = {k: min(n[k], math.ceil(round((1.0 - cap) * n[k], 6))) for k in keys}
    w = {k: float(importance.get(k, 0.0)) for k in keys}
    w = {k: (v if math.isfinite(v) and v > 0 else 0.0) for k, v in w.items()}
    top = max(w.values(), default=0.0)
    if top <= 0:
        return {k: sparsity for k in keys}
    w = {k: max(v, 1e-9 * top) for k, v in w.items()}  # every block can grow to its size

    def kept(lam: float) -> float:
        return sum(min(n[k], lo[k] + lam * w[k]) for k in keys)

    need = keep_total
    if kept(0.0) >= need:  # the floors alone cover the budget (cap == target)
        return {k: 1.0 - lo[k] / n[k] if n[k] else 0.0 for k in keys}
    a, b = 0.0, max((n[k] - lo[k]) / w[k] for k in keys)
    for _ in range(200):
        mid = 0.5 * (a + b)
        if kept(mid) < need:
            a = mid
        else:
            b = mid
    keep = {k: min(n[k], lo[k] + b * w[k]) for k in keys}
    scale = (need - sum(lo.values())) / max(1e-300, sum(keep[k] - lo[k] for k in keys))
    keep = {k: lo[k] + (keep[k] - lo[k]) * scale for k in keys}  # exact sum despite bisection
    return {k: min(cap, max(0.0, 1.0 - keep[k] / n[k])) if n[k] else 0.0 for k in keys}


def row_ratios(layers, block_sparsity: dict, sparsity: float, cap: float) -> dict[str, float]:
    """Per-layer ratios ``k_l / d_in`` (whole weights per output row) realising the block
    sparsities: ``k_l = floor(min(s_B, cap) d_in)``, then single steps to the layers with the largest
    remainders while the total stays within ``floor(s N)`` and each layer within ``cap``."""
    from ..sparsity.allocation import prune_count

    total = sum(ly.weight.numel() for ly in layers)
    budget = prune_count(sparsity, total)
    k, frac = {}, {}
    for ly in layers:
        d_out, d_in = ly.weight.shape[0], ly.weight.shape[1]
        x = block_sparsity[(ly.modality, int(ly.block))] * d_in
        k[ly.name] = min(math.floor(round(x, 6)), math.floor(round(cap * d_in, 6)), d_in)
        frac[ly.name] = x - k[ly.name]
    left = budget - sum(k[ly.name] * ly.weight.shape[0] for ly in layers)
    for ly in sorted(layers, key=lambda ly: -frac[ly.name]):
        d_out, d_in = ly.weight.shape[0], ly.weight.shape[1]
        if d_out <= left and k[ly.name] + 1 <= d_in and (k[ly.name] + 1) / d_in <= cap + 1e-9:
            k[ly.name] += 1
            left -= d_out
    return {ly.name: k[ly.name] / ly.weight.shape[1] for ly in layers}


def prepare(ctx, layers, stats) -> Prepared:
    """The coarse step (skipped under N:M or ``layerwise``, where no per-block ratio applies)."""
    vlm, data, cfg, progress = ctx.vlm, ctx.data, ctx.cfg, ctx.progress or NULL
    if cfg.pattern.is_nm or cfg.layerwise:
        return Prepared()
    s = float(cfg.sparsity)
    cap = min(s + CAP_MARGIN, 0.99)
    imp = block_importance(vlm, layers, data, seed=cfg.seed, progress=progress)
    sizes: dict[tuple, int] = {}
    for ly in layers:
        key = (ly.modality, int(ly.block))
        sizes[key] = sizes.get(key, 0) + ly.weight.numel()
    bs = block_sparsities(imp, sizes, s, cap)
    ratios = row_ratios(layers, bs, s, cap)
    details = {"cap": cap, "eps": EPS, "zo_pairs": min(ZO_PAIRS, len(data)),
               "blocks": {f"{k[0]}.{k[1]}": {"importance": imp[k], "sparsity": bs[k]} for k in bs}}
    return Prepared(ratios=ratios, details=details)


def ecoflap(layer, stats, *, seed: int = 0, extra=None) -> torch.Tensor:
    """The fine step's score: wanda's ``|W| * a_j`` (float32)."""
    w = layer.weight.detach().float().abs()
    return w * activation_norm(layer, stats, "ecoflap").unsqueeze(0)


register_method(Method(
    name="ecoflap", kind="prepare+score", allocation="per_block", prepare=prepare, score=ecoflap,
    needs=("calibration", "loss"), patterns=("unstructured", "nm"),
    description="zeroth-order block budget (capped), then wanda inside each layer"))
