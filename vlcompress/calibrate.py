"""Activation statistics for data-aware scorers, streamed with forward hooks.

:func:`collect_stats` runs the model once over the calibration pairs (no gradients) and, for
every prunable ``nn.Linear``, accumulates the sum over calibration tokens of the squared
input of each input column: ``sq_sum[j] = sum_t x_tj^2``. Its square root is the activation
norm ``a_j`` that wanda and multiflow use. Padding tokens are left out: the adapter's
``VLM.token_mask(modality, encoded)`` says which tokens are real. Memory stays bounded: one
float64 vector of length ``d_in`` per layer, whatever the amount of data.

With ``gram=True`` it also accumulates each layer's input Gram matrix ``G = X^T X`` (float32
``d_in x d_in``, as SparseGPT's reference accumulates ``H``; same token filtering), the layer
Hessian SparseGPT needs. That is ``d_in^2`` per layer, so callers collect it for a few
layers at a time (SparseGPT: one block at a time, :mod:`vlcompress.blockwise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .models.base import VLM, PrunableLayer
from .progress import NULL, Progress


@dataclass
class LayerStats:
    """Running input statistics of one Linear layer.

    ``sq_sum`` is float64 [d_in]: the sum over calibration tokens of ``x_j ** 2``;
    ``tokens`` is the number of (non-padding) tokens summed; ``gram`` (only when collected
    with ``gram=True``) is float32 [d_in, d_in], ``sum_t x_t x_t^T`` (its diagonal is ``sq_sum``).
    """

    sq_sum: torch.Tensor
    tokens: int = 0
    gram: torch.Tensor | None = None

    @property
    def norm(self) -> torch.Tensor:
        """``a_j = sqrt(sum_t x_tj^2)`` as float32 [d_in]."""
        return self.sq_sum.sqrt().float()

    @classmethod
    def zeros(cls, d_in: int) -> LayerStats:
        return cls(torch.zeros(d_in, dtype=torch.float64), 0)


def _masked_sq_sum(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """(sum over tokens of ``x ** 2``, whether ``mask`` was applied) for an input [..., D].

    ``mask`` (float, 1 = real token) applies when its shape is the input's token layout
    ``x.shape[:-1]``; an input laid out otherwise (cross-attention keys/values reading the
    other modality's tokens) is summed unfiltered (docs/design.md, "The model contract").
    Float32 within one batch (plenty for a few thousand tokens), on the input's device, and no
    host synchronisation (the mask is multiplied in, not used as an index).
    """
    d = x.shape[-1]
    x2 = x.detach().float().square().reshape(-1, d)
    if mask is None or tuple(mask.shape) != tuple(x.shape[:-1]):
        return x2.sum(0), False
    return mask.reshape(-1).to(x2.device) @ x2, True


def _masked_gram(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``sum_t m_t x_t x_t^T`` (float32 [D, D]) for an input [..., D]; ``mask`` as in
    :func:`_masked_sq_sum` (ignored when its shape is not the input's token layout)."""
    return mirror_lower(_masked_gram_lower(x, mask))


def _masked_gram_lower(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """As :func:`_masked_gram`, but only the lower triangle is guaranteed (what the
    accumulator sums; :func:`mirror_lower` completes it once at the end)."""
    d = x.shape[-1]
    x2 = x.detach().float().reshape(-1, d)
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        x2 = x2 * mask.reshape(-1, 1).to(x2.device)  # 0/1 mask: (m x)^T (m x) = x^T diag(m) x
    return _gram_lower(x2)


def mirror_lower(g: torch.Tensor, block: int = 256, *, inplace: bool = False) -> torch.Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is ``g``'s, copied in
    ``block``-wide strips so the transposed reads stay in cache (0.051 s at D=3072 on one
    core, against 0.139 s for ``tril(g) + tril(g, -1).T``: ``benchmarks/obs_parts.py``).
    ``inplace``: overwrite ``g``'s upper triangle instead of making a new matrix (no second
    ``D x D`` copy alive)."""
    full = g if inplace else torch.tril(g)
    d = g.shape[0]
    for i in range(0, d, block):
        full[i:i + block, i + block:] = full[i + block:, i:i + block].t()
        sub = full[i:i + block, i:i + block]
        full[i:i + block, i:i + block] = torch.tril(sub) + torch.tril(sub, -1).t()
    return full


GRAM_CHUNKS = 4  # off the CPU: compute the upper block triangle only


def _gram_lower(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` for [T, D], lower triangle guaranteed. On the CPU: BLAS ``ssyrk`` (through
    SciPy), which computes one triangle, half the products: measured on one core at
    T = 1576, D = 3072 (a ViT MLP's second layer, where this product costs more than the
    block's forward), 0.156 s against 0.220 s for the block triangle below and 0.323 s for
    the full product; at D = 768, 0.011 s against 0.018 s (``benchmarks/obs_parts.py``).
    Elsewhere :func:`_sym_gram`."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] > 0:
        from scipy.linalg import blas

        # x (C order, T x D) is x^T in Fortran order: ssyrk reads it without a copy and
        # returns the upper triangle of x^T x in Fortran order, i.e. the lower one in C order
        c = blas.ssyrk(1.0, x.numpy().T, trans=0, lower=0)
        return torch.from_numpy(c).t()
    return _sym_gram(x)


def _sym_gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` for [T, D], computing only the blocks on and above the diagonal of a
    ``GRAM_CHUNKS x GRAM_CHUNKS`` split (10 of 16 products: 30% less time measured at D=3072)
    and mirroring the rest. Below D=1024 one product is as fast."""
    d = x.shape[1]
    if d < 1024:
        return x.t() @ x
    step = -(-d // GRAM_CHUNKS)
    g = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for i in range(0, d, step):
        blk = x[:, i:i + step].t() @ x[:, i:]
        g[i:i + step, i:] = blk
        g[i + step:, i:i + step] = blk[:, step:].t()
    return g


class StatsAccumulator:
    """Forward hooks that accumulate :class:`LayerStats` for a set of layers, batch by batch.

    The one implementation behind :func:`collect_stats` (whole-model passes) and
    :mod:`vlcompress.blockwise` (one encoder block at a time on cached inputs), so both give
    the same numbers. Use as a context manager (hooks are removed on exit, even on error);
    call :meth:`set_masks` before each batch with that batch's token masks per modality.
    """

    def __init__(self, layers: Sequence[PrunableLayer], *, gram: bool = False):
        self.layers = list(layers)
        self.gram = gram
        self.sums = {ly.name: torch.zeros(ly.weight.shape[1], dtype=torch.float64,
                                          device=ly.weight.device) for ly in self.layers}
        self.tokens = dict.fromkeys(self.sums, 0)
        self.grams = ({ly.name: torch.zeros(ly.weight.shape[1], ly.weight.shape[1],
                                            dtype=torch.float32, device=ly.weight.device)
                       for ly in self.layers} if gram else {})
        # Per-batch state shared by the hooks: each modality's token mask (float, on the
        # model's device) and real-token count, and a one-entry cache so that q/k/v
        # projections, which read the same tensor, square and sum it only once.
        self.masks: dict[str, tuple[torch.Tensor | None, int | None]] = {}
        self.cache: dict[str, object] = {"x": None, "modality": None, "sq": None, "n": 0, "g": None}
        self.handles: list = []

    @property
    def modalities(self) -> list[str]:
        return sorted({ly.modality for ly in self.layers})

    def set_masks(self, masks: dict[str, tuple[torch.Tensor | None, int | None]]) -> None:
        """This batch's ``{modality: (float mask or None, real-token count or None)}``."""
        self.masks = dict(masks)
        self.cache.update(x=None, modality=None, sq=None, n=0, g=None)

    def _hook(self, layer: PrunableLayer):
        name, modality, cache, gram = layer.name, layer.modality, self.cache, self.gram

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            if cache["x"] is x and cache["modality"] == modality:
                sq, n = cache["sq"], cache["n"]
            else:
                mask, n_real = self.masks.get(modality, (None, None))
                sq, masked = _masked_sq_sum(x, mask)
                sq = sq.to(torch.float64)
                n = n_real if masked else x[..., 0].numel()
                g = _masked_gram_lower(x, mask) if gram else None
                cache.update(x=x, modality=modality, sq=sq, n=n, g=g)
            self.sums[name] += sq.to(self.sums[name].device)
            self.tokens[name] += n
            if gram:
                self.grams[name] += cache["g"].to(self.grams[name].device)

        return hook

    def __enter__(self) -> StatsAccumulator:
        # Pre-hooks: the statistics are of the layer's input, so they are taken before the
        # layer runs (a caller may stop the forward right after the last one, see blockwise).
        for ly in self.layers:
            self.handles.append(ly.module.register_forward_pre_hook(self._hook(ly),
                                                                    with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.cache.update(x=None, modality=None, sq=None, n=0, g=None)
        self.masks.clear()

    def result(self) -> dict[str, LayerStats]:
        """``{layer.name: LayerStats}`` on the CPU (Gram matrices completed, in place, from
        the lower triangle the hooks accumulate: call it once, after the last batch)."""
        return {n: LayerStats(s.cpu(), self.tokens[n],
                              mirror_lower(self.grams[n], inplace=True).cpu() if self.gram
                              else None)
                for n, s in self.sums.items()}


def batch_masks(vlm: VLM, encoded, modalities) -> dict[str, tuple[torch.Tensor | None, int | None]]:
    """``{modality: (float token mask, real-token count)}`` of one encoded batch (None, None
    where every token counts): what :meth:`StatsAccumulator.set_masks` takes."""
    out = {}
    for m in modalities:
        mk = vlm.token_mask(m, encoded)
        out[m] = (None, None) if mk is None else (mk.float(), int(mk.bool().sum()))
    return out


def collect_stats(vlm: VLM, data, layers: Sequence[PrunableLayer] | None = None,
                  progress: Progress = NULL, *, gram: bool = False) -> dict[str, LayerStats]:
    """Input statistics of ``layers`` (default: every prunable layer) over ``data``.

    ``data`` is a :class:`~vlcompress.data.PairData` (or a sequence of ``PairBatch``). Each
    batch is encoded with ``vlm.encode`` and run through ``vlm.model`` once under
    ``torch.no_grad``; hooks are removed afterwards even on error. A layer's input tokens are
    filtered by ``vlm.token_mask(layer.modality, encoded)`` when the mask matches the input's
    token layout. Returns ``{layer.name: LayerStats}`` (on the CPU). ``gram=True`` also fills
    ``LayerStats.gram`` (see the module doc for its memory cost).
    """
    from .data.pairs import as_pair_data

    data = as_pair_data(data)
    layers = list(vlm.prunable_layers() if layers is None else layers)
    acc = StatsAccumulator(layers, gram=gram)
    with acc, progress.task("calibrate", total=data.num_batches) as task, torch.no_grad():
        for batch in data.batches():
            encoded = vlm.encode(batch)
            acc.set_masks(batch_masks(vlm, encoded, acc.modalities))
            vlm.model(**vlm.model_inputs(encoded))
            task.advance()
    return acc.result()


def activation_norm(layer: PrunableLayer, stats: LayerStats | None, method: str) -> torch.Tensor:
    """``a_j`` of ``layer``'s inputs as float32 [d_in] on the weight's device, checked.

    For scorers: raises :class:`ConfigError` when ``stats`` is missing or of the wrong width.
    """
    if stats is None:
        raise ConfigError(f"method {method!r} needs calibration statistics for layer {layer.name}")
    a = stats.norm
    d_in = layer.weight.shape[1]
    if tuple(a.shape) != (d_in,):
        raise ConfigError(
            f"calibration statistics for layer {layer.name} have shape {tuple(a.shape)}; "
            f"the layer's input width is {d_in}"
        )
    return a.to(layer.weight.device)
