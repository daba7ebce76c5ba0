"""Tiny random LLaVA models for tests, built offline from HF configs and saved in the hub
layout (config, safetensors, tokenizer, processor, chat template), as a user's folder is."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llava_model(seed: int = 0, vision: str = "clip", text: str = "llama",
                          vocab_size: int | None = None):
    """(model, tokenizer): a CLIP or SigLIP tower (32 px, patch 8: 16 image tokens) and a
    2-layer LLaMA or Qwen2 decoder with grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vlcompress.data import shapes
    from vlcompress.models.llava import IMAGE_TOKEN, build_word_tokenizer

    tok = build_word_tokenizer(shapes.vocabulary())
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vc = dict(model_type=f"{vision}_vision_model", hidden_size=32, intermediate_size=64,
              num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
    tc = dict(model_type=text, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              vocab_size=vocab_size or image_id + 1, pad_token_id=0, bos_token_id=2,
              eos_token_id=3)
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default"
                      if vision == "clip" else "full", pad_token_id=0)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy tokens differ
        model.lm_head.weight.normal_(0, 0.5)
    return model, tok


def make_tiny_llava_folder(root: Path, seed: int = 0, vision: str = "clip", text: str = "llama",
                           name: str = "llava") -> Path:
    from vlcompress.models.llava import build_processor

    model, tok = make_tiny_llava_model(seed, vision, text)
    folder = Path(root) / name
    model.save_pretrained(folder)
    build_processor(model.config, tok).save_pretrained(folder)
    return folder


def prune_export_tiny_llava(out: Path, method: str, pattern: str, *options: str) -> Path:
    """``vlcompress prune-export --model tiny-llava`` into ``out`` with small calibration and
    evaluation sizes (and ``options``); asserts it succeeded."""
    from typer.testing import CliRunner

    from vlcompress.cli import app

    res = CliRunner().invoke(app, ["prune-export", "--model", "tiny-llava", "--method", method,
                                   "--pattern", pattern, "--out", str(out), *options])
    assert res.exit_code == 0, res.output
    return out


def make_generative_run(root: Path, *, max_new_tokens: int = 8, text: str = "llama",
                        seeds: tuple[int, int] = (1, 2)) -> Path:
    """A generative run folder as prune-export writes it, in seconds: dense/ and pruned/
    exports (two random tiny LLaVAs of ``seeds``, so their answers differ; not validated),
    pruned/model (weights, processor, chat template) and a report.json naming the model."""
    import json
    import shutil

    from vlcompress.data import load_eval
    from vlcompress.exporters.generative import export_generative
    from vlcompress.models import load_model

    run = Path(root) / "run"
    images = load_eval("shapes", n=2, batch_size=2).images
    for variant, seed in zip(("dense", "pruned"), seeds, strict=True):
        folder = make_tiny_llava_folder(Path(root) / variant, seed=seed, text=text)
        export_generative(load_model(str(folder)), run / variant, images=images,
                          max_new_tokens=4, validate=False)
    shutil.copytree(folder, run / "pruned" / "model")
    (run / "report.json").write_text(json.dumps({
        "model": {"name": "llava", "family": "llava", "generative": True},
        "config": {"max_new_tokens": max_new_tokens, "batch_sizes": [1, 4]},
        "export": {"paths": {"model": "pruned/model"}}}))
    return run
