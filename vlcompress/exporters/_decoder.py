"""What every generative decoder graph shares (:mod:`vlcompress.exporters.generative` for
LLaMA/Qwen2, :mod:`vlcompress.exporters.generative_opt` for OPT): the flat KV cache the
decoder layers update, the additive attention mask built from the 2-D mask, and the choice
of the positions the LM head runs on (``logits_to_keep``)."""

from __future__ import annotations

import torch


class FlatCache:
    """The cache interface the decoder layers call (``update``): past tensors in, the
    concatenated keys/values kept as this call's presents."""

    def __init__(self, past: list[torch.Tensor]):
        self.keys = list(past[0::2])
        self.values = list(past[1::2])

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
        self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def presents(self) -> list[torch.Tensor]:
        return [t for kv in zip(self.keys, self.values, strict=True) for t in kv]


def additive_mask(inputs_embeds, attention_mask):
    """The 4-D additive mask [batch, 1, sequence, past + sequence] of one decoder call: causal
    over past + sequence, padding (0 in ``attention_mask``) masked, ``finfo.min`` not -inf."""
    seq = inputs_embeds.shape[1]
    total = attention_mask.shape[1]
    q = torch.arange(seq, device=inputs_embeds.device) + (total - seq)
    k = torch.arange(total, device=inputs_embeds.device)
    allowed = (k[None, :] <= q[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
    mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
    return mask.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)


def keep_positions(h, logits_to_keep=None):
    """The hidden states [batch, kept, hidden] the LM head runs on: the last
    ``logits_to_keep`` positions, every position at 0 (transformers' ``logits_to_keep``
    semantics), the last one when None. A tensor ``logits_to_keep`` is traced as graph ops
    (``Range`` + ``Gather``), so the exported graph takes it as an input."""
    if logits_to_keep is None:
        return h[:, -1].unsqueeze(1)
    seq = h.shape[1]
    keep = torch.as_tensor(logits_to_keep, dtype=torch.long)
    start = torch.where(keep > 0, seq - keep, torch.zeros_like(keep)).clamp(min=0)
    return h.index_select(1, torch.arange(start, seq))
