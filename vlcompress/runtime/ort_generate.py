"""Greedy generation of a generative VLM (llava) on ONNX Runtime, over its three exported
graphs (see :mod:`vlcompress.exporters.generative`):

- ``vision.onnx``: ``pixel_values`` -> ``image_embeds`` (the language model's image
  embeddings, projector included);
- ``embed.onnx``: ``input_ids`` -> ``inputs_embeds``;
- ``decoder.onnx``: ``inputs_embeds``, ``attention_mask`` [batch, past + sequence],
  ``position_ids`` and ``past.{i}.key`` / ``past.{i}.value`` per layer -> ``logits`` and
  ``present.{i}.key`` / ``present.{i}.value`` (one merged graph: prefill with an empty past,
  decode with one token).

The loop follows transformers' ``generate`` step for step, so the tokens can be compared one
for one: the image token positions of the prompt embeddings are overwritten with the image
embeddings (``masked_scatter``, in order), position ids are ``cumsum(attention_mask) - 1``
(0 at padding), prompts are left-padded, each step appends the arg-max token and a 1 to the
mask, and a finished row keeps receiving the pad token. It stops when every row has produced
the end token or after ``max_new_tokens``; a row's tokens are cut at its end (or pad) token,
as :meth:`vlcompress.models.llava.Llava.generate` cuts PyTorch's.

The KV cache is passed as plain numpy feeds: each step hands the presents back as the next
step's past (onnxruntime allocates the outputs; no IOBinding, no pre-allocated buffers yet).
``generation.json`` beside the graphs holds what the loop needs (token ids, layer and head
counts, the context length).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ExportError

GENERATION_JSON = "generation.json"
PARTS = ("vision", "embed", "decoder")


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        raise ExportError(f"onnxruntime cannot load {str(path)!r}: "
                          f"{' '.join(str(exc).split())[:200]}") from None


def read_spec(folder: str | Path) -> dict:
    """The ``generation.json`` of an export folder (one line when it is missing)."""
    p = Path(folder) / GENERATION_JSON
    if not p.is_file():
        raise ConfigError(f"{str(folder)!r} holds no generative ONNX export ({GENERATION_JSON} "
                          "missing); allowed: the dense/ or pruned/ folder of a generative "
                          "prune-export run")
    return json.loads(p.read_text())


class OrtGenerator:
    """The three sessions of one export folder and the greedy loop over them."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.spec = read_spec(self.folder)
        self.sessions = {p: _session(self.folder / self.spec["files"][p], threads) for p in PARTS}

    @property
    def context(self) -> int:
        return int(self.spec["context"])

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.sessions["vision"].run(
            None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def prompt_embeds(self, input_ids: np.ndarray, pixel_values: np.ndarray) -> np.ndarray:
        """Token embeddings with the image token positions replaced by the image embeddings."""
        image_id = int(self.spec["image_token_id"])
        is_image = input_ids == image_id
        safe = np.where(is_image & (image_id >= int(self.spec["vocab_size"])), 0, input_ids)
        emb = self.sessions["embed"].run(None, {"input_ids": safe.astype(np.int64)})[0]
        img = self.image_embeds(pixel_values)
        if int(is_image.sum()) != img.shape[0] * img.shape[1]:
            raise ExportError(f"the prompt holds {int(is_image.sum())} image tokens and the "
                              f"vision graph gives {img.shape[0] * img.shape[1]} embeddings")
        emb[is_image] = img.reshape(-1, img.shape[-1])
        return emb

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        s = self.spec
        shape = (batch, int(s["num_key_value_heads"]), 0, int(s["head_dim"]))
        dtype = np.dtype(s.get("kv_dtype", "float32"))  # fp16 exports carry an fp16 cache
        return {f"past.{i}.{kv}": np.zeros(shape, dtype)
                for i in range(int(s["num_layers"])) for kv in ("key", "value")}

    def decode_step(self, embeds, mask, positions, past):
        """One decoder call: (logits, presents keyed as the next call's past)."""
        feed = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": mask,
                "position_ids": positions, **past}
        outs = self.sessions["decoder"].run(None, feed)
        names = [o.name for o in self.sessions["decoder"].get_outputs()]
        res = dict(zip(names, outs, strict=True))
        return res["logits"], {k.replace("present.", "past.", 1): v for k, v in res.items()
                               if k.startswith("present.")}

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 pixel_values: np.ndarray, max_new_tokens: int) -> list[list[int]]:
        """Greedy new token ids per row (left-padded inputs), cut at the end token."""
        eos, pad = int(self.spec["eos_token_id"]), int(self.spec["pad_token_id"])
        mask = attention_mask.astype(np.int64)
        embeds = self.prompt_embeds(input_ids, pixel_values)
        positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0).astype(np.int64)
        past = self.empty_past(input_ids.shape[0])
        done = np.zeros(input_ids.shape[0], bool)
        out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        for _ in range(int(max_new_tokens)):
            logits, past = self.decode_step(embeds, mask, positions, past)
            nxt = logits[:, -1].argmax(-1).astype(np.int64)
            nxt = np.where(done, pad, nxt)
            for r in np.flatnonzero(~done):
                if nxt[r] != eos:
                    out[r].append(int(nxt[r]))
            done |= nxt == eos
            if done.all():
                break
            embeds = self.sessions["embed"].run(None, {"input_ids": nxt[:, None]})[0]
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)
        # cut at a pad token too, as Llava.generate does with PyTorch's tokens
        return [seq[:seq.index(pad)] if pad in seq else seq for seq in out]


def prompt_inputs(processor, prompts: list[str], images) -> dict[str, np.ndarray]:
    """Left-padded numpy inputs of ``prompts`` (chat-template text) and ``images``."""
    tok = processor.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = processor(images=list(images), text=list(prompts), padding=True, return_tensors="np")
    finally:
        tok.padding_side = old
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
            "pixel_values": enc["pixel_values"].astype(np.float32)}
