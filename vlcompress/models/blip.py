"""BLIP for image-text retrieval (``BlipForImageTextRetrieval``; Li et al., ICML 2022).

Three modalities for MULTIFLOW's per-modality allocation:

- ``vision``: the ViT encoder (fused ``qkv``, ``projection``, ``fc1``, ``fc2`` per layer);
- ``text``: the BERT-style text encoder's self-attention and feed-forward layers;
- ``fusion``: its cross-attention (query from text, key/value from image tokens; calibration
  does not filter the image-token inputs of key/value).

Structured pruning (``structured = True``) slices three layer layouts, registered below
for :mod:`.surgery`: the vision layer (``blip-vision``: heads across the fused ``qkv`` rows,
q, k and v thirds alike, and the ``projection`` columns; ``fc1``/``fc2`` neurons); the text
layer's self-attention with its feed-forward (``blip-text``); and its cross-attention
(``blip-text-cross``: its own heads; key/value keep their input width, the vision width).
The text layouts are those of every ``BlipTextLayer``: the retrieval text encoder and the
captioning / VQA text decoder alike (:func:`blip_linears` lists any BLIP model's layers).
A vision attention sliced to fewer heads becomes a :class:`SlicedBlipAttention` (HF's
``BlipAttention.forward`` reshapes with ``hidden_size // num_heads``, which is no longer the
head dim); a text attention gets ``num_attention_heads`` and ``all_head_size`` updated.

The ITM head, ``vision_proj`` and ``text_proj`` are never pruned. Towers exported:
``vision`` (pixels -> image token embeddings, the sequence ITM needs), ``text`` (unimodal
text encoder -> projected ``[CLS]`` feature for ITC) and ``fusion`` (text encoder with
cross-attention, image embeddings as an input -> ITM logits).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data.pairs import PairBatch
from .base import VLM, PrunableLayer
from .registry import register_family
from .surgery import Layout, register_layout

_VISION_ROLES = {"self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.o",
                 "mlp.fc1": "mlp.in", "mlp.fc2": "mlp.out"}
_TEXT_ROLES = {
    "attention.self.query": ("text", "attn.q"), "attention.self.key": ("text", "attn.k"),
    "attention.self.value": ("text", "attn.v"), "attention.output.dense": ("text", "attn.o"),
    "crossattention.self.query": ("fusion", "xattn.q"), "crossattention.self.key": ("fusion", "xattn.k"),
    "crossattention.self.value": ("fusion", "xattn.v"),
    "crossattention.output.dense": ("fusion", "xattn.o"),
    "intermediate.dense": ("text", "mlp.in"), "output.dense": ("text", "mlp.out"),
}
ITC_TEMPERATURE = 0.07


# --- structured layouts ------------------------------------------------------------------
def _sliced_vision_forward(self, hidden_states, **kwargs):
    """``BlipAttention.forward`` (and ``Blip2Attention``'s, the same fused-qkv attention) with
    the head dim its own, not ``hidden_size // num_heads`` (the same computation when no head
    is removed)."""
    bsz, tgt_len, _ = hidden_states.size()
    qkv = (self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, self.head_dim)
           .permute(2, 0, 3, 1, 4))
    scores = torch.matmul(qkv[0], qkv[1].transpose(-1, -2)) * self.scale
    probs = F.softmax(scores, dim=-1)
    drop = getattr(self, "dropout", None)  # BLIP's module; BLIP-2 keeps a probability
    probs = drop(probs) if drop is not None else F.dropout(
        probs, p=float(getattr(self, "attention_dropout", 0.0)), training=self.training)
    ctx = torch.matmul(probs, qkv[2]).permute(0, 2, 1, 3)
    ctx = ctx.reshape(bsz, tgt_len, self.num_heads * self.head_dim)
    return self.projection(ctx), probs


_SLICED: dict[str, type] = {}


def sliced_attention_class(base: type | None = None) -> type:
    """``Sliced<base>``: a subclass of a fused-qkv vision attention (``BlipAttention`` by
    default, or BLIP-2's ``Blip2Attention``) whose forward works with any head count (built
    on first use: importing transformers' BLIP modelling code is not free)."""
    if base is None:
        from transformers.models.blip.modeling_blip import BlipAttention

        base = BlipAttention
    if base.__name__.startswith("Sliced"):
        return base
    name = f"Sliced{base.__name__}"
    if name not in _SLICED:
        cls = type(name, (base,), {"forward": _sliced_vision_forward, "__module__": __name__})
        globals()[name] = _SLICED[name] = cls
    return _SLICED[name]


def _set_vision_heads(attn, n: int, head_dim: int) -> None:
    attn.num_heads = n
    attn.__class__ = sliced_attention_class(type(attn))


def _set_text_heads(attn, n: int, head_dim: int) -> None:
    attn.num_attention_heads = n
    attn.all_head_size = n * head_dim


VISION_LAYOUT = register_layout(Layout(
    "blip-vision", "self_attn",
    {"attn.qkv": "self_attn.qkv", "attn.o": "self_attn.projection", "mlp.in": "mlp.fc1",
     "mlp.out": "mlp.fc2"}, set_heads=_set_vision_heads))
TEXT_LAYOUT = register_layout(Layout(
    "blip-text", "attention.self",
    {"attn.q": "attention.self.query", "attn.k": "attention.self.key",
     "attn.v": "attention.self.value", "attn.o": "attention.output.dense",
     "mlp.in": "intermediate.dense", "mlp.out": "output.dense"},
    heads_attr="num_attention_heads", head_dim_attr="attention_head_size",
    set_heads=_set_text_heads))
CROSS_LAYOUT = register_layout(Layout(
    "blip-text-cross", "crossattention.self",
    {"attn.q": "crossattention.self.query", "attn.k": "crossattention.self.key",
     "attn.v": "crossattention.self.value", "attn.o": "crossattention.output.dense"},
    sub="crossattention", heads_attr="num_attention_heads", head_dim_attr="attention_head_size",
    set_heads=_set_text_heads))


def text_linears(layers, prefix: str, *, text: str = "text", cross: str = "fusion"
                 ) -> list[PrunableLayer]:
    """Every Linear of a stack of ``BlipTextLayer`` s (``prefix``: the stack's path), the
    self-attention and feed-forward under modality ``text``, the cross-attention (where the
    layer has one) under ``cross``."""
    out = []
    for b, layer in enumerate(layers):
        for sub, (modality, role) in _TEXT_ROLES.items():
            if sub.startswith("crossattention"):
                if not hasattr(layer, "crossattention"):
                    continue
                modality = cross
            else:
                modality = text
            out.append(PrunableLayer(f"{prefix}.{b}.{sub}", layer.get_submodule(sub), modality,
                                     role, b))
    return out


def blip_linears(model) -> list[PrunableLayer]:
    """The prunable Linears of any BLIP model: the vision encoder, then the text encoder
    (retrieval, VQA) and the text decoder (captioning, VQA: ``text_decoder.bert``)."""
    out = []
    for b, layer in enumerate(model.vision_model.encoder.layers):
        for sub, role in _VISION_ROLES.items():
            out.append(PrunableLayer(f"vision_model.encoder.layers.{b}.{sub}",
                                     layer.get_submodule(sub), "vision", role, b))
    if hasattr(model, "text_encoder"):
        out += text_linears(model.text_encoder.encoder.layer, "text_encoder.encoder.layer")
    if hasattr(model, "text_decoder"):
        out += text_linears(model.text_decoder.bert.encoder.layer,
                            "text_decoder.bert.encoder.layer")
    return out


class _VisionTower(nn.Module):
    """The vision encoder's hidden states; holds the vision encoder alone, so a runner that
    moves or copies it to a GPU does not carry the text encoder along."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values).last_hidden_state


class _TextTower(nn.Module):
    """Holds the text encoder and its projection only (as :class:`_VisionTower`)."""

    def __init__(self, model):
        super().__init__()
        self.text_encoder = model.text_encoder
        self.text_proj = model.text_proj

    def forward(self, input_ids, attention_mask):
        h = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_proj(h[:, 0, :])


class _FusionTower(nn.Module):
    """Holds the text encoder (with its cross-attention) and the ITM head only."""

    def __init__(self, model):
        super().__init__()
        self.text_encoder = model.text_encoder
        self.itm_head = model.itm_head

    def forward(self, input_ids, attention_mask, image_embeds):
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        h = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                              encoder_hidden_states=image_embeds,
                              encoder_attention_mask=atts).last_hidden_state
        return self.itm_head(h[:, 0, :])


@register_family("blip")
class BLIP(VLM):
    family = "blip"
    structured = True
    towers = ("vision", "text", "fusion")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def text_max_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def prunable_layers(self) -> list[PrunableLayer]:
        return blip_linears(self.model)

    # --- data ----------------------------------------------------------------------------
    def encode_images(self, images) -> torch.Tensor:
        px = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return px.to(self.device)

    def encode_texts(self, texts) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.text_max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def encode(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        if batch.images is None:  # text-only data: the text tower alone (--tower text)
            return self.encode_texts(batch.captions)
        return {"pixel_values": self.encode_images(batch.images), **self.encode_texts(batch.captions)}

    def token_mask(self, modality, encoded):
        if modality in ("text", "fusion"):
            return encoded["attention_mask"].bool()
        return None

    @torch.no_grad()
    def forward(self, batch):
        """Calibration pass: vision, unimodal text (ITC) and text with cross-attention (ITM),
        so every prunable layer of all three modalities sees data."""
        enc = self.encode(batch) if isinstance(batch, PairBatch) else batch
        self.model(**enc, use_itm_head=False)
        return self.model(**enc, use_itm_head=True)

    def model_inputs(self, encoded):
        return encoded

    def image_features(self, pixel_values) -> torch.Tensor:
        h = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
        return self.model.vision_proj(h[:, 0, :])

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        px = images if isinstance(images, torch.Tensor) else self.encode_images(images)
        return self.image_features(px)

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        enc = texts if isinstance(texts, dict) else self.encode_texts(texts)
        return _TextTower(self.model)(enc["input_ids"], enc["attention_mask"])

    @torch.no_grad()
    def itm_scores(self, images, texts: list[str]) -> torch.Tensor:
        """Probability that image i matches text i, for aligned lists of pairs (ITM head)."""
        px = self.encode_images(images)
        enc = self.encode_texts(texts)
        emb = self.model.vision_model(pixel_values=px).last_hidden_state
        logits = _FusionTower(self.model)(enc["input_ids"], enc["attention_mask"], emb)
        return logits.float().softmax(-1)[:, 1]

    @torch.no_grad()
    def embed_images_with_tokens(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """One vision pass: (ITC image features [N, D], image token embeddings [N, T, D]), the
        tokens being what :meth:`itm_scores_from_embeds` takes (evaluation encodes each image
        once and re-ranks from the cached tokens)."""
        px = images if isinstance(images, torch.Tensor) else self.encode_images(images)
        h = self.model.vision_model(pixel_values=px).last_hidden_state
        return self.model.vision_proj(h[:, 0, :]), h

    @torch.no_grad()
    def itm_scores_from_embeds(self, image_embeds: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """ITM match probability of ``texts`` against already-encoded images: ``image_embeds``
        is [N, T, D] aligned with ``texts`` or [T, D], one image for every text. With one image
        its cross-attention keys/values are computed once for all texts (not per text)."""
        enc = self.encode_texts(texts)
        fusion = _FusionTower(self.model)
        if image_embeds.dim() == 2:
            emb = image_embeds.unsqueeze(0).expand(len(texts), -1, -1)
            with shared_cross_attention_kv(self.model):
                logits = fusion(enc["input_ids"], enc["attention_mask"], emb)
        else:
            logits = fusion(enc["input_ids"], enc["attention_mask"], image_embeds)
        return logits.float().softmax(-1)[:, 1]

    def features(self, encoded):
        """All towers: ITC image/text features, their similarity logits (temperature 0.07),
        the ITC loss, and the ITM logits of the aligned pairs; selected towers without
        fusion: each tower's output (the base default)."""
        if "fusion" not in self.towers and set(self.towers) != {"vision", "text"}:
            return super().features(encoded)
        h = self.model.vision_model(pixel_values=encoded["pixel_values"]).last_hidden_state
        img = self.model.vision_proj(h[:, 0, :])
        txt = _TextTower(self.model)(encoded["input_ids"], encoded["attention_mask"])
        logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() / ITC_TEMPERATURE
        target = torch.arange(len(img), device=img.device)
        itc = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        out = {"vision": img, "text": txt, "logits": logits, "loss": itc}
        if "fusion" in self.towers:
            out["itm"] = _FusionTower(self.model)(encoded["input_ids"], encoded["attention_mask"], h)
        return out

    def loss(self, encoded):
        """ITC (InfoNCE at temperature 0.07) plus ITM (matched vs in-batch shifted pairs)."""
        enc = {k: v for k, v in encoded.items() if k in ("pixel_values", "input_ids", "attention_mask")}
        img_h = self.model.vision_model(pixel_values=enc["pixel_values"]).last_hidden_state
        img = F.normalize(self.model.vision_proj(img_h[:, 0, :]), dim=-1)
        txt = F.normalize(_TextTower(self.model)(enc["input_ids"], enc["attention_mask"]), dim=-1)
        logits = img @ txt.t() / ITC_TEMPERATURE
        target = torch.arange(len(img), device=img.device)
        itc = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        fusion = _FusionTower(self.model)
        pos = fusion(enc["input_ids"], enc["attention_mask"], img_h)
        if len(img) > 1:
            neg = fusion(enc["input_ids"], enc["attention_mask"], img_h.roll(1, dims=0))
            itm_logits = torch.cat([pos, neg])
            labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long().to(pos.device)
        else:
            itm_logits, labels = pos, torch.ones(1, dtype=torch.long, device=pos.device)
        return itc + F.cross_entropy(itm_logits, labels)

    def save(self, path) -> None:
        """Save as HF does; a structurally pruned model also gets its per-layer shapes
        (``vlcompress_manifest.json``) and a README on how to load it."""
        from .surgery import write_manifest

        super().save(path)
        write_manifest(self, path)

    # --- export --------------------------------------------------------------------------
    def tower_module(self, tower: str) -> nn.Module:
        mods = {"vision": _VisionTower, "text": _TextTower, "fusion": _FusionTower}
        if tower not in mods:
            raise ValueError(f"BLIP has no tower {tower!r}; towers: {', '.join(self.towers)}")
        return mods[tower](self.model).eval()

    @torch.no_grad()
    def tower_inputs(self, tower: str, batch: PairBatch) -> dict[str, torch.Tensor]:
        if tower == "vision":
            return {"pixel_values": self.encode_images(batch.images)}
        if tower == "text":
            return self.encode_texts(batch.captions)
        if tower == "fusion":
            px = self.encode_images(batch.images)
            emb = self.model.vision_model(pixel_values=px).last_hidden_state
            return {**self.encode_texts(batch.captions), "image_embeds": emb}
        raise ValueError(f"BLIP has no tower {tower!r}; towers: {', '.join(self.towers)}")

    def dynamic_axes(self, tower: str) -> dict[str, dict[int, str]]:
        if tower == "vision":
            return {"pixel_values": {0: "batch"}, "embeds": {0: "batch"}}
        text = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        if tower == "text":
            return {**text, "embeds": {0: "batch"}}
        return {**text, "image_embeds": {0: "batch"}, "embeds": {0: "batch"}}


@contextmanager
def shared_cross_attention_kv(model):
    """Inside, a cross-attention whose image input is one image broadcast over the batch
    (``expand``: batch stride 0) runs as one sequence: the B texts' L queries become 1 x B*L
    queries against that one image's keys/values. Exact (cross-attention treats each query
    row on its own, the image mask is all ones) and the image's keys/values are projected
    once, not B times, with no broadcast copies: scoring k texts against one image costs
    one image's keys/values plus the texts."""
    hooks, pending = [], {}

    def pre(mod, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states")
        hs = args[0] if args else kwargs.get("hidden_states")
        if ehs is None or hs is None or ehs.dim() != 3 or ehs.shape[0] < 2 or ehs.stride(0) != 0:
            return None
        b, length, d = hs.shape
        pending[mod] = (b, length)
        kwargs = dict(kwargs, encoder_hidden_states=ehs[:1])
        am = kwargs.get("attention_mask")
        if am is not None and am.shape[0] == b:
            kwargs["attention_mask"] = am[:1]
        flat = hs.reshape(1, b * length, d)
        if args:
            return (flat, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=flat)

    def post(mod, args, kwargs, out):
        shape = pending.pop(mod, None)
        if shape is None:
            return None
        ctx, *rest = out
        return (ctx.reshape(*shape, ctx.shape[-1]), *rest)

    for layer in model.text_encoder.encoder.layer:
        xattn = getattr(layer, "crossattention", None)
        if xattn is None:
            continue
        hooks += [xattn.self.register_forward_pre_hook(pre, with_kwargs=True),
                  xattn.self.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _hf_class():
    from transformers import BlipForImageTextRetrieval

    return BlipForImageTextRetrieval


def _default_processors(cfg):
    from transformers import BlipImageProcessor

    from ..data.tokenizer import build_shapes_tokenizer

    size = cfg.vision_config.image_size
    img = BlipImageProcessor(size={"height": size, "width": size})
    return build_shapes_tokenizer(cfg.text_config.max_position_embeddings), img


BLIP.hf_class = staticmethod(_hf_class)
BLIP.default_processors = staticmethod(_default_processors)
