"""Tiny random BLIP captioning / VQA models for tests, built offline from HF configs and saved
in the hub layout (config, safetensors, tokenizer, processor), as a user's folder is. The
vision width (48) differs from the text width (32), so cross-attention shapes are checked."""

from __future__ import annotations

from pathlib import Path

import torch

PAD, SEP, DEC = 0, 3, 4


def make_tiny_blip_caption_model(seed: int = 0, vqa: bool = False, layers: int = 2,
                                  context: int = 40):
    """(model, tokenizer): a 2-layer BLIP vision encoder (32 px, patch 8: 17 tokens) and a
    2-layer text decoder (and, ``vqa``, question encoder) over the shapes words. VQA needs
    the vision and text widths equal (the decoder's cross-attention reads the question
    encoder, sized by the same ``encoder_hidden_size``)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering

    from vlcompress.data import shapes
    from vlcompress.models.blip_caption import build_blip_tokenizer

    tok = build_blip_tokenizer(shapes.vocabulary(), pad_id=PAD, sep_id=SEP, bos_id=DEC)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=context,
                encoder_hidden_size=32 if vqa else 48, pad_token_id=PAD, bos_token_id=DEC, eos_token_id=SEP,
                sep_token_id=SEP)
    vision = dict(hidden_size=32 if vqa else 48, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=32, patch_size=8,
                  initializer_range=0.02)  # BLIP's default 1e-10 makes every check vacuous
    torch.manual_seed(seed)
    cls = BlipForQuestionAnswering if vqa else BlipForConditionalGeneration
    model = cls(BlipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy tokens differ
        model.text_decoder.bert.embeddings.word_embeddings.weight.normal_(0, 0.5)
        for layer in model.text_decoder.bert.encoder.layer:  # and a decoder that reads the image
            layer.crossattention.self.value.weight.normal_(0, 0.15)
            layer.crossattention.output.dense.weight.normal_(0, 0.15)
    return model, tok


def make_tiny_blip_caption_folder(root: Path, seed: int = 0, vqa: bool = False,
                                  name: str | None = None, context: int = 40) -> Path:
    """``context``: the decoder's positions (a prune-export that times decode needs the
    prompt, 32 timed tokens and the warm-up to fit: 64)."""
    from vlcompress.models.blip_caption import build_processor

    model, tok = make_tiny_blip_caption_model(seed, vqa, context=context)
    folder = Path(root) / (name or ("blip-vqa" if vqa else "blip-caption"))
    model.save_pretrained(folder)
    build_processor(model.config, tok).save_pretrained(folder)
    return folder
