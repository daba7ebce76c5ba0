"""Tiny random BLIP-2 / OPT models for tests, built offline from HF configs and saved in the
hub layout (config, safetensors, tokenizer, processor), as a user's folder is."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_blip2_model(seed: int = 0, query_tokens: int = 6, cross_every: int = 1):
    """(model, tokenizer): a 3-layer ViT (32 px, patch 8: 17 tokens), a 2-layer Q-Former with
    ``query_tokens`` queries and a 2-layer OPT decoder (4 heads, MLP 64)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from vlcompress.models.blip2 import IMAGE_TOKEN, build_tokenizer

    tok = build_tokenizer()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8, initializer_range=0.02)
    qc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              encoder_hidden_size=32, cross_attention_frequency=cross_every)
    tc = dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
              num_attention_heads=4, vocab_size=image_id + 1, max_position_embeddings=128,
              word_embed_proj_dim=32, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    cfg = Blip2Config(vision_config=vc, qformer_config=qc, text_config=tc,
                      num_query_tokens=query_tokens, image_token_index=image_id)
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so that greedy tokens
        # vary along a sequence and with the image (checked in test_blip2)
        for sub in (model.qformer, model.language_model.model.decoder.layers):
            for p in sub.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.5)
        model.language_model.lm_head.weight.normal_(0, 0.5)
        model.language_projection.weight.normal_(0, 0.5)
    return model, tok


def make_tiny_blip2_folder(root: Path, seed: int = 0, name: str = "blip2", **kw) -> Path:
    from vlcompress.models.blip2 import build_processor

    model, tok = make_tiny_blip2_model(seed, **kw)
    folder = Path(root) / name
    model.save_pretrained(folder)
    build_processor(model.config, tok).save_pretrained(folder)
    return folder
