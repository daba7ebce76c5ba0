"""Latency of generative models: the vision part, time to first token and time per generated
token, every variant interleaved in one process, on ONNX Runtime and on PyTorch eager.

    gens = {("onnxruntime", "dense"): OrtGenerator("run/dense"),
            ("onnxruntime", "pruned"): OrtGenerator("run/pruned"),
            ("torch", "dense"): TorchGenerator(dense_vlm), ("torch", "pruned"): TorchGenerator(vlm)}
    rows = time_generation(gens, latency_inputs(vlm, evals, (1, 8)), LatencyConfig())

Three parts per batch size, each one latency row per runtime, shaped as the encoders' rows
(:func:`vlcompress.runtime.latency.compare_latency`: ``dense_ms`` / ``pruned_ms`` summaries,
``speedup`` = dense p50 / pruned p50, the paired raw samples the gate bootstraps):

- ``vision``: the vision graph (pixels to the language model's image embeddings; BLIP: the
  ViT's states the decoder's cross-attention reads);
- ``prefill``: time to first token: vision, embedding, the decoder over the whole prompt and
  the choice of the first token (BLIP: vision, the VQA question encoder, the cross-attention
  keys / values, computed once per request, and the decoder over its start), at the prompt
  length of the user's evaluation data (its first item, repeated to the batch size);
- ``decode``: milliseconds per generated token: one decode step (embedding + decoder with the
  KV cache + the next token), ``unit`` ``ms/token``. Each round prefills every variant
  (untimed), then times ``new_tokens`` (at least :data:`DECODE_TOKENS`) steps, the variants
  interleaved step by step (``A B``, ``B A``, ...: step i of every variant sees the same
  context length, so the samples pair); the tokens are the arg-max, end tokens ignored
  (forced). ``ceil(iterations / new_tokens)`` timed rounds, the first after ``min(warmup,
  new_tokens)`` untimed steps. ``tokens_per_s`` = batch x 1000 / p50.

The vision and prefill parts use the one harness (:func:`~vlcompress.runtime.latency.measure`:
``warmup`` untimed calls, ``iterations`` timed ones, interleaved, collector off). Variants
beyond dense and pruned (a quantized or visual-token variant: any export folder with a
``generation.json``) are timed in the same interleaving and reported under ``variants``
(speedup over dense). ``threads`` sets onnxruntime's intra-op threads and torch's threads
alike (default: the CPUs this process may use), so the two runtimes are compared on the same
cores. On the CPU the host runs the kernels: ``host_bound`` is None, as for the encoders.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import numpy as np

from ..errors import ConfigError
from ..progress import NULL
from .base import Runner
from .latency import host_facts, measure, summary

#: the fewest generated tokens a decode round times
DECODE_TOKENS = 32
PARTS = ("vision", "prefill", "decode")


class _Call(Runner):
    """One entry point of a generator as a runner of the harness."""

    def __init__(self, name: str, fn, runtime: str):
        super().__init__(name)
        self.fn = fn
        self.runtime = runtime

    def _infer(self, feed):
        self.fn(feed)
        return {}


def latency_inputs(vlm, evals, batch_sizes) -> dict[int, dict[str, np.ndarray]]:
    """The inputs of the generative latency at each batch size: the first item of the first
    evaluation set (its image and its prompt: the question, or the caption prompt), repeated
    to the batch size, tokenised by the model's processor and chat template (BLIP: the
    decoder start ``[DEC] prompt``, and for VQA the question, ``ort_generate_blip.blip_inputs``)."""
    from ..eval.generative import validation_items
    from .ort_generate import prompt_inputs

    images, questions = validation_items(evals, 1)
    if not images:
        raise ConfigError("the evaluation data has no item to time generation on")
    out = {}
    if getattr(vlm, "onnx_generation", "llava") == "blip":  # decoder start (+ the question)
        from .ort_generate_blip import blip_inputs

        vqa = vlm.family == "blip-vqa"
        for b in batch_sizes:
            out[int(b)] = blip_inputs(vlm.tokenizer, vlm.image_processor, [images[0]] * int(b),
                                      bos_id=vlm.bos_id, prompt=vlm.prompts["caption"],
                                      questions=[vlm.prompt(questions[0])] * int(b) if vqa
                                      else None)
        return out
    for b in batch_sizes:
        out[int(b)] = prompt_inputs(vlm.processor, [vlm.prompt(questions[0])] * int(b),
                                    [images[0]] * int(b))
    return out


def check_timing_context(inputs: dict[int, dict], context: int, new_tokens: int = DECODE_TOKENS,
                         model: str = "the model", warmup: int = 0) -> int:
    """The prompt length of ``inputs``; one line when the prompt, the ``new_tokens`` timed,
    the warm-up steps and the first token (from the prefill) do not fit the context."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or \
            new_tokens < DECODE_TOKENS:
        raise ConfigError(f"decode timing over {new_tokens!r} new tokens; allowed: an integer "
                          f">= {DECODE_TOKENS}")
    prompt = max(int(v["input_ids"].shape[1]) for v in inputs.values())
    warm = min(int(warmup), new_tokens)
    if prompt + new_tokens + warm + 1 > context:
        raise ConfigError(f"timing decode needs {prompt} prompt tokens + {new_tokens + warm + 1} "
                          f"new tokens (with {warm} warm-up), above the context of {model} "
                          f"({context} tokens); allowed: timed + warm-up tokens <= "
                          f"{context - prompt - 1}")
    return prompt


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _label(key: tuple[str, str]) -> str:
    return f"{key[0]}:{key[1]}"


def variant_feed(gen, feed: dict) -> dict:
    """``feed`` as ``gen`` reads it: a token-reduced export (``--visual-tokens``: its
    ``generation.json`` keeps K of the tower's T image tokens) gets the prompt with K image
    tokens per image (``models.visual_tokens.shrink_prompt``); any other, ``feed`` itself."""
    spec = getattr(gen, "spec", {}) or {}
    k, t = spec.get("image_tokens"), spec.get("tower_tokens")
    if k is None or t is None or int(k) >= int(t):
        return feed
    from ..models.visual_tokens import shrink_prompt

    ids, mask = shrink_prompt(feed["input_ids"], feed["attention_mask"],
                              int(spec["image_token_id"]), int(k))
    return {**feed, "input_ids": ids, "attention_mask": mask}


def _time_decode(gens: dict, feed: dict, config, new_tokens: int) -> dict[str, list[float]]:
    """Per-step decode times, label -> ms (module doc). The first round runs
    ``min(warmup, new_tokens)`` more steps first, untimed (one prefill per variant and round:
    on a large model the prefill costs far more than the steps)."""
    states = {}

    def stepper(key):
        def fn(_feed):
            st = states[key]
            gens[key].step(st, st.logits.argmax(-1))
        return fn

    runners = {_label(k): (_Call(_label(k), stepper(k), k[0]), feed) for k in gens}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(max(1, math.ceil(config.iterations / new_tokens))):
        warm = min(int(config.warmup), new_tokens) if r == 0 else 0
        for k, g in gens.items():  # untimed: a fresh cache of the prompt, room for the round
            f = variant_feed(g, feed)
            states[k] = g.prefill(f["input_ids"], f["attention_mask"], f.get("pixel_values"),
                                  warm + new_tokens + 1, image_embeds=f.get("image_embeds"),
                                  **_question(f))
        for k, v in measure(runners, warmup=warm, iterations=new_tokens).items():
            times[k] += v
    states.clear()
    return times


def _question(feed: dict) -> dict:
    """A BLIP VQA feed's question (``question_ids``, ``question_mask``) as keyword
    arguments of ``prefill``; none for any other feed."""
    return {k: feed[k] for k in ("question_ids", "question_mask") if k in feed}


_CALLS = {
    "vision": lambda g: lambda f: g.image_embeds(f["pixel_values"]),
    "prefill": lambda g: lambda f: g.prefill(f["input_ids"], f["attention_mask"],
                                             f["pixel_values"], 1,
                                             **_question(f)).logits.argmax(-1),
}


def measure_part(gens: dict, part: str, feed: dict, config, new_tokens: int = DECODE_TOKENS
                 ) -> dict:
    """Raw times (ms) of one part (``vision``, ``prefill``, ``decode``) of every generator in
    ``gens`` (key -> generator) on ``feed``, interleaved: key -> list (module doc). The caller
    sets the threads (:func:`torch_threads`)."""
    if part not in PARTS:
        raise ConfigError(f"generation part {part!r} is not valid; allowed: {', '.join(PARTS)}")
    if part == "decode":
        times = _time_decode(gens, feed, config, new_tokens)
    else:
        runners = {_label(k): (_Call(_label(k), _CALLS[part](g), str(k[0])),
                               variant_feed(g, feed)) for k, g in gens.items()}
        times = measure(runners, warmup=config.warmup, iterations=config.iterations)
    return {k: times[_label(k)] for k in gens}


def time_generation(gens: dict[tuple[str, str], object], inputs: dict[int, dict], config, *,
                    new_tokens: int = DECODE_TOKENS, threads: int | None = None,
                    progress=NULL) -> list[dict]:
    """Rows ``vision`` / ``prefill`` / ``decode`` per runtime and batch size (module doc).

    ``gens``: ``(runtime, variant) -> generator`` (:class:`~.ort_generate.OrtGenerator`,
    :class:`~.torch_generate.TorchGenerator`), each runtime with a ``dense`` and a
    ``pruned`` variant; ``inputs``: batch size -> numpy feed (:func:`latency_inputs`);
    ``config``: a :class:`~vlcompress.runtime.registry.LatencyConfig` (batch sizes, warm-up,
    iterations)."""
    runtimes = list(dict.fromkeys(k[0] for k in gens))
    for rt in runtimes:
        for v in ("dense", "pruned"):
            if (rt, v) not in gens:
                raise ConfigError(f"generative latency on {rt} needs a {v} variant; given: "
                                  + ", ".join(_label(k) for k in gens))
    missing = [b for b in config.batch_sizes if b not in inputs]
    if missing:
        raise ConfigError(f"no generation inputs at batch size {missing[0]}")
    threads = int(threads or config.threads or default_threads())
    prompt = check_timing_context(inputs, min(int(g.context) for g in gens.values()), new_tokens,
                                  warmup=config.warmup)
    rows = []
    with torch_threads(threads), \
            progress.task("generation latency", total=len(PARTS) * len(config.batch_sizes)) as t:
        for b in config.batch_sizes:
            feed = inputs[b]
            for part in PARTS:
                times = {_label(k): v for k, v in
                         measure_part(gens, part, feed, config, new_tokens).items()}
                rows += [_row(rt, part, b, times, gens, prompt, new_tokens, threads)
                         for rt in runtimes]
                t.advance()
    return rows


def variant_folders(root, first=("dense", "pruned")) -> dict:
    """The export folders of a run folder ``root`` to time: ``dense``, ``pruned``, then every
    other sub-folder holding a ``generation.json`` (a quantized or visual-token variant)."""
    from pathlib import Path

    from .ort_generate import GENERATION_JSON

    root = Path(root)
    out = {k: root / k for k in first}
    for d in sorted(root.iterdir()):
        if d.name not in out and (d / GENERATION_JSON).is_file():
            out[d.name] = d
    return out


def generative_latency(folders: dict, dense_vlm, pruned_vlm, inputs: dict, config, *,
                       new_tokens: int = DECODE_TOKENS, progress=NULL) -> list[dict]:
    """The latency rows of a generative run: every export folder (``variant -> folder``) on
    ONNX Runtime CPU and the dense and pruned PyTorch models eager, interleaved in one
    measurement (:func:`time_generation`), ``config.threads`` (default: every CPU this
    process may use) for both runtimes."""
    from .ort_generate_blip import open_generator
    from .torch_generate import torch_generator

    threads = int(config.threads or default_threads())
    gens = {("onnxruntime", k): open_generator(f, threads) for k, f in folders.items()}
    gens[("torch", "dense")] = torch_generator(dense_vlm)
    gens[("torch", "pruned")] = torch_generator(pruned_vlm)
    return time_generation(gens, inputs, config, new_tokens=new_tokens, threads=threads,
                           progress=progress)


def _row(rt: str, part: str, batch: int, times: dict, gens: dict, prompt: int,
         new_tokens: int, threads: int) -> dict:
    labels = [k for k in gens if k[0] == rt]
    sm = {k[1]: summary(times[_label(k)]) for k in labels}
    d, p = sm["dense"], sm["pruned"]
    gen = gens[(rt, "pruned")]
    spec = getattr(gen, "spec", {})
    row = {"runtime": rt, "device": "cpu",
           "precision": spec.get("precision", "fp32"),
           "provider": "CPUExecutionProvider" if rt == "onnxruntime" else "torch eager",
           "tower": part, "batch": batch, "unit": "ms/token" if part == "decode" else "ms",
           "prompt_tokens": prompt, "threads": threads,
           "dense_ms": d, "pruned_ms": p,
           "speedup": d["p50"] / p["p50"] if p["p50"] > 0 else float("nan"),
           "dense_samples_ms": [round(x, 4) for x in times[_label((rt, "dense"))]],
           "pruned_samples_ms": [round(x, 4) for x in times[_label((rt, "pruned"))]],
           **host_facts(times, {})}
    if part == "decode":
        row["new_tokens"] = new_tokens
        row["tokens_per_s"] = {v: batch * 1000.0 / s["p50"] for v, s in sm.items()}
    if len(labels) > 2:  # a quantized / visual-token variant beside dense and pruned
        row["variants"] = {k[1]: {"ms": sm[k[1]], "speedup": d["p50"] / sm[k[1]]["p50"],
                                  "precision": getattr(gens[k], "spec", {}).get("precision"),
                                  "image_tokens": getattr(gens[k], "spec", {}).get("image_tokens"),
                                  "samples_ms": [round(x, 4) for x in times[_label(k)]]}
                           for k in labels}
    return row


__all__ = ["time_generation", "generative_latency", "variant_folders", "measure_part",
           "torch_threads", "latency_inputs", "check_timing_context", "DECODE_TOKENS", "PARTS"]
