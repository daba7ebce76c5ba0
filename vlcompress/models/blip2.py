"""BLIP-2 (``Blip2ForConditionalGeneration`` with an OPT decoder): a generative VLM in three
parts, ECoFLaP's setting (Sung et al., ICLR 2024, prune BLIP-2's ViT-g and language model).

- ``vision``: the ViT (``vision_model.encoder.layers``: fused ``qkv``, ``projection``, MLP
  ``fc1``/``fc2``); every layer feeds the Q-Former (its last hidden state);
- ``bridge``: the Q-Former (``qformer.encoder.layer``: self-attention, cross-attention to the
  image tokens every ``cross_attention_frequency`` layers, the query MLP
  ``intermediate_query``/``output_query``; the text-branch MLP never runs in captioning and is
  not listed) and ``language_projection``;
- ``language``: the OPT decoder (``language_model.model.decoder.layers``: ``q/k/v_proj``,
  ``out_proj``, ``fc1``/``fc2``).

**The bridge stays dense by default**, as in ECoFLaP's BLIP-2 code (its pruners list the
ViT's and the language model's blocks only, ylsung/ECoFLaP ``wanda_pruner.py``,
``get_sparsity``): with neither ``--parts`` nor ``--tower``, prune-export prunes vision and
language and the report names the bridge as kept dense (:attr:`Blip2.dense_parts`);
``--parts vision,bridge,language`` prunes the Q-Former too.

Inputs follow transformers 5: the processor (``Blip2Processor``) puts ``num_query_tokens``
image tokens before the text (before the BOS and before any left padding) and the model
scatters the Q-Former's projected outputs into those positions (``masked_scatter``); so the
ONNX generation loop's image-token scatter (:mod:`vlcompress.runtime.ort_generate`) serves it
unchanged. Prompts are BLIP-2's plain-text ones (no chat template): captioning with the
caption prompt (default empty: image tokens + BOS, as HF's captioning example; a model card's
``"prompts": {"caption": ...}`` overrides it, e.g. LAVIS's ``"a photo of"``), questions as
``"Question: {} Answer:"`` (the BLIP-2 paper's OPT prompt). Calibration sequences are image
tokens + BOS + prompt + " " + target + the end token (LAVIS appends OPT's end ``\\n``; the
model's end token here), so the decoder is calibrated on what it will produce.

Structured pruning slices the OPT decoder (heads: q/k/v rows and ``out_proj`` columns; MLP
neurons: ``fc1`` rows, ``fc2`` columns; :data:`OPT_LAYOUT`) and the ViT (BLIP's fused-qkv
layout). The Q-Former is not sliced (its layers match no layout): ``--pattern structured
--parts bridge`` is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError, ModelError
from .base import PrunableLayer
from .generative import GenerativeVLM
from .registry import model_card, register_family
from .surgery import Layout, register_layout

PARTS = ("vision", "bridge", "language")
IMAGE_TOKEN = "<image>"
CAPTION_PROMPT = ""
QUESTION_PROMPT = "Question: {} Answer:"
VISION_TYPES = ("blip_2_vision_model",)
TEXT_TYPES = ("opt",)

VISION_STACK = "vision_model.encoder.layers"
QFORMER_STACK = "qformer.encoder.layer"
LANGUAGE_STACK = "language_model.model.decoder.layers"

_VISION_ROLES = {"self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.o",
                 "mlp.fc1": "mlp.in", "mlp.fc2": "mlp.out"}
_QFORMER_ROLES = {"attention.attention.query": "attn.q", "attention.attention.key": "attn.k",
                  "attention.attention.value": "attn.v", "attention.output.dense": "attn.o",
                  "crossattention.attention.query": "xattn.q",
                  "crossattention.attention.key": "xattn.k",
                  "crossattention.attention.value": "xattn.v",
                  "crossattention.output.dense": "xattn.o",
                  "intermediate_query.dense": "mlp.in", "output_query.dense": "mlp.out"}
_DECODER_ROLES = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k",
                  "self_attn.v_proj": "attn.v", "self_attn.out_proj": "attn.o",
                  "fc1": "mlp.in", "fc2": "mlp.out"}

#: An OPT decoder layer for structured pruning: heads (q/k/v rows, out_proj columns; the
#: attention reshapes by ``num_heads`` and ``head_dim``, so only the head count changes) and
#: MLP neurons (fc1 rows, fc2 columns). OPT has no grouped-query attention.
OPT_LAYOUT = register_layout(Layout(
    "opt-decoder", "self_attn",
    {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
     "attn.o": "self_attn.out_proj", "mlp.in": "fc1", "mlp.out": "fc2"}))

#: words of the presets' and test models' word tokenizer beyond the shapes vocabulary
PROMPT_WORDS = ("question", "answer", ":", "a", "photo", "of")


def check_blip2_config(cfg) -> None:
    """One line when a BLIP-2 config's vision tower or language model is not the one this
    family handles (a FlanT5 BLIP-2 is encoder-decoder: not built)."""
    v = getattr(getattr(cfg, "vision_config", None), "model_type", None)
    if v not in VISION_TYPES:
        raise ModelError(f"blip-2 model's vision tower is {v!r}; allowed: {', '.join(VISION_TYPES)}")
    t = getattr(getattr(cfg, "text_config", None), "model_type", None)
    if t not in TEXT_TYPES:
        raise ModelError(f"blip-2 model's language model is {t!r}; allowed: {', '.join(TEXT_TYPES)} "
                         "(a decoder-only OPT; FlanT5 BLIP-2 is not supported)")
    if getattr(cfg, "image_token_index", None) is None:
        raise ModelError("blip-2 model's config has no image_token_index (a checkpoint from "
                         "before transformers put image tokens in the prompt); allowed: a "
                         "config with image_token_index, as the hub's blip2-opt folders have")


def build_tokenizer(image_id: int | None = None):
    """The word tokenizer of presets and test models (lower-cased words of the shapes captions
    and questions, BLIP-2's prompt words, ``<pad> <unk> <s> </s>`` and ``<image>``)."""
    from ..data import shapes
    from .llava import build_word_tokenizer

    words = [*shapes.vocabulary(), *shapes.vqa_vocabulary(), *PROMPT_WORDS]
    tok = build_word_tokenizer(words, image_id=image_id)
    tok.chat_template = None  # BLIP-2 prompts are plain text
    return tok


def build_processor(cfg, tokenizer, image_processor=None):
    """A ``Blip2Processor`` for ``cfg`` (default image processor: resize + CLIP normalisation at
    the vision config's size, as the hub's BLIP-2 processors)."""
    from transformers import Blip2Processor, BlipImageProcessor

    if image_processor is None:
        s = cfg.vision_config.image_size
        image_processor = BlipImageProcessor(size={"height": s, "width": s})
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                          num_query_tokens=int(cfg.num_query_tokens))


@register_family("blip-2")
class Blip2(GenerativeVLM):
    family = "blip2"
    towers = PARTS
    generative = True
    #: structured: the OPT decoder's heads and neurons, the ViT's heads (fused qkv) and neurons
    structured = True
    structured_parts = ("vision", "language")
    tower_modalities = {p: (p,) for p in PARTS}
    image_towers = PARTS
    #: parts left dense when the user names none (ECoFLaP keeps the Q-Former dense)
    dense_parts = {"bridge": "the Q-Former and language projection stay dense by default, as "
                             "in ECoFLaP's BLIP-2 setting; --parts vision,bridge,language "
                             "prunes them too"}
    VISION_STACK = VISION_STACK
    LANGUAGE_STACK = LANGUAGE_STACK

    def __init__(self, model, tokenizer=None, image_processor=None, name: str = "",
                 source: str = "", processor=None, prompts: dict | None = None):
        super().__init__(model, tokenizer, image_processor, name=name, source=source)
        self._set_processor(model, tokenizer, image_processor, processor, build_processor)
        self.prompts = {"caption": CAPTION_PROMPT, "question": QUESTION_PROMPT, **(prompts or {})}
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._check_processor()

    def _check_processor(self) -> None:
        cfg = self.model.config
        q = getattr(self.processor, "num_query_tokens", None)
        if q != int(cfg.num_query_tokens):
            raise ModelError(f"blip-2 model {self.name!r}: its processor adds {q} image tokens, "
                             f"the model has {cfg.num_query_tokens} query tokens; allowed: a "
                             "processor_config.json with the model's num_query_tokens")
        tid = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tid != int(cfg.image_token_index):
            raise ModelError(f"blip-2 model {self.name!r}: the tokenizer's {IMAGE_TOKEN} is id "
                             f"{tid}, the config's image_token_index {cfg.image_token_index}; "
                             "allowed: the tokenizer the model was saved with")
        if "{}" not in self.prompts["question"]:
            raise DataError(f"blip-2 model {self.name!r}: question prompt "
                            f"{self.prompts['question']!r} has no '{{}}' for the question")

    @property
    def eos_token_id(self) -> int:
        """The end token generation stops at: the generation config's (the hub's blip2-opt
        stops at "\\n"), else the tokenizer's."""
        e = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        e = e[0] if isinstance(e, (list, tuple)) and e else e
        return int(e) if isinstance(e, int) else int(self.tokenizer.eos_token_id)

    # --- loading -------------------------------------------------------------------------
    @staticmethod
    def hf_class():
        from transformers import Blip2ForConditionalGeneration

        return Blip2ForConditionalGeneration

    check_config = staticmethod(check_blip2_config)

    @staticmethod
    def default_processors(cfg):
        """A preset's tokenizer: the word tokenizer with the image token at the config's id."""
        return build_tokenizer(image_id=cfg.image_token_index), None

    @classmethod
    def from_folder(cls, model, path: str, name: str) -> Blip2:
        """The adapter of a model loaded from a hub-layout folder: its processor (tokenizer,
        image processor, ``num_query_tokens``) and the model card's prompts."""
        from transformers import AutoProcessor

        try:
            proc = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, TypeError, KeyError):
            proc = None
        if proc is None or not hasattr(proc, "num_query_tokens"):
            from transformers import AutoImageProcessor, AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                raise ModelError(f"blip-2 model {name!r} has no tokenizer; allowed: a folder with "
                                 "the tokenizer files (tokenizer.json, vocab.json + merges.txt, "
                                 "...)") from None
            try:
                img = AutoImageProcessor.from_pretrained(path)
            except (OSError, ValueError):
                img = None
            proc = build_processor(model.config, tok, img)
        if proc.num_query_tokens is None:  # an old processor config: the model says how many
            proc.num_query_tokens = int(model.config.num_query_tokens)
        card = model_card(Path(path))
        prompts = dict(card.get("prompts") or {})
        if "caption_prompt" in card:
            prompts.setdefault("caption", card["caption_prompt"])
        return cls(model, name=name, source=path, processor=proc, prompts=prompts)

    # --- structure -----------------------------------------------------------------------
    def prunable_layers(self) -> list[PrunableLayer]:
        m = self.model
        out = []
        for stack, roles, modality in ((VISION_STACK, _VISION_ROLES, "vision"),
                                       (QFORMER_STACK, _QFORMER_ROLES, "bridge"),
                                       (LANGUAGE_STACK, _DECODER_ROLES, "language")):
            for b, layer in enumerate(m.get_submodule(stack)):
                for sub, role in roles.items():
                    try:
                        mod = layer.get_submodule(sub)
                    except AttributeError:  # a Q-Former layer without cross-attention
                        continue
                    out.append(PrunableLayer(f"{stack}.{b}.{sub}", mod, modality, role, b))
            if modality == "bridge":  # the projection: a block of its own after the Q-Former
                out.append(PrunableLayer("language_projection", m.language_projection, "bridge",
                                         "mlp.out", len(m.get_submodule(QFORMER_STACK))))
        return out

    def stack_inputs(self, stack: str) -> tuple[str, ...]:
        """The Q-Former reads the ViT (cross-attention, seen by the capture too); the decoder
        reads both through the image-token scatter, which the capture cannot see."""
        if stack == LANGUAGE_STACK:
            return (VISION_STACK, QFORMER_STACK)
        return (VISION_STACK,) if stack == QFORMER_STACK else ()

    # --- prompts and data ----------------------------------------------------------------
    def prompt(self, question: str | None = None) -> str:
        """BLIP-2's text prompt (the processor adds the image tokens and BOS): the caption
        prompt, or the question in :data:`QUESTION_PROMPT`."""
        if question is None:
            return self.prompts["caption"]
        return self.prompts["question"].format(question)

    def _questions(self, batch) -> list[str | None]:
        qs = getattr(batch, "questions", None)
        return list(qs) if qs else [None] * len(batch)

    def _targets(self, batch) -> list[str]:
        ans = getattr(batch, "answers", None)
        if ans is not None:
            return [a[0] if isinstance(a, (list, tuple)) else a for a in ans]
        return list(batch.captions)

    def _pixels(self, images) -> torch.Tensor:
        px = self.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return px.to(self.device, self._dtype)

    def encode(self, batch) -> dict[str, torch.Tensor]:
        """Whole sequences: ``num_query_tokens`` image tokens, BOS + prompt, " " + target and
        the end token, right-padded; ``target_mask``: the positions whose next token belongs
        to the target (next-token metrics on the answer only)."""
        if batch.images is None:
            raise DataError(f"blip-2 model {self.name!r} needs images; the data is text-only")
        tok = self.tokenizer
        cfg = self.model.config
        image = [int(cfg.image_token_index)] * int(cfg.num_query_tokens)
        rows, starts = [], []
        for q, t in zip(self._questions(batch), self._targets(batch), strict=True):
            p = tok(self.prompt(q))["input_ids"]
            tgt = tok(" " + t, add_special_tokens=False)["input_ids"] + [self.eos_token_id]
            starts.append(len(image) + len(p))
            rows.append(image + p + tgt)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), int(tok.pad_token_id), dtype=torch.long)
        am = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
            ids[i, :len(r)] = torch.tensor(r)
            am[i, :len(r)] = 1
            target[i, s - 1:len(r) - 1] = True  # logits at i predict token i + 1
        dev = self.device
        return {"input_ids": ids.to(dev), "attention_mask": am.to(dev),
                "pixel_values": self._pixels(batch.images), "target_mask": target.to(dev)}

    def model_inputs(self, encoded):
        out = {k: v for k, v in encoded.items() if k != "target_mask"}
        out["use_cache"] = False  # no KV cache: the block engine replays layer calls
        return out

    def token_mask(self, modality, encoded):
        return encoded["attention_mask"].bool() if modality == "language" else None

    def loss(self, encoded) -> torch.Tensor:
        """Next-token cross-entropy on the target tokens (BLIP-2's captioning loss; ECoFLaP's
        zeroth-order probes, SNIP)."""
        logits = self.model(**self.model_inputs(encoded)).logits
        mask = encoded["target_mask"][:, :-1]
        return torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(),
                                                 encoded["input_ids"][:, 1:][mask])

    def features(self, encoded) -> dict[str, torch.Tensor]:
        """For distillation: the next-token logits [N, V] at the batch's target positions."""
        logits = self.model(**self.model_inputs(encoded)).logits
        return {"tokens": logits[encoded["target_mask"]]}

    @torch.no_grad()
    def logits(self, encoded) -> torch.Tensor:
        return self.model(**self.model_inputs(encoded)).logits

    def generation_inputs(self, images, questions=None) -> dict[str, torch.Tensor]:
        """Left-padded processor inputs (image tokens first, then padding, BOS and prompt: what
        ``Blip2Processor`` writes and the ONNX loop is fed)."""
        prompts = [self.prompt(q) for q in (questions or [None] * len(images))]
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
        return enc

    @torch.no_grad()
    def generate(self, images, questions=None, max_new_tokens: int = 24) -> list[list[int]]:
        """Greedy token ids (new tokens only, end and padding removed) for each image and
        question (None: the caption prompt), batched with left padding."""
        enc = self.generation_inputs(images, questions)
        tok = self.tokenizer
        out = self.model.generate(**enc, max_new_tokens=int(max_new_tokens), do_sample=False,
                                  num_beams=1, pad_token_id=tok.pad_token_id,
                                  eos_token_id=self.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        stop = {self.eos_token_id, tok.pad_token_id}
        return [seq[:next((i for i, t in enumerate(seq) if t in stop), len(seq))] for seq in new]

    # --- io ------------------------------------------------------------------------------
    def save(self, path) -> None:
        super().save(path)
        path = Path(path)
        from .surgery import write_manifest

        write_manifest(self, path)  # sliced layers: per-layer widths (config.json cannot)
