"""The generative evaluation (:mod:`vlcompress.eval.generative`) run from an exported folder on
ONNX Runtime CPU, so the accuracy of what ships (an fp16 or int8 variant) is measured on its
files, not on a PyTorch stand-in.

    run = ort_run_generative(OrtGenerator("run/pruned_int8"), vlm, eval_data, max_new_tokens=24)
    generative_metrics(run); generative_fidelity(dense_torch_run, run)

The same items as :func:`vlcompress.eval.generative.run_generative`: greedy generation per
distinct image (captions) or per question (VQA), batched with left padding
(:meth:`vlcompress.runtime.ort_generate.OrtGenerator.generate`), and the next-token
log-probabilities of the first ``fidelity_sequences`` whole conversations (the same right-padded
sequences and target positions as ``vlm.encode``), from one prefill call of the decoder graph
each. ``vlm`` supplies the processor, chat template and tokenizer only; its weights are not
used.
"""

from __future__ import annotations

import numpy as np
import torch

from .generative import FIDELITY_SEQUENCES, GenerativeRun, _items, check_max_new_tokens

__all__ = ["ort_run_generative", "ort_logits"]


def ort_logits(gen, input_ids: np.ndarray, attention_mask: np.ndarray,
               pixel_values: np.ndarray) -> np.ndarray:
    """The decoder's logits over whole (right-padded) sequences: one prefill call."""
    mask = attention_mask.astype(np.int64)
    embeds = gen.prompt_embeds(input_ids.astype(np.int64), pixel_values.astype(np.float32))
    positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0).astype(np.int64)
    logits, _ = gen.decode_step(embeds, mask, positions, gen.empty_past(input_ids.shape[0]))
    return logits


def blip_ort_logits(gen, enc: dict) -> np.ndarray:
    """A BLIP export's decoder logits over whole (right-padded) decoder sequences of
    ``vlm.encode`` (captioning: ``input_ids``; VQA: ``decoder_input_ids`` with the question in
    ``input_ids``): the encoder states, their cross keys / values and one prefill call."""
    np_ = {k: v.cpu().numpy() for k, v in enc.items() if k != "target_mask"}
    px = np_["pixel_values"].astype(np.float32)
    if gen.vqa:
        ids, mask = np_["decoder_input_ids"], np_["decoder_attention_mask"]
        states = gen.encoder_states(px, np_["input_ids"], np_["attention_mask"])
    else:
        ids, mask = np_["input_ids"], np_["attention_mask"]
        states = gen.encoder_states(px)
    mask = mask.astype(np.int64)
    positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0).astype(np.int64)
    logits, _ = gen.decode_step(ids, positions, mask, gen.cross_kv(states),
                                gen.empty_past(ids.shape[0]))
    return logits


def _hooks(gen, vlm, max_new_tokens: int):
    """(generate a batch of images / questions, logits of ``vlm.encode``'s batch) on ``gen``:
    BLIP's decoder start and question (``blip_inputs``), or the chat-template prompt."""
    from ..runtime.ort_generate import prompt_inputs

    if getattr(vlm, "onnx_generation", "llava") == "blip":
        from ..runtime.ort_generate_blip import blip_inputs

        def generate(im, qs):
            feed = blip_inputs(vlm.tokenizer, vlm.image_processor, im, bos_id=vlm.bos_id,
                               prompt=vlm.prompts["caption"],
                               questions=[vlm.prompt(q) for q in qs] if gen.vqa else None)
            return gen.generate(feed["input_ids"], feed["attention_mask"], feed["pixel_values"],
                                max_new_tokens, question_ids=feed.get("question_ids"),
                                question_mask=feed.get("question_mask"))

        return generate, lambda enc: blip_ort_logits(gen, enc)

    def generate(im, qs):
        enc = prompt_inputs(vlm.processor, [vlm.prompt(q) for q in qs], im)
        return gen.generate(enc["input_ids"], enc["attention_mask"], enc["pixel_values"],
                            max_new_tokens)

    def logits(enc):
        return ort_logits(gen, enc["input_ids"].cpu().numpy(),
                          enc["attention_mask"].cpu().numpy(),
                          enc["pixel_values"].float().cpu().numpy())

    return generate, logits


def ort_run_generative(gen, vlm, data, *, max_new_tokens: int = 24, batch_size: int = 16,
                       fidelity_sequences: int = FIDELITY_SEQUENCES,
                       progress=None) -> GenerativeRun:
    """A :class:`GenerativeRun` of the export behind ``gen`` (an ``OrtGenerator``, or a
    ``BlipOrtGenerator`` for a BLIP export) on ``data`` (module doc)."""
    from ..progress import NULL

    progress = progress or NULL
    check_max_new_tokens(max_new_tokens)
    task, images, questions, refs = _items(data)
    generate, logits_of = _hooks(gen, vlm, max_new_tokens)
    tokens: list[list[int]] = []
    with progress.task(f"generate onnx {gen.folder.name}", total=len(images)) as t:
        for i in range(0, len(images), batch_size):
            im = images[i:i + batch_size]
            qs = [None] * len(im) if questions is None else questions[i:i + batch_size]
            tokens += generate(im, qs)
            t.advance(len(im))
    logprobs: list[torch.Tensor] = []
    for batch in data.batches():
        if len(logprobs) >= fidelity_sequences:
            break
        enc = vlm.encode(batch)
        lp = torch.log_softmax(torch.from_numpy(np.asarray(logits_of(enc), np.float32)), -1)
        for row, mask in zip(lp, enc["target_mask"].cpu(), strict=True):
            if len(logprobs) < fidelity_sequences:
                logprobs.append(row[mask])
    return GenerativeRun(task, tokens, vlm.decode(tokens), refs, logprobs, len(images))
