"""Generation with a generative VLM (llava) on ONNX Runtime, over its three exported graphs
(see :mod:`vlcompress.exporters.generative`):

- ``vision.onnx``: ``pixel_values`` -> ``image_embeds`` (the language model's image
  embeddings, projector included);
- ``embed.onnx``: ``input_ids`` -> ``inputs_embeds``;
- ``decoder.onnx``: ``inputs_embeds``, ``attention_mask`` [batch, past + sequence],
  ``position_ids`` and ``past.{i}.key`` / ``past.{i}.value`` per layer (and the optional
  ``logits_to_keep``, default 1) -> ``logits`` of the last position and ``present.{i}.key`` /
  ``present.{i}.value`` (one merged graph: prefill with an empty past, decode with one token;
  an export written before ``logits_to_keep`` gives every position's logits, and the loop
  reads their last).

The loop follows transformers' ``generate`` step for step, so the tokens can be compared one
for one: the image token positions of the prompt embeddings are overwritten with the image
embeddings (``masked_scatter``, in order), position ids are ``cumsum(attention_mask) - 1``
(0 at padding), prompts are left-padded, each step appends the chosen token and a 1 to the
mask, and a finished row keeps receiving the pad token. It stops when every row has produced
the end token or after ``max_new_tokens``; a row's tokens are cut at its end (or pad) token,
as :meth:`vlcompress.models.llava.Llava.generate` cuts PyTorch's.

The KV cache lives in pre-allocated buffers bound with IOBinding (:class:`Decoding`): two
buffers per cache tensor, each of the whole generation's capacity (prompt + new tokens), used
in turn ("ping-pong", the scheme ONNX Runtime GenAI uses for a decoder whose present is the
past with this step appended): a step reads its past from one buffer (bound at ``[batch,
kv_heads, past, head_dim]``) and ONNX Runtime writes the present straight into the other
(bound at ``past + 1``), so no cache tensor is allocated per token. The attention mask, the
position ids, the step's token ids and embeddings (the embedding graph writes into the
decoder's input buffer) and the step's logits are pre-allocated too. The merged graph
concatenates past and new keys inside (the export's design), so each step still copies the
cache once, into the other buffer; only a graph that updates a static cache in place (ORT
GenAI's ``past_present_share_buffer``) would avoid that copy.

Entry points a timer calls one by one (:mod:`vlcompress.runtime.gen_latency`):
:meth:`OrtGenerator.image_embeds` (the vision graph), :meth:`OrtGenerator.prefill` (vision,
embedding and the decoder over the prompt: the logits of the first new token) and
:meth:`OrtGenerator.step` (one decode step). :meth:`OrtGenerator.generate` is greedy by
default and samples with a seeded generator given a :class:`Sampling` (temperature, then
top-k, then top-p: the order of transformers' logits processors).
``generation.json`` beside the graphs holds what the loop needs (token ids, layer and head
counts, the context length).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def kv_heads_of(spec_heads, layer: int) -> int:
    """The key/value heads of ``layer`` from ``generation.json``'s ``num_key_value_heads``
    (an int for every layer, or a list with one per layer after whole key/value groups were
    sliced away)."""
    return int(spec_heads[layer] if isinstance(spec_heads, list) else spec_heads)


@dataclass(frozen=True)
class Sampling:
    """Seeded sampling instead of the arg-max: ``temperature`` > 0 divides the logits, then
    ``top_k`` (0: off) keeps the k largest, then ``top_p`` (1: off) keeps the smallest set of
    tokens whose probability reaches p (the most likely token always stays), as transformers'
    ``TemperatureLogitsWarper`` / ``TopKLogitsWarper`` / ``TopPLogitsWarper`` do. The draws
    come from ``numpy.random.default_rng(seed)``: the same seed gives the same tokens on the
    same graphs (not the tokens PyTorch's generator would draw)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"--temperature {self.temperature!r} is not valid; allowed: a "
                              "number > 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k!r} is not valid; allowed: an integer >= 0 "
                              "(0: off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"--top-p {self.top_p!r} is not valid; allowed: 0 < p <= 1 (1: off)")

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One token per row of ``logits`` [batch, vocab]."""
        p = self.probs(logits)
        u = rng.random((p.shape[0], 1))
        return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1).astype(np.int64)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution [batch, vocab] a token is drawn from (zero outside the kept set)."""
        x = logits.astype(np.float64) / float(self.temperature)
        if self.top_k and self.top_k < x.shape[-1]:
            kth = np.partition(x, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1, kind="stable")
            sp = np.take_along_axis(p, order, -1)
            # keep a token when the mass before it is below top_p (the first always stays)
            keep_sorted = (np.cumsum(sp, -1) - sp) < self.top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            p = np.where(keep, p, 0.0)
            p /= p.sum(-1, keepdims=True)
        return p


class Decoding:
    """The state of one batched generation: the pre-allocated buffers (module doc), the
    prompt's mask, the current length and the last logits. Built by :meth:`OrtGenerator.prefill`,
    advanced by :meth:`OrtGenerator.step`."""

    def __init__(self, gen: OrtGenerator, prompt_mask: np.ndarray, capacity: int):
        s = gen.spec
        b, p = prompt_mask.shape
        self.batch, self.prompt_len, self.capacity = b, p, int(capacity)
        self.kv_heads = [kv_heads_of(s["num_key_value_heads"], j // 2)
                         for j in range(2 * int(s["num_layers"]))]  # per cache tensor
        self.kv_shape = (b, max(self.kv_heads), int(s["head_dim"]))
        self.n_cache = len(self.kv_heads)
        per = b * self.kv_shape[1] * self.capacity * self.kv_shape[2]
        # the two ping-pong sides, in the decoder's cache dtype (fp16 exports: float16)
        self.cache = np.zeros((2, self.n_cache, per), gen.kv_dtype)
        self.side = 0  # the side holding the past
        self.prompt_mask = prompt_mask.astype(np.int64)
        self.mask = np.ones(b * self.capacity, np.int64)  # flat: viewed [batch, length]
        self.positions = np.zeros((b, 1), np.int64)
        self.ids = np.zeros((b, 1), np.int64)
        # the step's embeddings, written by embed.onnx (an export whose decoder embeds its own
        # token ids, BLIP's, has no embedding graph)
        embeds = "embed" in s["files"]
        self.embeds = np.zeros((b, 1, int(gen.hidden)), np.float32) if embeds else None
        self.step_logits = np.zeros((b, 1, int(s["vocab_size_out"])), np.float32)
        self.length = 0  # tokens in the cache
        self.logits: np.ndarray | None = None  # [batch, vocab] of the last position
        self.embed_binding = gen.sessions["embed"].io_binding() if embeds else None
        self.binding = gen.sessions["decoder"].io_binding()

    def cache_view(self, side: int, j: int, length: int) -> tuple[int, tuple]:
        """(pointer, shape) of cache tensor ``j`` on ``side`` at ``length`` tokens (its
        layer's key/value heads: whole groups may have been sliced away)."""
        b, _, d = self.kv_shape
        return self.cache[side, j].ctypes.data, (b, self.kv_heads[j], length, d)

    def mask_view(self, length: int) -> np.ndarray:
        m = self.mask[: self.batch * length].reshape(self.batch, length)
        m[:, : self.prompt_len] = self.prompt_mask
        m[:, self.prompt_len:] = 1
        return m


class _Sessions(dict):
    """The sessions of an export folder, each loaded on first use (a caller that feeds image
    embeddings never loads the vision graph)."""

    def __init__(self, folder: Path, files: dict, threads: int | None):
        super().__init__()
        self.folder, self.files, self.threads = folder, files, threads

    def __missing__(self, part: str):
        if part not in self.files:
            raise KeyError(part)
        self[part] = _session(self.folder / self.files[part], self.threads)
        return self[part]


class OrtGenerator:
    """The three sessions of one export folder and the generation loop over them."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.spec = read_spec(self.folder)
        self.sessions = _Sessions(self.folder, self.spec["files"], threads)
        dec = self.sessions["decoder"]
        self._cache_names = [i.name for i in dec.get_inputs() if i.name.startswith("past.")]
        out = {o.name: o for o in dec.get_outputs()}
        self.hidden = int(dec.get_inputs()[0].shape[-1])
        # the decoder takes logits_to_keep (default 1: the last position's logits only); an
        # export written before that returns every position's
        self.keeps_logits = "logits_to_keep" in {
            i.name for i in dec.get_overridable_initializers()} | {i.name for i in dec.get_inputs()}
        vocab_out = out["logits"].shape[-1]
        # the LM head's width (the embedding table may hold extra rows, e.g. the image token)
        self.spec.setdefault("vocab_size_out", vocab_out if isinstance(vocab_out, int)
                             else int(self.spec["vocab_size"]))

    @property
    def kv_dtype(self) -> np.dtype:
        """The KV cache's dtype (``generation.json``'s ``kv_dtype``: float16 for an fp16
        export, whose decoder takes and returns its past in fp16; else float32)."""
        return np.dtype(self.spec.get("kv_dtype", "float32"))

    @property
    def context(self) -> int:
        return int(self.spec["context"])

    # -- the three graphs ----------------------------------------------------------------------
    def image_outputs(self, pixel_values: np.ndarray):
        """(image embeddings, each one's index among the tower's tokens or None): a
        token-reduced vision graph (``--visual-tokens``) also outputs ``image_positions``."""
        outs = self.sessions["vision"].run(None, {"pixel_values": pixel_values.astype(np.float32)})
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.image_outputs(pixel_values)[0]

    def prompt(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               pixel_values: np.ndarray | None, image_embeds: np.ndarray | None = None,
               image_positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token embeddings with the image token positions replaced by the image embeddings
        (of ``pixel_values``, or ``image_embeds`` already computed), position ids:
        ``cumsum(mask) - 1``, 0 at padding; a token-reduced export places each kept token
        where the full prompt had it, ``models.visual_tokens.position_ids``)."""
        image_id = int(self.spec["image_token_id"])
        is_image = input_ids == image_id
        safe = np.where(is_image & (image_id >= int(self.spec["vocab_size"])), 0, input_ids)
        emb = self.sessions["embed"].run(None, {"input_ids": safe.astype(np.int64)})[0]
        img, index = (self.image_outputs(pixel_values) if image_embeds is None
                      else (image_embeds, image_positions))
        if int(is_image.sum()) != img.shape[0] * img.shape[1]:
            raise ExportError(f"the prompt holds {int(is_image.sum())} image tokens and the "
                              f"vision graph gives {img.shape[0] * img.shape[1]} embeddings")
        emb[is_image] = img.reshape(-1, img.shape[-1])
        mask = attention_mask.astype(np.int64)
        if index is None:
            return emb, np.where(mask == 1, np.cumsum(mask, -1) - 1, 0).astype(np.int64)
        from ..models.visual_tokens import position_ids

        return emb, position_ids(input_ids, mask, image_id, index, int(self.spec["tower_tokens"]))

    def prompt_embeds(self, input_ids: np.ndarray, pixel_values: np.ndarray | None,
                      image_embeds: np.ndarray | None = None) -> np.ndarray:
        """Token embeddings with the image token positions replaced by the image embeddings
        (of ``pixel_values``, or ``image_embeds`` already computed)."""
        return self.prompt(input_ids, np.ones_like(input_ids), pixel_values, image_embeds)[0]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        s = self.spec
        return {f"past.{i}.{kv}": np.zeros((batch, kv_heads_of(s["num_key_value_heads"], i), 0,
                                            int(s["head_dim"])), self.kv_dtype)
                for i in range(int(s["num_layers"])) for kv in ("key", "value")}

    def decode_step(self, embeds, mask, positions, past, logits_to_keep: int | None = None):
        """One decoder call on plain numpy feeds (no buffers): (logits, presents keyed as the
        next call's past). What the export's validation compares with PyTorch.
        ``logits_to_keep``: the last N positions' logits, 0 every position's (None: the
        graph's default, the last one's; an export without the input returns all)."""
        feed = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": mask,
                "position_ids": positions, **past}
        if logits_to_keep is not None and self.keeps_logits:
            feed["logits_to_keep"] = np.array(int(logits_to_keep), np.int64)
        outs = self.sessions["decoder"].run(None, feed)
        names = [o.name for o in self.sessions["decoder"].get_outputs()]
        res = dict(zip(names, outs, strict=True))
        return res["logits"], {k.replace("present.", "past.", 1): v for k, v in res.items()
                               if k.startswith("present.")}

    # -- the buffered loop ---------------------------------------------------------------------
    def check_capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        need = int(prompt_len) + int(max_new_tokens)
        if need > self.context:
            raise ConfigError(f"{prompt_len} prompt tokens + {max_new_tokens} new tokens exceed "
                              f"the context of {self.spec.get('model')} ({self.context} tokens); "
                              f"allowed: prompt + new tokens <= {self.context}")
        return need

    def _run_decoder(self, st: Decoding, inputs: dict[str, np.ndarray], new: int,
                     logits: np.ndarray) -> None:
        """Bind ``inputs`` (name -> array: the step's embeddings or ids, mask, positions),
        the past (``st.length`` tokens on ``st.side``) and the presents (``st.length + new``
        on the other side), run, flip the sides. Inputs bound before and not named here
        (BLIP's cross-attention keys / values, bound once per generation) stay bound."""
        io = st.binding
        for name, arr in inputs.items():
            io.bind_cpu_input(name, arr)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        other = 1 - st.side
        for j, name in enumerate(self._cache_names):
            ptr, shape = st.cache_view(st.side, j, st.length)
            io.bind_input(name, "cpu", 0, st.cache.dtype, list(shape), ptr)
            ptr, shape = st.cache_view(other, j, st.length + new)
            io.bind_output(name.replace("past.", "present.", 1), "cpu", 0, st.cache.dtype,
                           list(shape), ptr)
        self.sessions["decoder"].run_with_iobinding(io)
        st.side, st.length = other, st.length + new

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                pixel_values: np.ndarray | None, max_new_tokens: int,
                image_embeds: np.ndarray | None = None,
                image_positions: np.ndarray | None = None) -> Decoding:
        """Vision (skipped when ``image_embeds`` are given, with their ``image_positions``
        from a token-reduced vision graph), embedding and the decoder over the (left-padded)
        prompt; the state holds the logits of the first new token (``state.logits``) and room
        for ``max_new_tokens``."""
        mask = attention_mask.astype(np.int64)
        b, p = mask.shape
        st = Decoding(self, mask, self.check_capacity(p, max_new_tokens))
        embeds, positions = self.prompt(input_ids, mask, pixel_values, image_embeds,
                                        image_positions)
        logits = np.empty((b, 1 if self.keeps_logits else p, int(self.spec["vocab_size_out"])),
                          np.float32)
        self._run_decoder(st, {"inputs_embeds": embeds, "attention_mask": st.mask_view(p),
                               "position_ids": positions}, p, logits)
        st.positions[:] = positions[:, -1:]
        st.logits = logits[:, -1]
        return st

    def step(self, st: Decoding, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row; the logits [batch, vocab] of the next."""
        if st.length >= st.capacity:
            raise ConfigError(f"the generation holds {st.capacity} tokens (prompt + "
                              "max_new_tokens); no room for another step")
        st.ids[:, 0] = tokens
        st.positions += 1
        self._run_decoder(st, {**self._step_tokens(st), "position_ids": st.positions,
                               "attention_mask": st.mask_view(st.length + 1)}, 1, st.step_logits)
        st.logits = st.step_logits[:, -1]
        return st.logits

    def _step_tokens(self, st: Decoding) -> dict[str, np.ndarray]:
        """The decoder's token input of a step (``st.ids``): the embedding graph writes their
        embeddings into the decoder's input buffer."""
        eb = st.embed_binding
        eb.bind_cpu_input("input_ids", st.ids)
        eb.bind_output("inputs_embeds", "cpu", 0, np.float32, list(st.embeds.shape),
                       st.embeds.ctypes.data)
        self.sessions["embed"].run_with_iobinding(eb)
        return {"inputs_embeds": st.embeds}

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 pixel_values: np.ndarray, max_new_tokens: int, sampling: Sampling | None = None
                 ) -> list[list[int]]:
        """New token ids per row (left-padded inputs), cut at the end token: greedy, or drawn
        with ``sampling``."""
        st = self.prefill(input_ids, attention_mask, pixel_values, max_new_tokens)
        return token_loop(self, st, max_new_tokens, int(self.spec["eos_token_id"]),
                          int(self.spec["pad_token_id"]), chooser(sampling))


def chooser(sampling: Sampling | None):
    """:func:`token_loop`'s ``choose`` for one generate call: None (the arg-max), or draws of
    ``sampling`` from a fresh ``numpy.random.default_rng(sampling.seed)``, one uniform per
    row per step, in step order (so the same seed on the same batch gives the same tokens,
    on ONNX Runtime as on the PyTorch twins that share this loop; a row's draws depend on its
    place in the batch and on the batch size)."""
    if sampling is None:
        return None
    rng = np.random.default_rng(sampling.seed)
    return lambda logits: sampling.choose(logits, rng)


def token_loop(gen, st, max_new_tokens: int, eos: int, pad: int, choose=None
               ) -> list[list[int]]:
    """The generation loop after the prefill ``st`` of ``gen`` (an ONNX Runtime or a PyTorch
    generator): pick a token per row (arg-max, or ``choose(logits)``), a finished row gets
    the pad token, stop when every row has ended or after ``max_new_tokens``; each row cut at
    its end (or pad) token, as ``Llava.generate`` cuts PyTorch's."""
    done = np.zeros(st.batch, bool)
    out: list[list[int]] = [[] for _ in range(st.batch)]
    for i in range(int(max_new_tokens)):
        nxt = st.logits.argmax(-1).astype(np.int64) if choose is None else choose(st.logits)
        nxt = np.where(done, pad, nxt)
        for r in np.flatnonzero(~done):
            if nxt[r] != eos:
                out[r].append(int(nxt[r]))
        done |= nxt == eos
        if done.all() or i == int(max_new_tokens) - 1:
            break
        gen.step(st, nxt)
    return [seq[:seq.index(pad)] if pad in seq else seq for seq in out]


def prompt_inputs(processor, prompts: list[str], images,
                  image_tokens: int | None = None) -> dict[str, np.ndarray]:
    """Left-padded numpy inputs of ``prompts`` (chat-template text) and ``images``, the image
    token expanded into ``image_tokens`` tokens (``generation.json``'s ``image_tokens``: what
    the export's vision graph outputs; None: the processor's own count)."""
    tok = processor.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    before = processor.__dict__.get("replace_image_token")
    if image_tokens is not None:  # the vision graph's count, not the processor's
        processor.replace_image_token = lambda *a, **k: processor.image_token * int(image_tokens)
    try:
        enc = processor(images=list(images), text=list(prompts), padding=True, return_tensors="np")
    finally:
        tok.padding_side = old
        if image_tokens is not None:
            if before is None:
                del processor.replace_image_token
            else:
                processor.replace_image_token = before
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
            "pixel_values": enc["pixel_values"].astype(np.float32)}
