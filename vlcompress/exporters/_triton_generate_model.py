"""Triton Python-backend model that answers a prompt about an image with a generative export.

Copied verbatim into ``<repository>/<variant>_generate/1/model.py`` by
:func:`vlcompress.exporters.triton.export_triton` for a generative run. Beside it in ``1/``:
the graphs of one export folder of the run (``vision.onnx``, ``embed.onnx``,
``decoder.onnx``; a ``--visual-tokens`` variant's own vision graph with its full-token twin's
embed and decoder; int8 / fp16 variants' files under their names) and a ``generation.json``
naming them there, and ``processor/`` (the run's tokenizer, image processor and
chat template). The generation loop is vlcompress's own :class:`OrtGenerator` (greedy, KV
cache) and the prompt goes through the same :class:`PromptEncoder` as ``vlcompress
generate``, so the server's Python needs vlcompress installed (with numpy, onnxruntime,
transformers and pillow, which it brings).

Per request (batch axis first, ``B`` rows): ``prompt`` (UINT8 ``[B, N]``, the user's text in
UTF-8, rows right-padded with zero bytes; rendered with the chat template here), and exactly
one of ``image`` (UINT8 ``[B, N]``, the bytes of an image file, rows right-padded with zero
bytes, which PNG and JPEG readers ignore) or ``pixel_values`` (FP32 ``[B, 3, H, W]``, the
processor's output); optional ``max_new_tokens`` (INT32 ``[B, 1]``, default: the config's
``max_new_tokens``). The answer: ``text`` (UINT8 ``[B, N]``, UTF-8, zero-padded),
``token_ids`` (INT64 ``[B, T]``, each row's new tokens, padded with -1) and ``num_tokens``
(INT32 ``[B, 1]``).

Why bytes as UINT8 and not Triton's BYTES type: the Python-backend stub of the
``nvidia-pytriton`` wheel builds numpy arrays through the numpy 1 C API; under numpy 2 it
reads a BYTES input as garbage and the stub dies (``unpack_from requires a buffer of at least
1246382670 bytes``, measured), while UINT8 tensors pass intact through DLPack.

Each request is checked alone first (inputs, image readable, pixel shape, max_new_tokens in
1..context, prompt tokens + new tokens within the context): a bad one gets its own error and
never joins the batch. The rows of the valid requests that dynamic batching hands over are
generated in ONE left-padded batch (the longest ``max_new_tokens`` of them; each row is cut to
its own, which equals generating it with that limit: greedy tokens do not depend on later
steps). Should that merged call fail, or its padded prompt length plus new tokens exceed the
context, each request is generated alone.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _rows(t):
    """A UINT8 ``[B, N]`` request tensor as B byte strings (through DLPack, see the module
    docstring)."""
    return [bytes(r) for r in np.from_dlpack(t)]


def _padded(rows):
    """Byte strings as one UINT8 ``[B, N]`` array, right-padded with zero bytes."""
    width = max([len(r) for r in rows] + [1])
    out = np.zeros((len(rows), width), np.uint8)
    for i, r in enumerate(rows):
        out[i, :len(r)] = np.frombuffer(r, np.uint8)
    return out


def _tensor(name, a):
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(a))


class TritonPythonModel:
    def initialize(self, args):
        import sys

        # `vlcompress serve-check` names the vlcompress it runs (the stub ignores PYTHONPATH)
        if os.environ.get("VLCOMPRESS_PATH") and os.environ["VLCOMPRESS_PATH"] not in sys.path:
            sys.path.insert(0, os.environ["VLCOMPRESS_PATH"])
        try:
            from vlcompress.runtime.gen_inputs import PromptEncoder, read_image
            from vlcompress.runtime.ort_generate import OrtGenerator
        except ImportError as exc:
            raise RuntimeError("this generation model runs vlcompress's OrtGenerator: install "
                               f"vlcompress in the server's Python ({exc})") from None
        if str(args.get("model_instance_kind", "CPU")).upper() == "GPU":
            raise RuntimeError("the generation model runs on the CPU (OrtGenerator uses "
                               "onnxruntime's CPU provider); export with --device cpu")
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        threads = int(params.get("intra_op_threads", "0")) or None
        self.generator = OrtGenerator(folder, threads)
        self.context = int(self.generator.spec["context"])
        spec = self.generator.spec
        # a --visual-tokens export: prompts carry its K image tokens, and their positions run
        # as far as the full prompt's (the tower's tokens minus K more), as `vlcompress
        # generate` counts them
        self.encoder = PromptEncoder(os.path.join(folder, "processor"),
                                     params.get("model_name", "model"), self.context,
                                     image_tokens=spec.get("image_tokens"))
        self.skipped = int(spec.get("tower_tokens") or 0) - int(
            spec.get("image_tokens") or spec.get("tower_tokens") or 0)
        self.read_image = read_image
        self.default_new = int(params.get("max_new_tokens", "24"))
        self.pad = self.encoder.processor.tokenizer.pad_token_id
        self.pad = int(self.generator.spec["pad_token_id"] if self.pad is None else self.pad)

    def _get(self, request, name):
        return pb_utils.get_input_tensor_by_name(request, name)

    def parse(self, request):
        """(encoded rows, max new tokens per row) of one request, or a sentence why not."""
        prompt, image = self._get(request, "prompt"), self._get(request, "image")
        pixels, new = self._get(request, "pixel_values"), self._get(request, "max_new_tokens")
        if prompt is None:
            return "input 'prompt' is missing"
        if (image is None) == (pixels is None):
            return "send exactly one of 'image' (encoded file bytes) and 'pixel_values'"
        try:
            prompts = [p.rstrip(b"\0").decode("utf-8") for p in _rows(prompt)]
        except UnicodeDecodeError:
            return "input 'prompt' is not UTF-8 text"
        if any(not p.strip() for p in prompts):
            return "input 'prompt' holds an empty prompt"
        rows = len(prompts)
        if new is None:
            limits = [self.default_new] * rows
        else:
            n = np.from_dlpack(new).reshape(-1)
            if n.size != rows:
                return f"input 'max_new_tokens' has {n.size} values for {rows} prompts"
            limits = [int(v) for v in n]
            bad = [v for v in limits if not 1 <= v <= self.context]
            if bad:
                return f"max_new_tokens {bad[0]} is outside 1..{self.context} (the context)"
        try:
            if image is not None:
                files = _rows(image)
                if len(files) != rows:
                    return f"input 'image' has {len(files)} images for {rows} prompts"
                enc = self.encoder.encode([self.read_image(f) for f in files], prompts)
            else:
                px = np.from_dlpack(pixels)
                if len(px) != rows:
                    return f"input 'pixel_values' has {len(px)} images for {rows} prompts"
                enc = self.encoder.encode_pixels(px, prompts)
            # the request's rows are generated together: its padded length counts
            self.encoder.check_length(int(enc["input_ids"].shape[1]) + self.skipped, max(limits))
        except Exception as exc:  # vlcompress's one-line errors (DataError, ConfigError)
            return " ".join(str(exc).split())
        return enc, limits

    def merge(self, parts):
        """One left-padded batch of the rows of several encoded requests."""
        width = max(p["input_ids"].shape[1] for p, _ in parts)
        ids, mask = [], []
        for p, _ in parts:
            k = width - p["input_ids"].shape[1]
            ids.append(np.pad(p["input_ids"], ((0, 0), (k, 0)), constant_values=self.pad))
            mask.append(np.pad(p["attention_mask"], ((0, 0), (k, 0)), constant_values=0))
        return {"input_ids": np.concatenate(ids), "attention_mask": np.concatenate(mask),
                "pixel_values": np.concatenate([p["pixel_values"] for p, _ in parts])}

    def generate(self, parts):
        """New tokens of every row of ``parts`` (one generate call), cut to each row's limit."""
        feeds = self.merge(parts) if len(parts) > 1 else parts[0][0]
        limits = [n for _, lim in parts for n in lim]
        if feeds["input_ids"].shape[1] + self.skipped + max(limits) > self.context:
            raise ValueError("the merged batch exceeds the context")
        rows = self.generator.generate(feeds["input_ids"], feeds["attention_mask"],
                                       feeds["pixel_values"], max(limits))
        rows = [r[:n] for r, n in zip(rows, limits, strict=True)]
        out, at = [], 0
        for p, _ in parts:
            b = p["input_ids"].shape[0]
            out.append(rows[at:at + b])
            at += b
        return out

    def answer(self, rows):
        width = max([len(r) for r in rows] + [1])
        ids = np.full((len(rows), width), -1, np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        text = _padded([self.encoder.decode(r).encode("utf-8") for r in rows])
        counts = np.array([[len(r)] for r in rows], np.int32)
        return pb_utils.InferenceResponse([_tensor("text", text), _tensor("token_ids", ids),
                                           _tensor("num_tokens", counts)])

    @staticmethod
    def _error(msg):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(msg))

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = []
        for i, r in enumerate(requests):
            try:
                parsed = self.parse(r)
            except Exception as exc:  # a tensor the stub cannot hand over: this request only
                parsed = f"unreadable input ({exc})"
            if isinstance(parsed, str):
                responses[i] = self._error(f"invalid request: {parsed}")
            else:
                valid.append((i, parsed))
        if valid:
            try:
                for (i, _), rows in zip(valid, self.generate([p for _, p in valid]), strict=True):
                    responses[i] = self.answer(rows)
            except Exception:  # the merged call failed or does not fit: each request alone
                for i, p in valid:
                    try:
                        responses[i] = self.answer(self.generate([p])[0])
                    except Exception as exc:
                        responses[i] = self._error(f"generation failed: {exc}")
        return responses

    def finalize(self):
        self.generator = None
