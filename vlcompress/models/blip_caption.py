"""BLIP captioning (``BlipForConditionalGeneration``) and BLIP VQA
(``BlipForQuestionAnswering``): generative families (Li et al., ICML 2022).

Parts (each one "tower" of the adapter, ``--parts``, and one modality of its layers):

- ``vision``: the ViT encoder (fused ``qkv``, ``projection``, ``fc1``, ``fc2`` per layer);
- ``text`` (VQA only): the question encoder (``text_encoder``, a BERT with cross-attention to
  the image tokens; its cross-attention belongs to this part);
- ``language``: the text decoder (``text_decoder.bert``: causal self-attention,
  cross-attention to the image tokens, or to the question encoder's states for VQA, and the
  feed-forward). The LM head (tied to the word embeddings), embeddings and norms are never
  pruned.

Both models share ``model_type`` ``blip`` with the retrieval model (:mod:`.blip`):
the registry picks the family from the config's ``architectures``.

Structured pruning reuses the BLIP layouts of :mod:`.blip` (heads across the vision
encoder's fused ``qkv``; each ``BlipTextLayer``'s self-attention heads with its MLP neurons,
and its cross-attention heads as their own unit), so UPop and EfficientVLM slice the
decoder's heads and neurons, cross-attention included, into a smaller dense model that
reloads (``vlcompress_manifest.json``; :mod:`.surgery`).

Sequences, as BLIP trains and generates them (``salesforce/BLIP`` ``blip.py`` /
``blip_vqa.py``; transformers' ``generate``):

- captioning: the tokenizer's ``[CLS] prompt caption [SEP]`` with the first token replaced by
  the decoder's start token (``text_config.bos_token_id``, ``[DEC]``); generation starts from
  ``[DEC] prompt`` and stops at ``[SEP]`` (``text_config.sep_token_id``). The prompt comes from
  the model card (``vlcompress.json``: ``"prompts": {"caption": ...}``), else
  :data:`CAPTION_PROMPT` (BLIP's own ``"a picture of "``); the generated tokens are those
  after the prompt.
- VQA: the question goes through the text encoder (``[CLS] question [SEP]``, padded as the
  tokenizer pads: right; BLIP's text encoder has absolute positions), the decoder starts from
  ``[DEC]`` and cross-attends the question states. transformers' BLIP text layers hand no
  mask to a cross-attention (``BlipTextAttention`` drops it), so every question position is
  attended, padding included: an answer can change with the batch's longest question. We
  keep PyTorch's computation (the ONNX export matches it token for token) and say so here.
  Caption data given to a VQA model is read as the caption prompt as the question and the
  caption as the answer.

Generation is greedy, batched; caption prompts are left-padded (every prompt is the same, so
no padding arises), questions padded as the tokenizer pads (right: BLIP's text encoder has
absolute positions, left padding would shift them).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataError, ModelError
from .base import PrunableLayer
from .blip import _VISION_ROLES, text_linears
from .generative import GenerativeVLM
from .registry import model_card, register_family

#: BLIP's captioning prompt (``salesforce/BLIP`` ``configs/caption_coco.yaml``: "a picture of ")
CAPTION_PROMPT = "a picture of"
CAPTION_PARTS = ("vision", "language")
VQA_PARTS = ("vision", "text", "language")
VISION_STACK = "vision_model.encoder.layers"
DECODER_STACK = "text_decoder.bert.encoder.layer"
ENCODER_STACK = "text_encoder.encoder.layer"
#: special tokens of the word tokenizer of presets and tests (BERT names; [DEC] starts decoding)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]")
PROMPT_WORDS = ("a", "picture", "of", "what", "which", "color", "colour", "is", "the", "shape",
                "size", "where", "it", "?", ".", "yes", "no", "describe", "image")


def build_blip_tokenizer(words, *, pad_id: int = 0, sep_id: int = 102, bos_id: int = 30522):
    """A BERT-style lower-casing word tokenizer (``[CLS] text [SEP]``) over ``words``, with
    ``[PAD]``, ``[SEP]`` and the decoder start token ``[DEC]`` at the ids a BLIP text config
    names (``pad_token_id``, ``sep_token_id``, ``bos_token_id``); the other tokens take the
    free ids from 0 up. For presets (random weights) and tests: nothing is downloaded."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": int(pad_id), "[SEP]": int(sep_id), "[DEC]": int(bos_id)}
    used = set(vocab.values())
    nxt = 0
    for w in ["[UNK]", "[CLS]", *words, *PROMPT_WORDS]:
        if w in vocab:
            continue
        while nxt in used:
            nxt += 1
        vocab[w] = nxt
        used.add(nxt)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                 ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", bos_token="[DEC]")


def build_processor(cfg, tokenizer, image_processor=None):
    """A ``BlipProcessor`` for ``cfg`` (default image processor: resize / normalise at the
    vision config's size, BLIP's)."""
    from transformers import BlipImageProcessor, BlipProcessor

    if image_processor is None:
        s = cfg.vision_config.image_size
        image_processor = BlipImageProcessor(size={"height": s, "width": s})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def check_blip_config(cfg) -> None:
    """One line when a BLIP captioning / VQA config is not BLIP's vision + text pair."""
    v = getattr(getattr(cfg, "vision_config", None), "model_type", None)
    t = getattr(getattr(cfg, "text_config", None), "model_type", None)
    if v != "blip_vision_model" or t != "blip_text_model":
        raise ModelError(f"BLIP generative model has vision {v!r} and text {t!r} configs; "
                         "allowed: blip_vision_model and blip_text_model")


def _default_processors(cfg):
    """A preset's tokenizer: the shapes words, specials at the text config's ids."""
    from ..data import shapes

    tc = cfg.text_config
    tok = build_blip_tokenizer(shapes.vocabulary(), pad_id=tc.pad_token_id,
                               sep_id=tc.sep_token_id, bos_id=tc.bos_token_id)
    return tok, None


def decoder_start(tokenizer, prompt: str, n: int, bos_id: int, return_tensors: str = "pt"):
    """The decoder's start for ``n`` captions, ``(ids, mask)``, left-padded: the tokenizer's
    ``[CLS] prompt [SEP]`` with [CLS] replaced by ``[DEC]`` (``bos_id``) and [SEP] dropped,
    as ``BlipForConditionalGeneration.generate`` feeds its decoder (PyTorch and the ONNX
    generator both start here)."""
    with _with_padding(tokenizer, "left"):
        enc = tokenizer([prompt] * n, padding=True, return_tensors=return_tensors)
    ids = enc["input_ids"].copy() if return_tensors == "np" else enc["input_ids"].clone()
    ids[:, 0] = bos_id
    return ids[:, :-1], enc["attention_mask"][:, :-1]


def _with_padding(tok, side: str):
    class _Side:
        def __enter__(self):
            self.old = tok.padding_side
            tok.padding_side = side

        def __exit__(self, *exc):
            tok.padding_side = self.old

    return _Side()


@register_family("blip-caption", architectures=("BlipForConditionalGeneration",))
class BlipCaption(GenerativeVLM):
    """``BlipForConditionalGeneration``: vision encoder + text decoder (module doc)."""

    family = "blip-caption"
    towers = CAPTION_PARTS
    generative = True
    answers_questions = False  # VQA data is refused before any work (pipeline)
    #: its ONNX export: vision + decoder with cross-attention (exporters.generative_blip)
    onnx_generation = "blip"
    export_module = "vlcompress.exporters.generative_blip"
    #: UPop / EfficientVLM distil it (next-token logits at the caption positions, ``features``)
    image_text = True
    structured = True
    structured_parts = CAPTION_PARTS
    tower_modalities = {p: (p,) for p in VQA_PARTS}
    image_towers = VQA_PARTS  # every part reads the image (the decoder by cross-attention)

    def __init__(self, model, tokenizer=None, image_processor=None, name: str = "",
                 source: str = "", processor=None, prompts: dict | None = None):
        super().__init__(model, tokenizer, image_processor, name=name, source=source)
        self._set_processor(model, tokenizer, image_processor, processor, build_processor)
        self.prompts = {"caption": CAPTION_PROMPT, **(prompts or {})}
        tc = model.config.text_config
        self.bos_id, self.sep_id, self.pad_id = (int(tc.bos_token_id), int(tc.sep_token_id),
                                                 int(tc.pad_token_id))

    # --- loading -------------------------------------------------------------------------
    @staticmethod
    def hf_class():
        from transformers import BlipForConditionalGeneration

        return BlipForConditionalGeneration

    check_config = staticmethod(check_blip_config)
    default_processors = staticmethod(_default_processors)

    @classmethod
    def from_folder(cls, model, path: str, name: str):
        """The adapter of a model loaded from a hub-layout folder: its processor (tokenizer,
        image processor) and the model card's prompts."""
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        try:
            proc = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, TypeError, KeyError):
            proc = None
        if proc is None or not hasattr(proc, "tokenizer") or not hasattr(proc, "image_processor"):
            try:
                tok = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                raise ModelError(f"{cls.family} model {name!r} has no tokenizer; allowed: a folder "
                                 "with the tokenizer files (tokenizer.json, vocab.txt, ...)") from None
            try:
                img = AutoImageProcessor.from_pretrained(path)
            except (OSError, ValueError):
                img = None
            proc = build_processor(model.config, tok, img)
        card = model_card(Path(path))
        prompts = dict(card.get("prompts") or {})
        vlm = cls(model, name=name, source=path, processor=proc, prompts=prompts)
        vlm._check_tokens()
        return vlm

    def _check_tokens(self) -> None:
        """The tokenizer must wrap text in [CLS] ... [SEP] (the first token is replaced by the
        decoder start, the last dropped for generation): refused now, not mid-run."""
        ids = self.tokenizer("a")["input_ids"]
        if len(ids) < 2 or ids[-1] != self.sep_id:
            raise ModelError(f"the tokenizer of {self.name!r} does not end a text with the "
                             f"decoder's end token (sep_token_id {self.sep_id}); allowed: BLIP's "
                             "BERT tokenizer ([CLS] text [SEP])")

    # --- structure -----------------------------------------------------------------------
    def _vision_layers(self) -> list[PrunableLayer]:
        out = []
        for b, layer in enumerate(self.model.vision_model.encoder.layers):
            for sub, role in _VISION_ROLES.items():
                out.append(PrunableLayer(f"{VISION_STACK}.{b}.{sub}", layer.get_submodule(sub),
                                         "vision", role, b))
        return out

    def prunable_layers(self) -> list[PrunableLayer]:
        return self._vision_layers() + text_linears(
            self.model.text_decoder.bert.encoder.layer, DECODER_STACK, text="language",
            cross="language")

    def stack_inputs(self, stack: str) -> tuple[str, ...]:
        """The decoder reads the image tokens (cross-attention): captured after the vision
        encoder is pruned."""
        return (VISION_STACK,) if stack == DECODER_STACK else ()

    def token_mask(self, modality, encoded):
        return encoded["attention_mask"].bool() if modality == "language" else None

    # --- prompts and data ----------------------------------------------------------------
    def prompt(self, question: str | None = None) -> str:
        return self.prompts["caption"] if question is None else question

    def _targets(self, batch) -> list[str]:
        ans = getattr(batch, "answers", None)
        if ans:
            return [a[0] if isinstance(a, (list, tuple)) else a for a in ans]
        return list(batch.captions)

    def _pixels(self, images) -> torch.Tensor:
        px = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return px.to(self.device, self._dtype)

    def _decoder_text(self, texts: list[str], prompt_len: list[int] | None = None):
        """Right-padded decoder sequences ``[DEC] ... [SEP]`` of ``texts`` and their target
        mask: positions whose next token is a target (after the first ``prompt_len`` tokens,
        start token included; the [SEP] predicted last)."""
        with _with_padding(self.tokenizer, "right"):
            enc = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        ids = enc["input_ids"].clone()
        ids[:, 0] = self.bos_id
        am = enc["attention_mask"]
        plen = torch.tensor(prompt_len or [1] * len(texts))
        pos = torch.arange(am.shape[1]).unsqueeze(0)
        target = (pos >= (plen - 1).unsqueeze(1)) & (pos < (am.sum(1) - 1).unsqueeze(1))
        return ids, am, target

    def _prompt_len(self) -> int:
        """Tokens of ``[DEC] prompt`` (the tokenized prompt without its [SEP])."""
        return len(self.tokenizer(self.prompts["caption"])["input_ids"]) - 1

    def encode(self, batch) -> dict[str, torch.Tensor]:
        """``[DEC] prompt caption [SEP]`` per pair, right-padded, the pixels and
        ``target_mask`` (positions whose next token is a caption token or the end)."""
        if batch.images is None:
            raise DataError(f"{self.family} model {self.name!r} needs images; the data is "
                            "text-only")
        prompt = self.prompts["caption"]
        texts = [f"{prompt} {t}".strip() for t in self._targets(batch)]
        ids, am, target = self._decoder_text(texts, [self._prompt_len()] * len(texts))
        dev = self.device
        return {"pixel_values": self._pixels(batch.images), "input_ids": ids.to(dev),
                "attention_mask": am.to(dev), "target_mask": target.to(dev)}

    def model_inputs(self, encoded):
        out = {k: v for k, v in encoded.items() if k != "target_mask"}
        out["use_cache"] = False  # no KV cache: the block engine replays layer calls
        return out

    def logits(self, encoded) -> torch.Tensor:
        with torch.no_grad():
            return self._logits(encoded)

    def _logits(self, encoded) -> torch.Tensor:
        return self.model(**self.model_inputs(encoded)).logits

    def loss(self, encoded) -> torch.Tensor:
        """BLIP's captioning loss: next-token cross-entropy on the caption tokens and the
        end token (the prompt masked, as ``blip.py``'s ``decoder_targets[:, :prompt_length]
        = -100``; no label smoothing)."""
        logits = self._logits(encoded)
        mask = encoded["target_mask"][:, :-1]
        ids = self._label_ids(encoded)
        return F.cross_entropy(logits[:, :-1][mask].float(), ids[:, 1:][mask])

    def _label_ids(self, encoded):
        return encoded["input_ids"]

    def features(self, encoded) -> dict[str, torch.Tensor]:
        """For distillation (gradients on): ``tokens``, the next-token logits at the target
        positions (recovery, UPop / EfficientVLM's distillation loss)."""
        return {"tokens": self._logits(encoded)[encoded["target_mask"]]}

    def _cut(self, rows: list[list[int]]) -> list[list[int]]:
        stop = {self.sep_id, self.pad_id}
        return [r[:next((i for i, t in enumerate(r) if t in stop), len(r))] for r in rows]

    def prompt_ids(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[DEC] prompt`` ids and mask for ``n`` rows (:func:`decoder_start`)."""
        return decoder_start(self.tokenizer, self.prompts["caption"], n, self.bos_id)

    @torch.no_grad()
    def generate(self, images, questions=None, max_new_tokens: int = 24) -> list[list[int]]:
        """Greedy token ids after the prompt (end and padding removed), one per image."""
        if questions is not None and any(q is not None for q in questions):
            raise DataError(f"{self.family} model {self.name!r} captions images; it answers no "
                            "questions (allowed: caption data, or a BLIP VQA model)")
        ids, am = self.prompt_ids(len(images))
        dev = self.device
        ids, am = ids.to(dev), am.to(dev)
        image_embeds = self.model.vision_model(pixel_values=self._pixels(images))[0]
        img_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=dev)
        out = self.model.text_decoder.generate(
            input_ids=ids, attention_mask=am, encoder_hidden_states=image_embeds,
            encoder_attention_mask=img_mask, eos_token_id=self.sep_id, pad_token_id=self.pad_id,
            max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1)
        return self._cut(out[:, ids.shape[1]:].tolist())

    # --- io ------------------------------------------------------------------------------
    def save(self, path) -> None:
        from .surgery import write_manifest

        super().save(path)
        write_manifest(self, path)


@register_family("blip-vqa", architectures=("BlipForQuestionAnswering",))
class BlipVqa(BlipCaption):
    """``BlipForQuestionAnswering``: vision encoder, question encoder, answer decoder."""

    family = "blip-vqa"
    towers = VQA_PARTS
    answers_questions = True
    structured_parts = VQA_PARTS

    @staticmethod
    def hf_class():
        from transformers import BlipForQuestionAnswering

        return BlipForQuestionAnswering

    def prunable_layers(self) -> list[PrunableLayer]:
        m = self.model
        return (self._vision_layers()
                + text_linears(m.text_encoder.encoder.layer, ENCODER_STACK, text="text",
                               cross="text")
                + text_linears(m.text_decoder.bert.encoder.layer, DECODER_STACK,
                               text="language", cross="language"))

    def stack_inputs(self, stack: str) -> tuple[str, ...]:
        """The question encoder reads the image tokens, the decoder the question encoder's
        states: each waits for the stack it reads."""
        return {ENCODER_STACK: (VISION_STACK,), DECODER_STACK: (ENCODER_STACK,)}.get(stack, ())

    def token_mask(self, modality, encoded):
        if modality == "text":
            return encoded["attention_mask"].bool()
        if modality == "language":
            return encoded["decoder_attention_mask"].bool()
        return None

    def _questions(self, batch) -> list[str]:
        qs = getattr(batch, "questions", None)
        return list(qs) if qs else [self.prompts["caption"]] * len(batch)

    def _question_ids(self, questions: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(questions), padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def encode(self, batch) -> dict[str, torch.Tensor]:
        """The question (``[CLS] question [SEP]``), the answer as the decoder's sequence
        (``[DEC] answer [SEP]``; target: every answer token and the end) and the pixels."""
        if batch.images is None:
            raise DataError(f"{self.family} model {self.name!r} needs images; the data is "
                            "text-only")
        ids, am, target = self._decoder_text(self._targets(batch))
        dev = self.device
        return {"pixel_values": self._pixels(batch.images),
                **self._question_ids(self._questions(batch)),
                "decoder_input_ids": ids.to(dev), "decoder_attention_mask": am.to(dev),
                "target_mask": target.to(dev)}

    def _question_states(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_embeds = self.model.vision_model(pixel_values=pixel_values)[0]
        img_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                              device=image_embeds.device)
        return self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                       encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=img_mask)[0]

    def _logits(self, encoded) -> torch.Tensor:
        """``BlipForQuestionAnswering.forward`` returns no logits: the same computation, the
        decoder's logits kept."""
        q = self._question_states(encoded["pixel_values"], encoded["input_ids"],
                                  encoded["attention_mask"])
        return self.model.text_decoder(input_ids=encoded["decoder_input_ids"],
                                       attention_mask=encoded["decoder_attention_mask"],
                                       encoder_hidden_states=q,
                                       encoder_attention_mask=encoded["attention_mask"],
                                       use_cache=False).logits

    def _label_ids(self, encoded):
        return encoded["decoder_input_ids"]

    @torch.no_grad()
    def generate(self, images, questions=None, max_new_tokens: int = 24) -> list[list[int]]:
        """Greedy answer ids per (image, question) (None: the caption prompt as the
        question): the decoder's ``generate`` from ``[DEC]`` on the question states (what
        ``BlipForQuestionAnswering.generate`` does)."""
        qs = [self.prompts["caption"] if q is None else q
              for q in (questions or [None] * len(images))]
        enc = self._question_ids(qs)
        states = self._question_states(self._pixels(images), enc["input_ids"],
                                       enc["attention_mask"])
        start = torch.full((len(qs), 1), self.bos_id, dtype=torch.long, device=self.device)
        out = self.model.text_decoder.generate(
            input_ids=start, encoder_hidden_states=states,
            encoder_attention_mask=enc["attention_mask"], eos_token_id=self.sep_id,
            pad_token_id=self.pad_id, max_new_tokens=int(max_new_tokens), do_sample=False,
            num_beams=1)
        return self._cut(out[:, 1:].tolist())
