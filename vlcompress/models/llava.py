"""LLaVA (``LlavaForConditionalGeneration``): a generative VLM in three parts.

- ``vision``: a CLIP or SigLIP vision tower (``model.vision_tower``), up to the layer whose
  hidden states the model reads (``vision_feature_layer``; layers after it never reach the
  output and are not prunable);
- ``bridge``: the projector (``model.multi_modal_projector``: ``linear_1``, ``linear_2``);
- ``language``: a LLaMA- or Qwen2-family decoder (``model.language_model``), with grouped-
  query attention and a gated MLP (``gate_proj``, ``up_proj``, ``down_proj``).

Each part is one "tower" of the adapter (``select_towers`` / ``--parts``) and one modality of
its prunable layers. Embeddings, the LM head, norms and the patch convolution are never
pruned (docs/design.md, "The model contract"). A prompt is built with the model's own
processor and chat template: one user turn holding the image and the instruction (the
caption prompt, or the question), then the assistant's turn; calibration sequences append
the target text (caption or answer) and the tokenizer's end-of-sequence token, so the
language model is calibrated on the sequences it will produce. Generation is greedy by
default, batched, with left padding.

The caption prompt comes from the model card (``vlcompress.json``: ``"caption_prompt"`` or
``"prompts": {"caption": ...}``) when the folder has one, else :data:`CAPTION_PROMPT`; the
report records the prompt used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError, ModelError
from .base import PrunableLayer
from .clip import encoder_linears
from .generative import GenerativeVLM
from .registry import model_card, register_family
from .surgery import Layout, register_layout
from .visual_tokens import reduced_inputs

CAPTION_PROMPT = "describe the image ."
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
TEXT_TYPES = ("llama", "qwen2", "mistral")
IMAGE_TOKEN = "<image>"
PARTS = ("vision", "bridge", "language")

_DECODER_ROLES = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k",
                  "self_attn.v_proj": "attn.v", "self_attn.o_proj": "attn.o",
                  "mlp.gate_proj": "mlp.in", "mlp.up_proj": "mlp.in", "mlp.down_proj": "mlp.out"}

#: the chat template of presets and test models (word-level; hub folders bring their own)
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endif %}{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}")
WORD_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
#: words of the word-level chat template, prompts and shapes questions
PROMPT_WORDS = ("user", "assistant", ":", "describe", "image", ".", "?", "what", "which",
                "color", "colour", "is", "size", "where", "it", "yes", "no", "how", "big")


def _kv_heads(attn) -> int:
    return int(attn.k_proj.out_features) // int(attn.head_dim)


def _set_decoder_heads(attn, n: int, head_dim: int) -> None:
    """A LLaMA/Qwen2 attention reshapes by ``head_dim`` and repeats each key/value head
    ``num_key_value_groups`` times: that is all that changes with the query head count."""
    kv = _kv_heads(attn)
    if n % kv:
        raise ValueError(f"{n} query heads cannot share {kv} key/value heads evenly")
    attn.num_key_value_groups = n // kv


#: A LLaMA / Qwen2 / Mistral decoder layer for structured pruning: query heads (the k/v
#: projections are not listed: every key/value head stays, and each group keeps the same
#: number of query heads, see ``kv_groups``) and the gated MLP's neurons (gate, up and down
#: rows/columns together). ``head_dim`` is unchanged, so the rotary embedding stays correct.
#: With ``--method-option kv_groups=whole|auto`` whole groups go: the k/v projections
#: (``kv_paths``) lose the group's rows and ``num_key_value_groups`` is set from what stays.
DECODER_LAYOUT = register_layout(Layout(
    "llama-decoder", "self_attn",
    {"attn.q": "self_attn.q_proj", "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj",
     "mlp.in": "mlp.up_proj", "mlp.out": "mlp.down_proj"},
    get_heads=lambda attn: int(attn.q_proj.out_features) // int(attn.head_dim),
    set_heads=_set_decoder_heads, kv_groups=_kv_heads,
    kv_paths={"kv.k": "self_attn.k_proj", "kv.v": "self_attn.v_proj"}))


def conversation(text: str, answer: str | None = None) -> list[dict]:
    """One user turn holding the image and ``text``, and the assistant's ``answer`` if given."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS token in front of the text it encodes."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def single_bos(tokenizer, text: str) -> str:
    """``text`` (a rendered chat template) without its leading BOS when ``tokenizer`` adds one
    itself: hub templates write ``{{ bos_token }}`` and the processor's tokenizer adds BOS
    again, which would give the model two (transformers' own ``apply_chat_template(...,
    tokenize=True)`` avoids it by tokenizing without special tokens; we call the processor on
    text, so the template's copy goes)."""
    bos = getattr(tokenizer, "bos_token", None)
    body = text.lstrip()
    if bos and body.startswith(bos) and adds_bos(tokenizer):
        return body[len(bos):]
    return text


def render_prompt(processor, text: str, name: str = "") -> str:
    """The chat-template prompt of ``processor`` for one image and ``text``, ending where the
    assistant's answer starts (shared by PyTorch generation and the ONNX ``generate``)."""
    out = single_bos(processor.tokenizer,
                     processor.apply_chat_template(conversation(text), add_generation_prompt=True,
                                                   tokenize=False))
    if processor.image_token not in out:
        raise DataError(f"the chat template of {name!r} renders no image token "
                        f"({processor.image_token!r}) for an image turn; allowed: a "
                        "template that places the image token")
    return out


def check_llava_config(cfg) -> None:
    """One line when a LLaVA config's vision tower is not CLIP/SigLIP or its decoder is not of
    the LLaMA/Qwen2 layout."""
    v = getattr(getattr(cfg, "vision_config", None), "model_type", None)
    if v not in VISION_TYPES:
        raise ModelError(f"llava model's vision tower is {v!r}; allowed: "
                         f"{', '.join(VISION_TYPES)} (CLIP or SigLIP vision configs)")
    t = getattr(getattr(cfg, "text_config", None), "model_type", None)
    if t not in TEXT_TYPES:
        raise ModelError(f"llava model's language model is {t!r}; allowed: {', '.join(TEXT_TYPES)}")


def build_word_tokenizer(words, *, image_id: int | None = None):
    """A lower-casing word-level tokenizer over ``words`` plus ``<pad> <unk> <s> </s>`` and the
    image token (id ``image_id``, default: the next free id), with the word chat template.
    For presets (random weights) and test models: no file is downloaded."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(WORD_SPECIALS)}
    for w in list(words) + list(PROMPT_WORDS):
        vocab.setdefault(w, len(vocab))
    vocab[IMAGE_TOKEN] = len(vocab) if image_id is None else int(image_id)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True) for t in (*WORD_SPECIALS, IMAGE_TOKEN)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>")
    out.chat_template = WORD_CHAT_TEMPLATE
    return out


def build_processor(cfg, tokenizer, image_processor=None, chat_template: str | None = None):
    """A ``LlavaProcessor`` for ``cfg`` from a tokenizer and image processor (default: a
    resize/normalise processor at the vision config's size)."""
    from transformers import CLIPImageProcessor, LlavaProcessor, SiglipImageProcessor

    v = cfg.vision_config
    if image_processor is None:
        image_processor = (SiglipImageProcessor(size={"height": v.image_size, "width": v.image_size})
                           if v.model_type == "siglip_vision_model" else
                           CLIPImageProcessor(size={"shortest_edge": v.image_size},
                                              crop_size={"height": v.image_size,
                                                         "width": v.image_size}))
    template = chat_template or getattr(tokenizer, "chat_template", None) or WORD_CHAT_TEMPLATE
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=v.patch_size,
                          vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                          num_additional_image_tokens=1 if v.model_type == "clip_vision_model" else 0,
                          chat_template=template, image_token=IMAGE_TOKEN)


@register_family("llava")
class Llava(GenerativeVLM):
    family = "llava"
    towers = PARTS
    generative = True
    #: structured: the decoder's query heads (grouped-query consistent) and gated-MLP neurons
    #: (:data:`DECODER_LAYOUT`), the CLIP/SigLIP vision tower's heads and neurons (the CLIP
    #: layout); the projector has no groups and stays
    structured = True
    structured_parts = ("vision", "language")
    tower_modalities = {p: (p,) for p in PARTS}
    image_towers = PARTS  # every part reads the image (the decoder through its image tokens)

    def __init__(self, model, tokenizer=None, image_processor=None, name: str = "",
                 source: str = "", processor=None, prompts: dict | None = None):
        super().__init__(model, tokenizer, image_processor, name=name, source=source)
        self._set_processor(model, tokenizer, image_processor, processor, build_processor)
        self.prompts = {"caption": CAPTION_PROMPT, **(prompts or {})}
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # --- loading -------------------------------------------------------------------------
    @staticmethod
    def hf_class():
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    check_config = staticmethod(check_llava_config)

    #: ``(model prefix, checkpoint prefix)``: transformers 5 moved the decoder and the tower
    #: under ``model.``; checkpoints (the hub's, and its own ``save_pretrained``) keep the old
    #: names. Disk offload (``vlcompress.offload``) reads the shards by these names.
    checkpoint_prefixes = (("model.language_model.", "language_model.model."),
                           ("lm_head.", "language_model.lm_head."),
                           ("model.vision_tower.", "vision_tower."),
                           ("model.multi_modal_projector.", "multi_modal_projector."))

    @staticmethod
    def default_processors(cfg):
        """A preset's tokenizer: the word tokenizer with the image token at the config's id."""
        from ..data import shapes

        return build_word_tokenizer(shapes.vocabulary(), image_id=cfg.image_token_index), None

    @classmethod
    def from_folder(cls, model, path: str, name: str) -> Llava:
        """The adapter of a model loaded from a hub-layout folder: its processor (tokenizer,
        image processor, chat template) and the model card's prompts."""
        from transformers import AutoProcessor, AutoTokenizer

        folder = Path(path)
        try:
            proc = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, TypeError, KeyError):
            proc = None
        if proc is None or not hasattr(proc, "image_token"):
            try:
                tok = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                raise ModelError(f"llava model {name!r} has no tokenizer; allowed: a folder with "
                                 "the tokenizer files (tokenizer.json, tokenizer.model, ...)") from None
            img = getattr(proc, "image_processor", None) if proc is not None else None
            if img is None:
                from transformers import AutoImageProcessor

                try:
                    img = AutoImageProcessor.from_pretrained(path)
                except (OSError, ValueError):
                    img = None
            template = None
            if (folder / "chat_template.jinja").is_file():
                template = (folder / "chat_template.jinja").read_text()
            if template is None and getattr(tok, "chat_template", None) is None:
                raise ModelError(f"llava model {name!r} has no chat template; allowed: a folder "
                                 "with chat_template.jinja (or one in its tokenizer config)")
            proc = build_processor(model.config, tok, img, template)
        if getattr(proc, "chat_template", None) is None:
            raise ModelError(f"llava model {name!r} has no chat template; allowed: a folder with "
                             "chat_template.jinja (or one in its tokenizer config)")
        card = model_card(folder)
        prompts = dict(card.get("prompts") or {})
        if "caption_prompt" in card:  # tiny-llava's card: the prompt it was trained with
            prompts.setdefault("caption", card["caption_prompt"])
        vlm = cls(model, name=name, source=path, processor=proc, prompts=prompts)
        vlm.prompt("?")  # the template must hold the image token: refused now, not mid-run
        return vlm

    # --- structure -----------------------------------------------------------------------
    @property
    def used_vision_layers(self) -> int:
        """How many vision encoder layers feed the projector (``vision_feature_layer``)."""
        cfg = self.model.config
        n = int(cfg.vision_config.num_hidden_layers)
        fl = cfg.vision_feature_layer
        fl = max(fl) if isinstance(fl, (list, tuple)) and all(f >= 0 for f in fl) else fl
        if isinstance(fl, (list, tuple)):
            fl = max(f if f >= 0 else n + 1 + f for f in fl)
        return int(fl) if fl >= 0 else n + 1 + int(fl)

    LANGUAGE_STACK = "model.language_model.layers"

    @property
    def VISION_STACK(self) -> str:  # noqa: N802 (a path, like LANGUAGE_STACK)
        """The vision encoder's layer list (transformers 5 flattens ``vision_model``)."""
        tower = self.model.model.vision_tower
        inner = "vision_model." if hasattr(tower, "vision_model") else ""
        return f"model.vision_tower.{inner}encoder.layers"

    def prunable_layers(self) -> list[PrunableLayer]:
        m = self.model.model
        stack = self.model.get_submodule(self.VISION_STACK)
        vis = encoder_linears(stack[:self.used_vision_layers], self.VISION_STACK, "vision")
        proj = m.multi_modal_projector
        bridge = [PrunableLayer("model.multi_modal_projector.linear_1", proj.linear_1, "bridge",
                                "mlp.in", 0),
                  PrunableLayer("model.multi_modal_projector.linear_2", proj.linear_2, "bridge",
                                "mlp.out", 0)]
        lang = []
        for b, layer in enumerate(m.language_model.layers):
            for sub, role in _DECODER_ROLES.items():
                lang.append(PrunableLayer(f"{self.LANGUAGE_STACK}.{b}.{sub}",
                                          layer.get_submodule(sub), "language", role, b))
        return vis + bridge + lang

    def stack_inputs(self, stack: str) -> tuple[str, ...]:
        """The decoder reads the vision tower (through the projector): the block engine
        captures its inputs after the vision tower is pruned."""
        return (self.VISION_STACK,) if stack == self.LANGUAGE_STACK else ()

    # --- prompts and data ----------------------------------------------------------------
    def _conversation(self, question: str | None, answer: str | None = None) -> list[dict]:
        return conversation(self.prompts["caption"] if question is None else question, answer)

    def prompt(self, question: str | None = None) -> str:
        """The chat-template prompt for one image and ``question`` (None: the caption
        prompt), ending where the assistant's answer starts."""
        return render_prompt(self.processor, self.prompts["caption"] if question is None
                             else question, self.name)

    def _questions(self, batch) -> list[str | None]:
        qs = getattr(batch, "questions", None)
        return list(qs) if qs else [None] * len(batch)

    def _targets(self, batch) -> list[str]:
        ans = getattr(batch, "answers", None)
        if ans is not None:
            return [a[0] if isinstance(a, (list, tuple)) else a for a in ans]
        return list(batch.captions)

    def encode(self, batch) -> dict[str, torch.Tensor]:
        """Whole conversations (image tokens + prompt + the target as the assistant's turn,
        rendered by the model's chat template, end token included), right-padded, and
        ``target_mask``: the positions whose next token belongs to the assistant's turn (for
        next-token metrics on the answer only)."""
        if batch.images is None:
            raise DataError(f"llava model {self.name!r} needs images; the data is text-only")
        qs = self._questions(batch)
        prompts = [self.prompt(q) for q in qs]
        texts = [single_bos(self.tokenizer, self.processor.apply_chat_template(
                     self._conversation(q, t), tokenize=False))
                 for q, t in zip(qs, self._targets(batch), strict=True)]
        tok = self.tokenizer
        old = tok.padding_side
        tok.padding_side = "right"
        try:
            enc = self.processor(images=list(batch.images), text=texts, padding=True,
                                 return_tensors="pt")
            plen = self.processor(images=list(batch.images), text=prompts, padding=True,
                                  return_tensors="pt")["attention_mask"].sum(1)
        finally:
            tok.padding_side = old
        am = enc["attention_mask"]
        pos = torch.arange(am.shape[1]).unsqueeze(0)
        # logits at position i predict token i+1: the targets start at index plen
        target = (pos >= (plen - 1).unsqueeze(1)) & (pos < (am.sum(1) - 1).unsqueeze(1))
        dev = self.device
        out = {"input_ids": enc["input_ids"].to(dev), "attention_mask": am.to(dev),
               "pixel_values": enc["pixel_values"].to(dev, self._dtype),
               "target_mask": target.to(dev)}
        # --visual-tokens (models.visual_tokens): the kept tokens at their full-prompt positions
        return reduced_inputs(self.model, out, precomputed=False)

    def model_inputs(self, encoded):
        out = {k: v for k, v in encoded.items() if k != "target_mask"}
        out["use_cache"] = False  # no KV cache: the block engine replays layer calls
        return out

    def token_mask(self, modality, encoded):
        return encoded["attention_mask"].bool() if modality == "language" else None

    def loss(self, encoded) -> torch.Tensor:
        """The model's own training loss: next-token cross-entropy on the target tokens (the
        assistant's turn), as LLaVA is trained (gradients on; SNIP, ECoFLaP)."""
        logits = self.model(**self.model_inputs(encoded)).logits
        mask = encoded["target_mask"][:, :-1]
        return torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(),
                                                 encoded["input_ids"][:, 1:][mask])

    def features(self, encoded) -> dict[str, torch.Tensor]:
        """For distillation (gradients on): ``tokens``, the next-token logits [N, V] at the
        N target positions (the assistant's turn) of the batch; ``vlcompress.distill`` takes
        their KL to the teacher's (recovery of a pruned generative model)."""
        logits = self.model(**self.model_inputs(encoded)).logits
        return {"tokens": logits[encoded["target_mask"]]}

    @torch.no_grad()
    def logits(self, encoded) -> torch.Tensor:
        return self.model(**self.model_inputs(encoded)).logits

    @torch.no_grad()
    def generate(self, images, questions=None, max_new_tokens: int = 24) -> list[list[int]]:
        """Greedy token ids (new tokens only, end-of-sequence and padding removed) for each
        image and question (None: the caption prompt), batched with left padding."""
        prompts = [self.prompt(None if questions is None else q)
                   for q in (questions or [None] * len(images))]
        tok = self.tokenizer
        old = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = self.processor(images=list(images), text=prompts, padding=True,
                                 return_tensors="pt")
        finally:
            tok.padding_side = old
        enc = {k: v.to(self.device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(self._dtype)
        enc = reduced_inputs(self.model, enc, precomputed=True)  # --visual-tokens
        out = self.model.generate(**enc, max_new_tokens=int(max_new_tokens), do_sample=False,
                                  num_beams=1, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        stop = {tok.eos_token_id, tok.pad_token_id}
        res = []
        for seq in new:
            cut = next((i for i, t in enumerate(seq) if t in stop), len(seq))
            res.append(seq[:cut])
        return res

    # --- io ------------------------------------------------------------------------------
    def save(self, path) -> None:
        super().save(path)
        path = Path(path)
        from .surgery import is_sliced, write_manifest

        if is_sliced(self):  # weights under the module names the manifest's rebuild loads:
            # save_pretrained writes LLaVA's legacy checkpoint names, which only
            # from_pretrained's renaming (not a strict load_state_dict) maps back
            from safetensors.torch import save_model

            for f in [*path.glob("*.safetensors"), *path.glob("*.safetensors.index.json")]:
                f.unlink()
            save_model(self.model, str(path / "model.safetensors"))
        write_manifest(self, path)  # sliced layers: per-layer widths (config.json cannot)
