"""Why a generative export does not run in ONNX Runtime GenAI as it is, and that it does with
vlcompress's adapter: each attempt loads the export of RUN (dense/) with one genai_config.json
and generates a token; the error GenAI raises is printed.

    python scripts/genai_probe.py RUN        # RUN: a generative prune-export run folder

Expected (onnxruntime-genai 0.18.0):
    llama, decoder fed inputs_embeds: RuntimeError: Model input was not found: input_ids
    llama + embedding = embed.onnx: RuntimeError: Decoder-only CPU embedding requires the
        dynamic-batching Engine.
    gemma3 pipeline, our embed.onnx: RuntimeError: Model input was not found: image_features
    llava: RuntimeError: Unsupported model_type in config.json: llava
    gemma3 pipeline + embed_merge.onnx (GenaiGenerator, a batch of 8, [...] pad tokens per
        row): ran, rows equal to OrtGenerator: 8/8
    the same batch handed to GenAI left-padded as it is: rows equal to OrtGenerator: k/8
        (GenAI masks trailing pad tokens only: it attends to the leading ones; measured 8/8 on
        the tiny-llava run, whose answers survive a few attended pads, 7/8 on the random
        Qwen2 run of tests/llava_factory.make_generative_run)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def attempt(src: Path, label: str, edit) -> None:
    import onnxruntime_genai as og

    from vlcompress.runtime.genai_generate import genai_config

    with tempfile.TemporaryDirectory() as d:
        for f in ("vision.onnx", "embed.onnx", "decoder.onnx"):
            os.symlink(src / f, Path(d) / f)
        cfg = genai_config(src)
        edit(cfg["model"])
        (Path(d) / "genai_config.json").write_text(json.dumps(cfg))
        try:
            m = og.Model(d)
            g = og.Generator(m, og.GeneratorParams(m))
            g.append_tokens(np.array([[2, 5, 6]], np.int32))
            g.generate_next_token()
            print(f"{label}: ran")
        except Exception as exc:  # noqa: BLE001 - the point is GenAI's own message
            print(f"{label}: {type(exc).__name__}: {exc}")


def main(run: str) -> None:
    from vlcompress.data import load_eval
    from vlcompress.exporters.triton import processor_dir
    from vlcompress.runtime.gen_inputs import PromptEncoder
    from vlcompress.runtime.genai_generate import GenaiGenerator
    from vlcompress.runtime.ort_generate import OrtGenerator

    src = (Path(run) / "dense").resolve()
    plain_embed = {"filename": "embed.onnx", "inputs": {"input_ids": "input_ids"},
                   "outputs": {"inputs_embeds": "inputs_embeds"}}

    def llama(m):
        m.update(type="llama")
        del m["vision"], m["embedding"]

    def llama_embed(m):
        m.update(type="llama", embedding=plain_embed)
        del m["vision"]

    attempt(src, "llama, decoder fed inputs_embeds", llama)
    attempt(src, "llama + embedding = embed.onnx", llama_embed)
    attempt(src, "gemma3 pipeline, our embed.onnx", lambda m: m.update(embedding=plain_embed))
    attempt(src, "llava", lambda m: m.update(type="llava"))
    report = json.loads((Path(run) / "report.json").read_text())
    gen = GenaiGenerator(src)
    enc = PromptEncoder(processor_dir(Path(run), report), report["model"]["name"], gen.context)
    prompts = ["describe the picture.", "what color is the shape in the picture ?",
               "what shape is it ?", "is there a red square ?"] * 2
    e = enc.encode(load_eval("shapes", n=8, batch_size=8).images, prompts)
    feeds = (e["input_ids"], e["attention_mask"], e["pixel_values"])
    pads = sorted(set((e["attention_mask"] == 0).sum(-1).tolist()))
    want = OrtGenerator(src).generate(*feeds, 12)

    def rows_equal(got):
        return f"{sum(g == w for g, w in zip(got, want, strict=True))}/{len(want)}"

    print(f"gemma3 pipeline + embed_merge.onnx (GenaiGenerator, a batch of 8, {pads} pad tokens "
          f"per row): ran, rows equal to OrtGenerator: {rows_equal(gen.generate(*feeds, 12))}")
    gen.right_padded = lambda ids, mask: ids.astype(np.int32)  # GenAI reads the layout as is
    print("the same batch handed to GenAI left-padded as it is: rows equal to OrtGenerator: "
          f"{rows_equal(gen.generate(*feeds, 12))}")
    gen.close()


if __name__ == "__main__":
    main(sys.argv[1])
