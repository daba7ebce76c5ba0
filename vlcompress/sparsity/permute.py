"""Channel permutation for N:M sparsity: reorder a layer's input channels so that the weights
that matter fall into different groups of M, and absorb the reorder into the layer that
produces those channels, so the model stays a plain model (no gather at run time).

N:M keeps the N best of every M *consecutive* input columns of each output row. Two strong
columns in the same group compete; moved into different groups both survive. Pool & Yu
(NeurIPS 2021, "Channel Permutations for N:M Sparsity") search a column order that maximises
the importance kept after the N:M selection; NVIDIA apex implements it
(``apex/contrib/sparsity/permutation_lib.py`` and ``permutation_search_kernels/``:
``exhaustive_search.py`` tries every way to split the columns of a *stripe group* (two
stripes of M columns) into two groups and applies the best non-overlapping improvements,
``channel_swap.py`` swaps single columns between stripes). This module is our own code after
that search:

- **objective** :func:`kept_importance`: the sum over rows and groups of the N largest scores,
  with the scorer's own scores (wanda, MULTIFLOW, RIA, ...), computed once before the mask
  (``objective="score"``, apex's: it maximises the kept magnitude summed over the matrix), or
  (``objective="row"``) with each output row's scores first divided by the row's total, so
  every row counts by the *share* of its importance it keeps. N:M ranks the scores inside each
  row, so a factor per row (MULTIFLOW's ``I_out``) never changes the mask, but it does
  weight the rows in the summed objective: the search then trades the rows with small
  factors away for the ones with large ones. :func:`objective_scores`; the run option
  ``permute_objective=auto`` picks ``row`` for a scorer that declares such a factor
  (``Method.row_factor``), ``score`` otherwise (measured on tiny-clip 2:4: MULTIFLOW 77.4 ->
  83.6 with ``row``; wanda 85.3 with ``score``, 81.5 with ``row``);
- **start**: the better of the identity and RIA's heuristic channel reallocation
  (:func:`reallocation_order`: Zhang et al., ICLR 2024, reference
  biomedical-cybernetics/Relative-importance-and-activation-pruning ``lib/prune.py``:
  columns sorted by their summed score are dealt out over the M slots of every group);
- **search** :func:`search_permutation`: rounds of apex's stripe-group step, vectorised: each
  round pairs every stripe with a random partner (a random perfect matching, so the pairs are
  disjoint, as apex's "don't touch a stripe twice" rule makes them), scores every split of the
  pair's 2M columns into two groups (35 for M=4; for M > 4, where the splits explode, the
  M*M single-column swaps of ``channel_swap.py``) and applies each pair's best split when it
  gains. Deviation: apex scores *all* stripe pairs each round (on a GPU kernel) and keeps the
  best disjoint ones; random matchings cost one pass over the matrix per round on a CPU and
  also play the part of apex's random "escape" perturbations. It stops when
  ``patience`` rounds in a row gain nothing, after ``max_rounds`` rounds (a cap that makes a
  run repeatable on any machine load: the same seed and rounds give the same order), or when
  the time budget is spent, whichever comes first.

What can be permuted for free: a layer whose input is the output of exactly one other Linear
through an element-wise function. ``mlp.out`` (fc2) is fed by ``mlp.in`` (fc1) through the
activation: fc1's rows and bias take the inverse order. ``attn.o`` (out_proj) is fed by the
attention's value projection, head by head: the columns are permuted *within* each head
(v_proj's rows the same way, head-consistent; a head's softmax mixes tokens, not channels).
Groups of M never straddle two heads when the head width is a multiple of M, so within-head
orders lose nothing. Not permuted: q/k/v and fc1 (their input is the LayerNorm'd residual
stream, read by several layers and added to the residual: a permutation would have to run
through every layer of the tower, the embeddings and the final norm), a fused qkv projection's
out-projection (BLIP vision: its value rows are a slice of one fused Linear), and anything
whose producer cannot be found; :func:`permutable_pairs` says why for each.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..progress import NULL, Progress

#: consumer role -> the role of the Linear that produces its input
PRODUCER_ROLE = {"mlp.out": "mlp.in", "attn.o": "attn.v", "xattn.o": "xattn.v"}
_LEFT_REASON = {
    "attn.q": "its input is the normalised residual stream (shared with k/v and the residual)",
    "attn.k": "its input is the normalised residual stream (shared with q/v and the residual)",
    "attn.v": "its input is the normalised residual stream (shared with q/k and the residual)",
    "mlp.in": "its input is the normalised residual stream (shared with the residual)",
    "xattn.q": "its input is the normalised residual stream (shared with the residual)",
    "xattn.k": "its input is the other tower's output (shared by every layer)",
    "xattn.v": "its input is the other tower's output (shared by every layer)",
    "attn.qkv": "its input is the normalised residual stream (shared with the residual)",
}
#: Largest number of two-group splits of a stripe pair scored exhaustively (M=4: 35).
MAX_SPLITS = 70
#: Elements per evaluation chunk (rows x pairs x splits x 2M), bounding the search's memory.
CHUNK = 1 << 22


@dataclass
class PermPair:
    """A layer whose input channels can be permuted (``consumer``) and the Linear that
    produces them (``producer``); ``segment``: channels move only inside consecutive runs of
    this many (one attention head), None: anywhere."""

    consumer: object  # PrunableLayer
    producer_name: str
    producer: nn.Linear
    segment: int | None = None


def _block_prefix(name: str, block: int) -> str:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p == str(block):
            return ".".join(parts[: i + 1])
    return name.rsplit(".", 1)[0]


def _head_dim(root: nn.Module, producer_name: str, width: int) -> int | None:
    parent = root.get_submodule(producer_name.rsplit(".", 1)[0]) if "." in producer_name else root
    for attr in ("head_dim", "attention_head_size"):
        v = getattr(parent, attr, None)
        if isinstance(v, int) and v > 0 and width % v == 0:
            return v
    for attr in ("num_heads", "num_attention_heads"):
        h = getattr(parent, attr, None)
        if isinstance(h, int) and h > 0 and width % h == 0:
            return width // h
    return None


def permutable_pairs(vlm, layers) -> tuple[list[PermPair], dict[str, str]]:
    """The layers of ``layers`` whose input can be permuted for free, with their producers,
    and ``{name: why not}`` for the others."""
    every = {(_block_prefix(ly.name, ly.block), ly.role): ly for ly in vlm.prunable_layers()}
    pairs: list[PermPair] = []
    left: dict[str, str] = {}
    for ly in layers:
        prod_role = PRODUCER_ROLE.get(ly.role)
        if prod_role is None:
            left[ly.name] = _LEFT_REASON.get(ly.role, f"role {ly.role} has no single producer")
            continue
        prod = every.get((_block_prefix(ly.name, ly.block), prod_role))
        if prod is None:
            left[ly.name] = (f"no {prod_role} Linear produces its input in this block"
                             + (" (fused qkv projection)" if ly.role == "attn.o" else ""))
            continue
        pm = prod.module
        if not isinstance(pm, nn.Linear) or pm.out_features != ly.weight.shape[1]:
            left[ly.name] = f"{prod.name} does not produce its {ly.weight.shape[1]} input channels"
            continue
        segment = None
        if ly.role in ("attn.o", "xattn.o"):
            segment = _head_dim(vlm.model, prod.name, pm.out_features)
            if segment is None:
                left[ly.name] = f"the head width of {prod.name} is unknown"
                continue
        pairs.append(PermPair(ly, prod.name, pm, segment))
    return pairs, left


#: What the search maximises (see the module doc): the scores as they are, or each row's
#: share of its own total.
OBJECTIVES = ("score", "row")


def objective_scores(scores: torch.Tensor, objective: str = "score") -> torch.Tensor:
    """The matrix whose kept N:M sum the search maximises: ``scores`` (``"score"``) or each
    row divided by its total (``"row"``; an all-zero row stays zero)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown permutation objective {objective!r}; allowed: {OBJECTIVES}")
    x = scores.detach().float()
    if objective == "row":
        x = x / x.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return x


def kept_importance(scores: torch.Tensor, n: int, m: int) -> float:
    """Sum of the ``n`` largest scores in every group of ``m`` consecutive columns of each
    row: the importance an N:M mask keeps (columns in their current order)."""
    r, c = scores.shape
    g = scores.reshape(r, c // m, m).double()
    return float(g.topk(n, dim=-1).values.sum())


def reallocation_order(scores: torch.Tensor, m: int, segment: int | None = None) -> torch.Tensor:
    """RIA's heuristic channel reallocation, inside each segment: sort the columns by their
    summed score, cut the sorted list into ``m`` runs and deal run ``i`` into slot ``i`` of
    every group (every other run reversed), so each group gets one column of each strength.
    Returns the new order (new column k is old column ``order[k]``)."""
    r, c = scores.shape
    seg = segment or c
    g = c // seg
    col = scores.float().sum(dim=0).reshape(g, seg)
    idx = col.argsort(dim=1, stable=True) + (torch.arange(g) * seg).unsqueeze(1)  # [g, seg]
    runs = idx.reshape(g, m, seg // m).clone()
    runs[:, 1::2] = runs[:, 1::2].flip(-1)
    return runs.transpose(1, 2).reshape(c)


def _splits(m: int) -> torch.Tensor:
    """Ways to split the 2m columns of a stripe pair into two groups of m, as orders of the
    2m positions (first m: group A, which holds position 0; last m: group B); row 0 is the
    identity. Every split when there are at most MAX_SPLITS, else the m*m single swaps."""
    full = math.comb(2 * m - 1, m - 1)
    out = []
    if full <= MAX_SPLITS:
        for rest in itertools.combinations(range(1, 2 * m), m - 1):
            a = (0, *rest)
            out.append(list(a) + [p for p in range(2 * m) if p not in a])
    else:
        out.append(list(range(2 * m)))
        for i in range(m):
            for j in range(m, 2 * m):
                o = list(range(2 * m))
                o[i], o[j] = o[j], o[i]
                out.append(sorted(o[:m]) + sorted(o[m:]))
    return torch.tensor(out, dtype=torch.long)


class _Evaluator:
    """Kept importance of stripe pairs under every split (:func:`_splits`), vectorised over
    pairs and rows. The top ``n`` of a group of ``m`` is the largest sum over the group's
    ``n``-subsets when those are few (2:4: 6 pair sums), a max instead of a sort; else topk."""

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m
        self.splits = _splits(m)
        self.fast = math.comb(m, n) <= 10
        if self.fast:
            combos = list(itertools.combinations(range(2 * m), n))
            at = {c: i for i, c in enumerate(combos)}
            self.combos = torch.tensor(combos, dtype=torch.long)  # [C, n]
            self.pick = torch.tensor([[at[c] for half in (row[:m], row[m:])
                                       for c in itertools.combinations(sorted(half), n)]
                                      for row in self.splits.tolist()], dtype=torch.long)

    def __call__(self, xt: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """[P, K] for the P pairs whose 2m original columns are ``src``; ``xt`` is the score
        matrix transposed ([cols, rows])."""
        n, m = self.n, self.m
        r, k = xt.shape[1], self.splits.shape[0]
        width = self.pick.shape[1] if self.fast else 2 * m
        step = max(1, CHUNK // max(1, r * k * width))
        out = []
        for i in range(0, src.shape[0], step):
            v = xt[src[i:i + step]]  # [b, 2m, r]
            b = v.shape[0]
            if self.fast:
                sums = v[:, self.combos].sum(dim=2)  # [b, C, r]
                g = sums[:, self.pick].reshape(b, k, 2, -1, r)
                out.append(g.amax(dim=3).sum(dim=(2, 3)))
            else:
                g = v[:, self.splits].reshape(b, k, 2, m, r)
                out.append(g.topk(n, dim=3).values.sum(dim=(2, 3, 4)))
        return torch.cat(out)


def search_permutation(scores: torch.Tensor, n: int, m: int, *, segment: int | None = None,
                       deadline: float | None = None, seed: int = 0,
                       patience: int = 3, max_rounds: int | None = None,
                       objective: str = "score") -> tuple[torch.Tensor, dict]:
    """A column order of ``scores`` ([rows, cols], higher = keep) that keeps more importance
    under N:M (see the module doc); channels move only within ``segment`` s. Stops after
    ``patience`` rounds without gain, after ``max_rounds`` rounds (None: no cap) or at
    ``deadline`` (``time.perf_counter()``). ``objective``: :data:`OBJECTIVES`.

    Returns ``(order, info)``: new column k is old column ``order[k]``; ``info`` has the kept
    importance of the objective before and after (as fractions of its total), rounds, why it
    stopped (``converged``, ``rounds``, ``budget``) and seconds."""
    t0 = time.perf_counter()
    r, c = scores.shape
    seg = segment or c
    if c % seg or seg % m:
        raise ValueError(f"cannot permute {c} columns in segments of {seg} for groups of {m}")
    x = objective_scores(scores, objective).cpu()
    x = x / x.abs().mean().clamp_min(torch.finfo(torch.float32).tiny)
    total = float(x.double().sum()) or 1.0
    before = kept_importance(x, n, m)
    order = torch.arange(c)
    init = "identity"
    realloc = reallocation_order(x, m, seg)
    if kept_importance(x[:, realloc], n, m) > before:
        order, init = realloc, "reallocation"
    ev = _Evaluator(n, m)
    xt = x.t().contiguous()
    gen = torch.Generator().manual_seed(seed)
    groups, stripes = c // seg, seg // m
    npair = stripes // 2
    rounds = stale = 0
    stopped = "converged"
    while npair and stale < patience:
        if max_rounds is not None and rounds >= max_rounds:
            stopped = "rounds"
            break
        if deadline is not None and time.perf_counter() >= deadline:
            stopped = "budget"
            break
        mate = torch.rand(groups, stripes, generator=gen).argsort(dim=1)
        mate = mate + (torch.arange(groups) * stripes).unsqueeze(1)
        pairs = mate[:, : 2 * npair].reshape(-1, 2)  # stripe ids, disjoint pairs
        pos = (pairs.unsqueeze(-1) * m + torch.arange(m)).reshape(-1, 2 * m)  # positions
        src = order[pos]  # original columns now at those positions
        vals = ev(xt, src)
        best, k = vals.max(dim=1)
        better = best > vals[:, 0] + 1e-6 * vals[:, 0].abs().clamp_min(1e-12)
        if better.any():
            new = torch.gather(src, 1, ev.splits[k])
            order[pos[better]] = new[better]
            stale = 0
        else:
            stale += 1
        rounds += 1
    after = kept_importance(x[:, order], n, m)
    return order, {"kept_before": before / total, "kept_after": after / total,
                   "gain": after / before - 1.0 if before > 0 else 0.0, "init": init,
                   "rounds": rounds, "converged": stale >= patience or not npair,
                   "stopped": stopped, "objective": objective,
                   "seconds": time.perf_counter() - t0}


@torch.no_grad()
def apply_permutation(pair: PermPair, order: torch.Tensor) -> None:
    """Reorder ``pair.consumer``'s input columns by ``order`` and ``pair.producer``'s output
    rows (and bias) the same way: the composed function is unchanged."""
    w = pair.consumer.module.weight
    o = order.to(w.device)
    w.copy_(w.index_select(1, o))
    p = pair.producer
    p.weight.copy_(p.weight.index_select(0, o.to(p.weight.device)))
    if p.bias is not None:
        p.bias.copy_(p.bias.index_select(0, o.to(p.bias.device)))


def permute_for_nm(vlm, layers, scores: dict, n: int, m: int, *, seconds: float,
                   seed: int = 0, rounds: int | None = None, objective: str = "score",
                   progress: Progress = NULL) -> dict:
    """Permute every permutable layer of ``layers`` in place for N:M, on ``scores`` (``{name:
    score tensor}``, updated to follow the weights: a consumer's columns and, when present,
    its producer's rows). ``seconds`` is the budget of the whole search, shared among the
    layers still to search; ``rounds`` caps each layer's search rounds (None: no cap);
    ``objective``: :data:`OBJECTIVES`. Returns JSON-able details for the prune result."""
    t0 = time.perf_counter()
    pairs, left = permutable_pairs(vlm, layers)
    pairs = [p for p in pairs if p.consumer.name in scores]
    done: dict[str, dict] = {}
    with progress.task("permute", total=len(pairs)) as t:
        for i, pair in enumerate(pairs):
            name = pair.consumer.name
            s = scores[name]
            if (pair.segment or s.shape[1]) % m:
                left[name] = f"its head width {pair.segment} is not a multiple of {m}"
                t.advance()
                continue
            remaining = seconds - (time.perf_counter() - t0)
            deadline = time.perf_counter() + max(0.0, remaining) / (len(pairs) - i)
            order, info = search_permutation(s, n, m, segment=pair.segment, deadline=deadline,
                                             seed=seed + i, max_rounds=rounds,
                                             objective=objective)
            apply_permutation(pair, order)
            o = order.to(s.device)
            scores[name] = s.index_select(1, o)
            if pair.producer_name in scores:
                ps = scores[pair.producer_name]
                scores[pair.producer_name] = ps.index_select(0, o.to(ps.device))
            done[name] = {"producer": pair.producer_name, "segment": pair.segment, **info}
            t.advance()
    gains = [d["gain"] for d in done.values()]
    stops = [d["stopped"] for d in done.values()]
    return {"seconds": time.perf_counter() - t0, "budget_seconds": float(seconds),
            "max_rounds": rounds, "objective": objective,
            "stopped": {k: stops.count(k) for k in sorted(set(stops))},
            "layers": done, "mean_gain": sum(gains) / len(gains) if gains else 0.0,
            "permuted": len(done), "left": _by_reason(left)}


def _by_reason(left: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, why in left.items():
        out.setdefault(why, []).append(name)
    return out

