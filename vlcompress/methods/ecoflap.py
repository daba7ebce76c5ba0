"""ECoFLaP (Sung, Yoon & Bansal, ICLR 2024, "ECoFLaP: Efficient Coarse-to-Fine Layer-Wise
Pruning for Vision-Language Models"): a coarse, global step decides how sparse each block
is; a fine, local step (wanda) decides which weights go inside each layer. Reference code:
ylsung/ECoFLaP, ``LAVIS/lavis/compression/pruners/layer_single_base_pruner.py``
(``LayerSparsity.compute_importance_scores_mezo_layer_one``, the zeroth-order score
``olmezo-gradient``; ``return_sparsity`` and ``compute_the_sparsity_per_group``, the budget).
Our own code, following the reference.

Coarse step (zeroth order, forward passes only; ``estimator="tensor"``, the default and the
reference's). A block is one encoder layer of one tower (``(modality, block)``). For each
prunable weight tensor W on its own, and each calibration batch until ``zo_pairs`` pairs have
been used (every draw counts its batch's pairs, as in the reference), ``num_noise`` times:
draw ``z ~ N(0, I)`` shaped like W (seeded by ``(seed, tensor, batch, draw)``) and measure the
model's own loss (:meth:`VLM.loss`, contrastive for CLIP) at ``W + eps z`` and ``W - eps z``:

    I_W = sum over batches and draws of |(L(W + eps z) - L(W - eps z)) / (2 eps)|
    I_B = sum over B's tensors of I_W                        (no |W| factor)

``estimator="block-spsa"`` keeps our earlier estimator, for comparison: the whole block is
perturbed at once with ``num_noise`` draws per batch, ``g_B = mean c z`` (an SPSA gradient) and
``I_B = mean |W * g_B|`` (per coordinate mostly noise at a few draws).

Budget (``compute_the_sparsity_per_group``): with N prunable weights, keep
``K = N - floor(s N)``. Every block keeps at least ``ceil((1 - cap) n_B)`` (``cap``, the most a
block may lose, ``s + cap_margin``, margin 0.1 by default); the rest is shared in proportion to
``I_B``, a block never keeping more than it has (water-filling). So
``sum_B s_B n_B = floor(s N)`` and ``s_B <= cap`` (:func:`block_sparsities`). Each layer of
block B then loses ``s_B`` of every output row by wanda's ``|W| * ||x_j||`` (rounded to whole
weights per row, the total kept within one row count of the budget; allocation
``per_block``). Under N:M (or ``layerwise``) there is no per-block ratio to set and ECoFLaP
prunes exactly like wanda. Deviation: the reference draws its noise from the global RNG with a
random seed per draw; ours is seeded per tensor, batch and draw, so a run is reproducible.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..calibrate import activation_norm
from ..progress import NULL
from .registry import Method, Option, Prepared, register_method
from .snip import model_loss

EPS = 1e-3
CAP_MARGIN = 0.1
ZO_PAIRS = 128  # calibration pairs for the coarse step (the reference's num_data_first_stage)
ESTIMATORS = ("tensor", "block-spsa")

OPTIONS = (
    Option("estimator", str, "tensor", "zeroth-order block score: tensor (the reference's, one "
           "tensor perturbed at a time) or block-spsa (our earlier one)", choices=ESTIMATORS),
    Option("num_noise", int, 1, "Gaussian draws per batch (the reference's num_noise)", minimum=1),
    Option("eps", float, EPS, "perturbation size (noise_eps)", minimum=1e-12),
    Option("zo_pairs", int, ZO_PAIRS, "calibration pairs for the coarse step", minimum=1),
    Option("cap_margin", float, CAP_MARGIN, "a block loses at most sparsity + this", minimum=0.0),
)


def _seed(seed: int, key: tuple, t: int) -> int:
    d = hashlib.sha256(f"ecoflap:{int(seed)}:{':'.join(map(str, key))}:{t}".encode()).digest()
    return int.from_bytes(d[:8], "little") & ((1 << 63) - 1)


def _noise(gen: torch.Generator, ly) -> torch.Tensor:
    return torch.randn(tuple(ly.weight.shape), generator=gen, dtype=torch.float32)


def _encoded_batches(vlm, data, zo_pairs: int, max_batches: int | None) -> list[tuple]:
    """``(encoded batch, pairs in it)`` for the batches holding the first ``zo_pairs`` pairs."""
    out, seen = [], 0
    for i, batch in enumerate(data.batches()):
        if seen >= zo_pairs or (max_batches is not None and i >= max_batches):
            break
        out.append((vlm.encode(batch), len(batch)))
        seen += len(batch)
    return out


@torch.no_grad()
def tensor_importance(vlm, layers, data, *, eps: float = EPS, seed: int = 0, num_noise: int = 1,
                      zo_pairs: int = ZO_PAIRS, max_batches: int | None = None,
                      progress=NULL) -> dict[str, float]:
    """``{layer name: I_W}``: the reference's per-tensor zeroth-order score (module doc).

    One tensor perturbed at a time; for every batch ``num_noise`` draws, each counting the
    batch's pairs against ``zo_pairs``. Cost: two forward passes per tensor and draw."""
    encoded = _encoded_batches(vlm, data, zo_pairs, max_batches)
    out: dict[str, float] = {}
    with progress.task("zeroth-order (per tensor)", total=len(layers)) as task:
        for ly in layers:
            w0 = ly.weight.detach().clone()
            total, used = 0.0, 0
            try:
                for t, (enc, n) in enumerate(encoded):
                    if used >= zo_pairs:
                        break
                    per_batch = 0.0
                    for k in range(num_noise):
                        if used >= zo_pairs:
                            break
                        gen = torch.Generator(device="cpu").manual_seed(
                            _seed(seed, (ly.name, k), t))
                        z = _noise(gen, ly).to(w0.device, w0.dtype)
                        ly.weight.copy_(w0 + eps * z)
                        lp = float(model_loss(vlm, enc, "ecoflap"))
                        ly.weight.copy_(w0 - eps * z)
                        lm = float(model_loss(vlm, enc, "ecoflap"))
                        ly.weight.copy_(w0)
                        per_batch += abs((lp - lm) / (2 * eps))
                        used += n
                    total += abs(per_batch)
            finally:
                ly.weight.copy_(w0)
            out[ly.name] = total
            task.advance()
    return out


def block_importance(vlm, layers, data, *, eps: float = EPS, seed: int = 0,
                     max_batches: int | None = None, progress=NULL, estimator: str = "tensor",
                     num_noise: int | None = None, zo_pairs: int = ZO_PAIRS) -> dict[tuple, float]:
    """``{(modality, block): I_B}`` by ``estimator`` (module doc; forward passes only).

    ``tensor`` (default): the sum of the block's :func:`tensor_importance` (``num_noise``
    default 1). ``block-spsa``: the whole block perturbed at once, ``num_noise`` (default 4)
    draws per batch, ``I_B = mean |W * g_B|``. ``max_batches`` further limits the batches."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")
    groups: dict[tuple, list] = {}
    for ly in layers:
        groups.setdefault((ly.modality, int(ly.block)), []).append(ly)
    if estimator == "tensor":
        per = tensor_importance(vlm, layers, data, eps=eps, seed=seed, num_noise=num_noise or 1,
                                zo_pairs=zo_pairs, max_batches=max_batches, progress=progress)
        return {key: sum(per[ly.name] for ly in group) for key, group in groups.items()}
    return _block_spsa(vlm, groups, data, eps=eps, seed=seed, draws=num_noise or 4,
                       zo_pairs=zo_pairs, max_batches=max_batches, progress=progress)


@torch.no_grad()
def _block_spsa(vlm, groups, data, *, eps, seed, draws, zo_pairs, max_batches, progress):
    encoded = [enc for enc, _ in _encoded_batches(vlm, data, zo_pairs, max_batches)]
    out: dict[tuple, float] = {}
    with progress.task("zeroth-order (per block)", total=len(groups)) as task:
        for key, group in groups.items():
            orig = [ly.weight.detach().clone() for ly in group]
            coef = []
            for t in range(len(encoded) * draws):
                enc = encoded[t // draws]
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
                    for t in range(len(coef))]
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
    o = cfg.method_options
    s = float(cfg.sparsity)
    cap = min(s + o["cap_margin"], 0.99)
    imp = block_importance(vlm, layers, data, seed=cfg.seed, progress=progress, eps=o["eps"],
                           estimator=o["estimator"], num_noise=o["num_noise"],
                           zo_pairs=o["zo_pairs"])
    sizes: dict[tuple, int] = {}
    for ly in layers:
        key = (ly.modality, int(ly.block))
        sizes[key] = sizes.get(key, 0) + ly.weight.numel()
    bs = block_sparsities(imp, sizes, s, cap)
    ratios = row_ratios(layers, bs, s, cap)
    details = {"cap": cap, "eps": o["eps"], "zo_pairs": min(o["zo_pairs"], len(data)),
               "estimator": o["estimator"], "num_noise": o["num_noise"],
               "blocks": {f"{k[0]}.{k[1]}": {"importance": imp[k], "sparsity": bs[k]} for k in bs}}
    return Prepared(ratios=ratios, details=details)


def ecoflap(layer, stats, *, seed: int = 0, extra=None) -> torch.Tensor:
    """The fine step's score: wanda's ``|W| * a_j`` (float32)."""
    w = layer.weight.detach().float().abs()
    return w * activation_norm(layer, stats, "ecoflap").unsqueeze(0)


register_method(Method(
    name="ecoflap", kind="prepare+score", allocation="per_block", prepare=prepare, score=ecoflap,
    needs=("calibration", "loss"), patterns=("unstructured", "nm"), options=OPTIONS,
    description="zeroth-order block budget (per-tensor loss probes, capped), then wanda "
                "inside each layer"))
