"""Structured pruning: whole attention heads and MLP neurons, then physical slicing.

Groups (Torch-Pruning's word: weights that must go together):

- a **head** of an encoder layer: its ``head_dim`` rows of q, k and v (in a fused ``qkv``
  Linear, as BLIP's vision encoder, its rows in each of the q, k and v thirds) and the
  matching ``head_dim`` columns of the out-projection; a cross-attention (BLIP's text
  layers) is a unit of its own whose heads are grouped the same way (its key/value read
  image tokens: their input width, the vision width, stays);
- an MLP **neuron**: its fc1 row (and bias) and its fc2 column (a unit without an MLP, a
  cross-attention, has none).

Any weight scorer feeds this: a group's score is the sum of its weights' scores
(:func:`group_scores_from_weights`). A method may instead score groups itself: a ``group``
method declares ``Method.group_importance(ctx, blocks)`` in the registry
(:mod:`vlcompress.methods.registry`; MoPE does, and ``Method.layer_importance`` for
``depth``).

Allocation (how many groups each layer keeps), from the scorer's weight allocation:

- ``per_modality`` (multiflow): MULTIFLOW's rule on the layers of the chosen units, i.e. per
  modality the magnitude threshold that prunes a fraction s of its weights gives each Linear a
  ratio; a layer's attention loses the ratio of its q/k/v/o weights of its heads, its MLP the
  ratio of its fc1/fc2 weights of its neurons;
- ``per_tower`` (magnitude's ``global``, and mope): heads pooled across the layers of each
  tower by mean score per weight, the ``floor(s * n_heads)`` lowest of each tower go (neurons
  likewise, separately). Pooling per tower, not model-wide: the towers' weight scales differ
  (on a randomly initialised clip-vit-b32 a model-wide magnitude pool took 83% of the vision
  tower and nothing of the text tower). MoPE scores (drops of one metric) pool the same way;
- anything else (wanda's per-row, random's layerwise, ``layerwise=True``): uniform, every layer
  keeps ``(1 - s)`` of its heads and neurons.

Rounding (``round_to``, default 8): a layer's kept MLP width is the multiple of ``round_to``
nearest to its allocation (at least ``round_to``; a layer narrower than ``round_to`` stays
whole). Kept heads are rounded to the nearest multiple of ``round_to / gcd(round_to,
head_dim)`` heads, so the kept attention width ``heads * head_dim`` is a multiple of
``round_to`` (with head_dim 64 and round_to 8 any head count qualifies); never fewer than that
step (so at least one head survives) and never more than the layer has (a layer whose head
count is below the step keeps all its heads). Ties round up. Within a layer the highest-scored
groups are kept (ties by position).

Then :func:`prune_structured` zeroes the removed groups (the *masked* model), slices every
layer (:mod:`.surgery`) and checks that the sliced model's tower outputs equal the masked
model's to float tolerance; with ``depth`` it finally removes whole layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError, PatternError
from ..models.surgery import QKV_ROLES, Block, find_blocks, head_rows
from .allocation import per_modality_counts, prune_count, threshold_counts
from .apply import select_layers

HEAD_ROUNDING_RULE = ("kept heads rounded to the nearest multiple of round_to/gcd(round_to, "
                      "head_dim) (kept attention width a multiple of round_to), at least that "
                      "step, at most the layer's heads; kept MLP width rounded to the nearest "
                      "multiple of round_to, at least round_to")

#: Verification tolerance, masked vs sliced outputs: |a - b| <= ATOL + RTOL * max|a|.
VERIFY_ATOL, VERIFY_RTOL = 1e-5, 1e-4



# --------------------------------------------------------------------------------------------
# rounding and feasibility
# --------------------------------------------------------------------------------------------
def head_step(head_dim: int, round_to: int) -> int:
    """The head-count multiple that keeps ``heads * head_dim`` a multiple of ``round_to``."""
    return int(round_to) // math.gcd(int(round_to), int(head_dim))


def nearest_allowed(raw: float, total: int, step: int) -> int:
    """The allowed keep count nearest ``raw``: multiples of ``step`` in [step, total], and
    ``total`` itself (ties go to the larger count)."""
    total, step = int(total), max(1, int(step))
    if step > total or raw >= total:
        return total
    k = math.floor(raw / step + 0.5) * step  # round half up
    k = max(step, min(k, total - total % step))
    # ``total`` itself may be nearer than the largest multiple of step below it
    if total % step and abs(total - raw) <= abs(raw - k):
        return total
    return int(k)


def round_heads(raw: float, heads: int, head_dim: int, round_to: int, groups: int = 1) -> int:
    """Kept heads: :func:`nearest_allowed` on multiples of the rounding step, and of
    ``groups`` (a grouped-query attention keeps the same number of query heads per group)."""
    step = head_step(head_dim, round_to)
    return nearest_allowed(raw, heads, step * int(groups) // math.gcd(step, int(groups)))


def round_neurons(raw: float, width: int, round_to: int) -> int:
    return nearest_allowed(raw, width, round_to)


def check_structured(vlm, cfg, blocks: Sequence[Block] | None = None) -> list[Block]:
    """Fail early, with one line, on a structured setting this model cannot take.

    - :class:`PatternError` when the target sparsity would remove every head of a layer
      (keeping ``(1 - s) * heads < 1``), or when nothing in scope can be pruned by groups;
    - :class:`ConfigError` when ``depth`` is not below every tower's layer count.
    Returns the blocks in scope.
    """
    if blocks is None:
        blocks = find_blocks(vlm, select_layers(vlm, cfg.scope))
    if not blocks:
        from ..models.registry import families

        ok = sorted(n for n, c in families().items() if getattr(c, "structured", False))
        raise PatternError(
            f"pattern structured is not supported for family {vlm.family!r} (it slices encoder "
            "layers of known layouts: q/k/v or fused qkv, out-projection, fc1/fc2); supported: "
            f"{', '.join(ok)}; use unstructured or N:M")
    s = float(cfg.sparsity)
    if "heads" in cfg.units and s > 0:
        worst = min(blocks, key=lambda b: b.num_heads)
        if (1.0 - s) * worst.num_heads < 1.0 - 1e-9:
            hi = 1.0 - 1.0 / worst.num_heads
            raise PatternError(
                f"structured sparsity {s:g} would remove every attention head of {worst.prefix} "
                f"({worst.num_heads} heads; at least one per layer must stay): use a sparsity "
                f"<= {hi:.4g}, or --units neurons")
    if cfg.depth:
        per_stack: dict[str, int] = {}
        for b in blocks:
            per_stack[b.stack] = len(vlm.model.get_submodule(b.stack))
        stack, n = min(per_stack.items(), key=lambda kv: kv[1])
        if cfg.depth >= n:
            raise ConfigError(f"--depth {cfg.depth} would remove every layer of {stack} "
                              f"({n} layers); allowed: 0 to {n - 1}")
    return list(blocks)


# --------------------------------------------------------------------------------------------
# group scores and allocation
# --------------------------------------------------------------------------------------------
def _clean(s: torch.Tensor) -> torch.Tensor:
    s = s.detach().float()
    return torch.nan_to_num(s, nan=float("-inf")) if torch.isnan(s).any() else s


def group_scores_from_weights(block: Block, scores: dict[str, torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(heads [H], neurons [F])``: the sum of each group's weight scores (``F`` is 0 for a
    unit without an MLP)."""
    H, hd = block.num_heads, block.head_dim
    lys = block.linears
    heads = torch.zeros(H, dtype=torch.float64)
    if "attn.qkv" in lys:  # rows [q; k; v], each H * hd
        s = _clean(scores[lys["attn.qkv"].name]).double().cpu()
        heads += s.reshape(3, H, hd, -1).sum(dim=(0, 2, 3))
    else:
        for role in ("attn.q", "attn.k", "attn.v"):  # grouped-query layouts: q only
            if role in lys:
                s = _clean(scores[lys[role].name]).double().cpu()
                heads += s.reshape(H, hd, -1).sum(dim=(1, 2))
    so = _clean(scores[lys["attn.o"].name]).double().cpu()
    heads += so.reshape(so.shape[0], H, hd).sum(dim=(0, 2))
    if not block.has_mlp:
        return heads.float(), torch.zeros(0)
    neurons = (_clean(scores[lys["mlp.in"].name]).double().cpu().sum(1)
               + _clean(scores[lys["mlp.out"].name]).double().cpu().sum(0))
    if "mlp.gate" in lys:  # a gated MLP: gate, up and down go together
        neurons += _clean(scores[lys["mlp.gate"].name]).double().cpu().sum(1)
    return heads.float(), neurons.float()


def _group_sizes(block: Block) -> tuple[int, int]:
    """Weights per head and per neuron of ``block`` (a cross-attention head's key/value rows
    are as wide as the image tokens; 0 per neuron without an MLP)."""
    hd = block.head_dim
    if "attn.qkv" in block.linears:
        qkv = 3 * hd * block.lin("attn.qkv").in_features
    else:
        qkv = hd * sum(block.lin(r).in_features for r in QKV_ROLES if r in block.linears)
    neuron = sum(block.lin(r).in_features for r in ("mlp.gate", "mlp.in") if r in block.linears) \
        + block.lin("mlp.out").out_features if block.has_mlp else 0
    return qkv + block.lin("attn.o").out_features * hd, neuron


def _pooled_keep(blocks, scores: dict[str, torch.Tensor], sparsity: float, sizes: dict[str, int],
                 key) -> dict[str, float]:
    """Pool group scores (per weight) over blocks sharing ``key(block)``; drop the lowest
    ``floor(s * n)`` of each pool; return kept counts per block prefix."""
    out: dict[str, float] = {}
    pools: dict[str, list[Block]] = {}
    for b in blocks:
        pools.setdefault(key(b), []).append(b)
    for group in pools.values():
        vals = [scores[b.prefix].double() / max(1, sizes[b.prefix]) for b in group]
        k = prune_count(sparsity, sum(v.numel() for v in vals))
        for b, c in zip(group, threshold_counts(vals, k), strict=True):
            out[b.prefix] = float(scores[b.prefix].numel() - c)
    return out


def round_gqa_heads(raw: float, block: Block, round_to: int, kv_mode: str = "within") -> int:
    """Kept query heads of a grouped-query ``block`` (``g`` key/value groups of ``H / g``
    heads): ``within`` keeps a multiple of ``g`` (the same number per group), ``whole`` a
    multiple of ``H / g`` (whole groups), ``auto`` whichever of the two is nearer ``raw``
    (ties: the larger count). A multi-head attention (``H / g == 1``) can lose heads only as
    whole groups."""
    H, g = block.num_heads, block.kv_groups
    within = round_heads(raw, H, block.head_dim, round_to, g)
    if kv_mode == "within" or not block.layout.kv_paths:
        return within
    whole = round_heads(raw, H, block.head_dim, round_to, H // g)
    if kv_mode == "whole":
        return whole
    return min((within, whole), key=lambda k: (abs(k - raw), -k))


def keep_counts(blocks: Sequence[Block], head_scores: dict[str, torch.Tensor],
                neuron_scores: dict[str, torch.Tensor], allocation: str, sparsity: float,
                units: Sequence[str], round_to: int, kv_mode: str = "within"
                ) -> dict[str, tuple[int, int]]:
    """``{block prefix: (heads kept, neurons kept)}`` after allocation and rounding
    (``kv_mode``: :func:`round_gqa_heads`)."""
    raw_h = {b.prefix: float(b.num_heads) for b in blocks}
    raw_f = {b.prefix: float(b.mlp_width) for b in blocks}
    s = float(sparsity)
    if s > 0:
        if allocation == "per_modality":
            def roles(b):
                return (b.attn_roles if "heads" in units else ()) + \
                    (b.mlp_roles if "neurons" in units else ())
            counts = per_modality_counts([b.linears[r] for b in blocks for r in roles(b)], s)
            for b in blocks:
                def ratio(rs, b=b):
                    return sum(counts[b.linears[r].name] for r in rs) / sum(
                        b.linears[r].weight.numel() for r in rs)
                if "heads" in units:
                    raw_h[b.prefix] = b.num_heads * (1.0 - ratio(b.attn_roles))
                if "neurons" in units and b.has_mlp:
                    raw_f[b.prefix] = b.mlp_width * (1.0 - ratio(b.mlp_roles))
        elif allocation in ("global", "per_tower"):
            key = (lambda b: "all") if allocation == "global" else (lambda b: b.modality)
            sizes = {b.prefix: _group_sizes(b) for b in blocks}
            if "heads" in units:
                raw_h = _pooled_keep(blocks, head_scores, s, {p: v[0] for p, v in sizes.items()}, key)
            if "neurons" in units:
                raw_f.update(_pooled_keep([b for b in blocks if b.has_mlp], neuron_scores, s,
                                          {p: v[1] for p, v in sizes.items()}, key))
        else:  # uniform
            for b in blocks:
                if "heads" in units:
                    raw_h[b.prefix] = b.num_heads * (1.0 - s)
                if "neurons" in units:
                    raw_f[b.prefix] = b.mlp_width * (1.0 - s)
    out = {}
    for b in blocks:
        h = round_gqa_heads(raw_h[b.prefix], b, round_to, kv_mode) if "heads" in units \
            else b.num_heads
        f = round_neurons(raw_f[b.prefix], b.mlp_width, round_to) if "neurons" in units \
            else b.mlp_width
        out[b.prefix] = (max(1, h), f)
    return out


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the ``k`` highest scores (ties: the earlier index wins)."""
    order = torch.argsort(_clean(scores), descending=True, stable=True)
    return order[: int(k)].sort().values


def keep_heads(block: Block, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the ``k`` heads ``block`` keeps: the highest-scored, or with grouped-
    query attention (``g`` key/value groups of ``H / g`` consecutive query heads) the ``k / g``
    highest-scored of each group, so every group keeps as many query heads and kept head ``i``
    still reads key/value head ``i // (k / g)`` (``k`` is a multiple of ``g``: rounding)."""
    g = block.kv_groups
    if g <= 1:
        return top_k(scores, k)
    per, k_per = block.num_heads // g, int(k) // g
    if k_per * g != int(k) or per * g != block.num_heads:
        raise ValueError(f"{block.prefix}: {k} heads cannot be kept evenly in {g} kv groups")
    return torch.cat([top_k(scores[i * per:(i + 1) * per], k_per) + i * per for i in range(g)])


def kv_group_scores(block: Block, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[g]``: the summed weight scores of each key/value head's k and v rows (``scores`` by
    layer name, holding the block's k/v projections)."""
    g, hd = block.kv_groups, block.head_dim
    out = torch.zeros(g, dtype=torch.float64)
    for path in block.layout.kv_paths.values():
        s = _clean(scores[f"{block.layer_prefix}.{path}"]).double().cpu()
        out += s.reshape(g, hd, -1).sum(dim=(1, 2))
    return out.float()


def keep_heads_kv(block: Block, scores: torch.Tensor, k: int, kv_mode: str = "within",
                  kv_scores: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``(query heads kept, key/value heads kept or None, mode used)`` of a grouped-query
    ``block`` keeping ``k`` query heads.

    - ``within``: :func:`keep_heads` (every k/v head stays: None);
    - ``whole``: the ``k / (H / g)`` groups with the highest score (their query heads' scores
      plus, when given, ``kv_scores``: the group's k/v rows), all their query heads kept;
    - ``auto``: where ``k`` allows both, the one that removes the less score per removed
      weight (a group's k/v weights count as removed with it; without ``kv_scores`` they
      count as removed at no score, so whole groups win only where their query heads are
      the weakest); else the one ``k`` allows.
    """
    H, g = block.num_heads, block.kv_groups
    per = H // g
    k = int(k)
    can_within, can_whole = k % g == 0, k % per == 0 and block.layout.kv_paths is not None
    if kv_mode == "within" or k == H or not can_whole:
        return keep_heads(block, scores, k), None, "within"
    groups = scores.double().reshape(g, per).sum(1)
    if kv_scores is not None:
        groups = groups + kv_scores.double()
    kv_keep = top_k(groups, k // per)
    heads = head_rows(kv_keep, per)  # the query heads of the kept groups
    if kv_mode == "whole" or not can_within:
        return heads, kv_keep, "whole"
    within = keep_heads(block, scores, k)
    per_head, _ = _group_sizes(block)
    kv_size = 2 * block.head_dim * block.lin("attn.o").out_features
    total = scores.double().sum()
    lost_within = float(total - scores.double()[within].sum())
    lost_whole = float(total - scores.double()[heads].sum())
    if kv_scores is not None:
        dropped = torch.ones(g, dtype=torch.bool)
        dropped[kv_keep] = False
        lost_whole += float(kv_scores.double()[dropped].sum())
    removed = (H - k) * per_head
    if lost_whole / (removed + (g - len(kv_keep)) * kv_size) < lost_within / removed:
        return heads, kv_keep, "whole"
    return within, None, "within"


def weight_masks(block: Block, heads_keep: torch.Tensor, neurons_keep: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """Bool masks (True = kept) shaped like each of ``block``'s weights."""

    out = {}
    rows = torch.zeros(block.lin("attn.o").in_features, dtype=torch.bool)
    rows[head_rows(heads_keep, block.head_dim)] = True
    neur = torch.zeros(block.mlp_width, dtype=torch.bool)
    neur[neurons_keep] = True
    for role, ly in block.linears.items():
        w = ly.weight
        if role in ("attn.q", "attn.k", "attn.v"):
            m = rows[:, None].expand(w.shape)
        elif role == "attn.qkv":  # the same heads in each of the q, k and v thirds
            m = rows.repeat(3)[:, None].expand(w.shape)
        elif role == "attn.o":
            m = rows[None, :].expand(w.shape)
        elif role in ("mlp.in", "mlp.gate"):
            m = neur[:, None].expand(w.shape)
        else:
            m = neur[None, :].expand(w.shape)
        out[ly.name] = m.to(w.device).contiguous()
    return out


def kv_masks(block: Block, kv_keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bool masks (True = kept) of ``block``'s k/v projections keeping ``kv_keep`` heads."""
    out = {}
    for path, lin in zip(block.layout.kv_paths.values(), block.kv_linears.values(), strict=True):
        rows = torch.zeros(lin.out_features, dtype=torch.bool)
        rows[head_rows(kv_keep, block.head_dim)] = True
        out[f"{block.layer_prefix}.{path}"] = rows[:, None].expand(lin.weight.shape) \
            .to(lin.weight.device).contiguous()
    return out


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------
def probe_inputs(vlm, data=None) -> dict[str, dict[str, torch.Tensor]]:
    """Small real inputs for every tower: the first 2 pairs of ``data`` (the calibration
    data), or of the bundled shapes data when there is none."""
    from ..data import load_calibration

    src = data if data is not None else load_calibration("shapes", n=2, batch_size=2, seed=0)
    batch = next(iter(src.batches()))
    batch = type(batch)(*(None if v is None else v[:2] for v in vars(batch).values()))
    if getattr(vlm, "generative", False):  # one model, compared on its next-token logits
        return {"logits": vlm.encode(batch)}
    return {t: vlm.tower_inputs(t, batch) for t in vlm.towers}


@torch.no_grad()
def tower_outputs(vlm, inputs: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if getattr(vlm, "generative", False):
        return {t: vlm.logits(feed).float() for t, feed in inputs.items()}
    return {t: vlm.tower_module(t)(**feed).float() for t, feed in inputs.items()}


def compare_outputs(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs diff per tower; raises RuntimeError beyond the float tolerance (a bug)."""
    diffs = {}
    for t, a in ref.items():
        b = got[t]
        d = float((a - b).abs().max()) if a.numel() else 0.0
        diffs[t] = d
        if not d <= VERIFY_ATOL + VERIFY_RTOL * float(a.abs().max()):
            raise RuntimeError(f"structured slicing changed the {t} tower's outputs: max abs diff "
                               f"{d:.3g} vs the masked model")
    return diffs
