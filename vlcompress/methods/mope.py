"""MoPE: module-wise pruning error (Lin, Chen, Wang, Qi, Hu, Wang, Yang, "MoPE-CLIP:
Structured Pruning for Efficient Vision-Language Models with Module-wise Pruning Error
Metric", CVPR 2024).

The importance of a module (an attention head, a group of MLP neurons, a whole layer) is how
much a cross-modal metric degrades on calibration data when that module alone is removed.
Width first (heads and neurons, then slicing), then, with ``depth``, whole layers of the
width-pruned model. MoPE scores are drops of one metric, so they compare across layers: the
allocation pools them per tower (``per_tower``, see :mod:`vlcompress.sparsity.structured`).

Our metric is the symmetric InfoNCE (CLIP) loss of the calibration pairs (image-to-text and
text-to-image cross-entropy over the batch, with the model's logit scale), a smooth
stand-in for the paper's retrieval / zero-shot metric; importance = loss(removed) - loss.

Affordable, as the paper needs it to be (its own code is not used here; this follows the
paper's definition):

- **cached activations**: one dense forward records every encoder layer's input and the
  other tower's embeddings; removing a module of layer l only re-runs layers l+1.. of its own
  tower, on the cached input of layer l;
- **no re-run of the layer itself for neurons**: removing neuron group g changes layer l's
  output by exactly ``- act[:, :, g] @ W_fc2[:, g].T``; removing head h changes the attention
  output by ``- ctx_h @ W_o[:, h].T`` (then the MLP of that layer is re-run);
- **batched removals**: all variants of a layer are stacked along the batch dimension and
  run through the rest of the tower together (in chunks bounding memory).
- **neuron groups**: a layer's neurons are ordered by a cheap proxy (mean |activation| x
  ||fc2 column||) and cut into ``neuron_groups`` groups of consecutive rank; each group's drop
  is measured, and a neuron's score is its group's drop per neuron, ties broken by the proxy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..progress import NULL
from .registry import Method, register_method

#: Calibration pairs MoPE evaluates on (the first ones of the calibration data).
MAX_PAIRS = 64
#: Neuron groups measured per layer.
NEURON_GROUPS = 16
#: Elements per stacked activation chunk ([variants * batch, tokens, width]).
CHUNK_ELEMENTS = 2**24


# --------------------------------------------------------------------------------------------
# cached dense pass
# --------------------------------------------------------------------------------------------
class _Context:
    """A dense pass over the calibration pairs with every needed layer input cached."""

    def __init__(self, vlm, blocks, data, max_pairs: int = MAX_PAIRS):
        if vlm.family != "clip":
            raise ConfigError(f"method 'mope' supports the clip family, not {vlm.family!r}")
        from ..data.pairs import PairBatch, as_pair_data

        data = as_pair_data(data)
        images, captions = [], []
        for b in data.batches():
            images += list(b.images)
            captions += list(b.captions)
            if len(images) >= max_pairs:
                break
        images, captions = images[:max_pairs], captions[:max_pairs]
        if len(images) < 2:
            raise ConfigError("method 'mope' needs at least 2 calibration pairs")
        self.vlm = vlm
        self.model = m = vlm.model
        self.encoded = vlm.encode(PairBatch(images, captions))
        self.B = len(images)
        self.inputs: dict[str, tuple] = {}  # block prefix -> (hidden, args, kwargs)
        handles = []

        def make_hook(prefix):
            def hook(module, args, kwargs):
                self.inputs[prefix] = (args[0].detach(), args[1:], dict(kwargs))
            return hook

        try:
            for b in blocks:
                handles.append(m.get_submodule(b.prefix).register_forward_pre_hook(
                    make_hook(b.prefix), with_kwargs=True))
            with torch.no_grad():
                out = m(**self.encoded)
        finally:
            for h in handles:
                h.remove()
        self.image = F.normalize(out.image_embeds.float(), dim=-1)
        self.text = F.normalize(out.text_embeds.float(), dim=-1)
        self.scale = float(m.logit_scale.detach().exp())
        ids = self.encoded["input_ids"]
        eos = m.text_model.eos_token_id
        self.eos_index = ids.int().argmax(-1) if eos == 2 else (ids.int() == eos).int().argmax(-1)
        self.base = float(self.loss(self.image[None], self.text[None])[0])

    # --- metric ----------------------------------------------------------------------------
    def loss(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE per variant: image/text are [V or 1, B, P] (normalised)."""
        logits = self.scale * image @ text.transpose(1, 2)  # [V, B, B]
        V = logits.shape[0]
        target = torch.arange(self.B).repeat(V)
        li = F.cross_entropy(logits.reshape(-1, self.B), target, reduction="none").reshape(V, -1)
        lt = F.cross_entropy(logits.transpose(1, 2).reshape(-1, self.B), target,
                             reduction="none").reshape(V, -1)
        return (li.mean(1) + lt.mean(1)) / 2

    # --- running the rest of a tower ---------------------------------------------------------
    def _expand(self, x, V: int):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == self.B:
            return x.repeat(V, *([1] * (x.dim() - 1)))
        return x

    def tail(self, block, hidden: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings [V, B, P] from ``hidden`` [V*B, T, D], the output of
        ``block``: the later layers of its stack, then the tower's head."""
        m = self.model
        V = hidden.shape[0] // self.B
        _, args, kwargs = self.inputs[block.prefix]
        args = tuple(self._expand(a, V) for a in args)
        kwargs = {k: self._expand(v, V) for k, v in kwargs.items()}
        layers = m.get_submodule(block.stack)
        pos = _position(layers, m.get_submodule(block.prefix))
        h = hidden
        for layer in list(layers)[pos + 1:]:
            h = layer(h, *args, **kwargs)
        if block.modality == "vision":
            emb = m.visual_projection(m.vision_model.post_layernorm(h[:, 0]))
        else:
            h = m.text_model.final_layer_norm(h)
            idx = self.eos_index.repeat(V)
            emb = m.text_projection(h[torch.arange(h.shape[0]), idx])
        return F.normalize(emb.float(), dim=-1).reshape(V, self.B, -1)

    @torch.no_grad()
    def drops(self, block, variants) -> torch.Tensor:
        """Loss increase for each variant; ``variants(start, stop)`` builds hidden states
        [(stop-start)*B, T, D] after ``block`` for variants start..stop-1. The count comes
        from ``variants.n``."""
        hidden0 = self.inputs[block.prefix][0]
        per = self.B * hidden0.shape[1] * max(hidden0.shape[2], block.mlp_width)
        chunk = max(1, CHUNK_ELEMENTS // max(1, per))
        out = []
        for s in range(0, variants.n, chunk):
            e = min(variants.n, s + chunk)
            emb = self.tail(block, variants(s, e))
            if block.modality == "vision":
                out.append(self.loss(emb, self.text[None]))
            else:
                out.append(self.loss(self.image[None], emb))
        return torch.cat(out) - self.base


def _position(layers, layer) -> int:
    for i, mod in enumerate(layers):
        if mod is layer:
            return i
    raise ValueError("layer not found in its stack")


class _Variants:
    def __init__(self, n, fn):
        self.n, self.fn = n, fn

    def __call__(self, s, e):
        return self.fn(s, e)


def _layer_parts(ctx: _Context, block):
    """Dense internals of ``block`` on the cached input: input x, attention context (input
    of the out-projection), attention output, MLP activation (input of fc2) and output."""
    layer = ctx.model.get_submodule(block.prefix)
    x, args, kwargs = ctx.inputs[block.prefix]
    got = {}
    hs = [block.lin("attn.o").register_forward_pre_hook(lambda m, a: got.__setitem__("ctx", a[0])),
          block.lin("attn.o").register_forward_hook(lambda m, a, o: got.__setitem__("attn", o)),
          block.lin("mlp.out").register_forward_pre_hook(lambda m, a: got.__setitem__("act", a[0]))]
    try:
        y = layer(x, *args, **kwargs)
    finally:
        for h in hs:
            h.remove()
    return layer, x, got["ctx"], got["attn"], got["act"], y


# --------------------------------------------------------------------------------------------
# the importance functions prune_structured calls
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def group_importance(ctx, blocks: Sequence, *, neuron_groups: int = NEURON_GROUPS,
                     max_pairs: int = MAX_PAIRS) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """MoPE scores ``({prefix: heads [H]}, {prefix: neurons [F]})`` for every block."""
    vlm, data, progress = ctx.vlm, ctx.data, ctx.progress or NULL
    units, round_to = tuple(ctx.cfg.units), int(ctx.cfg.round_to)
    ctx = _Context(vlm, blocks, data, max_pairs)
    heads_out: dict[str, torch.Tensor] = {}
    neur_out: dict[str, torch.Tensor] = {}
    with progress.task("mope", total=len(blocks)) as task:
        for b in blocks:
            layer, x, c, attn, act, y = _layer_parts(ctx, b)
            H, hd = b.num_heads, b.head_dim
            if "heads" in units:
                wo = b.lin("attn.o").weight  # [D, H*hd]

                def head_variants(s, e, x=x, c=c, attn=attn, wo=wo, hd=hd, layer=layer):
                    outs = []
                    for h in range(s, e):
                        sl = slice(h * hd, (h + 1) * hd)
                        mid = x + attn - c[..., sl] @ wo[:, sl].T
                        outs.append(mid + layer.mlp(layer.layer_norm2(mid)))
                    return torch.cat(outs)

                heads_out[b.prefix] = ctx.drops(b, _Variants(H, head_variants)).float()
            else:
                heads_out[b.prefix] = torch.zeros(H)
            if "neurons" in units:
                w2 = b.lin("mlp.out").weight  # [D, F]
                proxy = act.abs().flatten(0, -2).mean(0) * w2.norm(dim=0)  # [F]
                order = torch.argsort(proxy, stable=True)
                n_groups = max(1, min(neuron_groups, b.mlp_width // max(1, round_to) or 1,
                                      b.mlp_width))
                groups = list(torch.tensor_split(order, n_groups))

                def neuron_variants(s, e, y=y, act=act, w2=w2, groups=groups):
                    return torch.cat([y - act[..., g] @ w2[:, g].T for g in groups[s:e]])

                d = ctx.drops(b, _Variants(len(groups), neuron_variants))
                rank = torch.empty(b.mlp_width)
                rank[order] = torch.arange(b.mlp_width, dtype=torch.float32) / b.mlp_width
                scores = torch.empty(b.mlp_width)
                for g, dg in zip(groups, d.tolist(), strict=True):
                    scores[g] = dg / len(g)
                neur_out[b.prefix] = scores + 1e-7 * rank  # tie-break inside a group
            else:
                neur_out[b.prefix] = torch.zeros(b.mlp_width)
            task.advance()
    return heads_out, neur_out


@torch.no_grad()
def layer_importance(ctx, blocks: Sequence, *, max_pairs: int = MAX_PAIRS) -> dict[str, torch.Tensor]:
    """MoPE score of every whole layer: ``{stack: [L]}`` (loss increase when skipped)."""
    vlm, data, progress = ctx.vlm, ctx.data, ctx.progress or NULL
    ctx = _Context(vlm, blocks, data, max_pairs)
    out: dict[str, list[float]] = {}
    with progress.task("mope depth", total=len(blocks)) as task:
        for b in sorted(blocks, key=lambda b: (b.stack, b.index)):
            x = ctx.inputs[b.prefix][0]
            d = ctx.drops(b, _Variants(1, lambda s, e, x=x: x))  # the layer skipped
            out.setdefault(b.stack, []).append(float(d[0]))
            task.advance()
    return {k: torch.tensor(v) for k, v in out.items()}


register_method(Method(
    name="mope", kind="group", allocation="per_tower", group_importance=group_importance,
    layer_importance=layer_importance, patterns=("structured",), families=("clip",),
    needs=("calibration", "image_text"),
    description="MoPE-CLIP: contrastive-loss increase when a head / neuron group / layer is "
                "removed (structured only; --depth for layers)"))
