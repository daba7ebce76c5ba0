"""Triton Python-backend model that captions an image, or answers a question about it, with a
BLIP captioning / VQA export.

Copied verbatim into ``<repository>/<variant>_generate/1/model.py`` by
:func:`vlcompress.exporters.triton.export_triton` for a run whose ``generation.json``
``"kind"`` is ``blip-caption`` or ``blip-vqa``. Beside it in ``1/``: the variant's
``vision.onnx``, (VQA) ``question.onnx``, ``decoder.onnx`` and ``generation.json``, and
``processor/`` (the run's tokenizer and image processor). The generation loop is vlcompress's
:class:`~vlcompress.runtime.ort_generate_blip.BlipOrtGenerator` (only its constructor and
``generate`` are used) and the requests are encoded by
:class:`~vlcompress.runtime.gen_inputs.BlipPromptEncoder`; the server's Python needs
vlcompress installed.

The request and answer tensors, their UINT8 byte rows, the per-request checks, the batching
of several requests into one call and the fall-back to one call per request are those of the
LLaVA generation model (:mod:`vlcompress.exporters._triton_generate_model`, subclassed here).
What differs:

- ``prompt`` is optional for captioning: absent, every row starts from the run's caption
  prompt (``generation.json`` ``"prompt"``, BLIP's "a picture of"); present, each row's text
  is that row's caption start (an empty row: no prefix). For VQA it is the question and
  required: a request without one, or with a blank one, gets its own one-line error.
- rows are batched by :meth:`BlipPromptEncoder.generate`: caption starts left-padded, VQA
  questions grouped by length and never padded (BLIP attends question padding), so each row's
  answer is the one it gets alone, whatever requests the batcher merged it with.
"""

import json
import os
import sys

import numpy as np

# `vlcompress serve-check` names the vlcompress it runs (the stub ignores PYTHONPATH)
if os.environ.get("VLCOMPRESS_PATH") and os.environ["VLCOMPRESS_PATH"] not in sys.path:
    sys.path.insert(0, os.environ["VLCOMPRESS_PATH"])
try:
    from vlcompress.exporters._triton_generate_model import TritonPythonModel as _GenerateModel
    from vlcompress.exporters._triton_generate_model import _rows
except ImportError as exc:
    raise RuntimeError("this generation model runs vlcompress's BlipOrtGenerator: install "
                       f"vlcompress in the server's Python ({exc})") from None


class TritonPythonModel(_GenerateModel):
    def initialize(self, args):
        from vlcompress.runtime.gen_inputs import BlipPromptEncoder, read_image
        from vlcompress.runtime.ort_generate_blip import BlipOrtGenerator

        if str(args.get("model_instance_kind", "CPU")).upper() == "GPU":
            raise RuntimeError("the generation model runs on the CPU (BlipOrtGenerator uses "
                               "onnxruntime's CPU provider); export with --device cpu")
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(folder, "generation.json"), encoding="utf-8") as f:
            spec = json.load(f)
        threads = int(params.get("intra_op_threads", "0")) or None
        self.generator = BlipOrtGenerator(folder, threads)
        self.encoder = BlipPromptEncoder(os.path.join(folder, "processor"),
                                         params.get("model_name", "model"), spec)
        self.context = self.encoder.context
        self.read_image = read_image
        self.default_new = int(params.get("max_new_tokens", "24"))

    def _limits(self, new, rows):
        """max_new_tokens per row, or a sentence why not."""
        if new is None:
            return [self.default_new] * rows
        n = np.from_dlpack(new).reshape(-1)
        if n.size != rows:
            return f"input 'max_new_tokens' has {n.size} values for {rows} images"
        limits = [int(v) for v in n]
        bad = [v for v in limits if not 1 <= v <= self.context]
        if bad:
            return f"max_new_tokens {bad[0]} is outside 1..{self.context} (the context)"
        return limits

    def parse(self, request):
        """(encoded rows, max new tokens per row) of one request, or a sentence why not."""
        prompt, image = self._get(request, "prompt"), self._get(request, "image")
        pixels, new = self._get(request, "pixel_values"), self._get(request, "max_new_tokens")
        if (image is None) == (pixels is None):
            return "send exactly one of 'image' (encoded file bytes) and 'pixel_values'"
        if prompt is None and self.encoder.vqa:
            return ("input 'prompt' (the question) is missing: a BLIP VQA model answers a "
                    "question about the image")
        try:
            prompts = None if prompt is None else \
                [p.rstrip(b"\0").decode("utf-8") for p in _rows(prompt)]
        except UnicodeDecodeError:
            return "input 'prompt' is not UTF-8 text"
        try:
            if image is not None:
                files = _rows(image)
                if prompts is not None and len(files) != len(prompts):
                    return f"input 'image' has {len(files)} images for {len(prompts)} prompts"
                limits = self._limits(new, len(files))
                if isinstance(limits, str):
                    return limits
                rows = self.encoder.encode([self.read_image(f) for f in files],
                                           prompts or [None] * len(files))
            else:
                px = np.from_dlpack(pixels)
                if prompts is not None and len(px) != len(prompts):
                    return f"input 'pixel_values' has {len(px)} images for {len(prompts)} prompts"
                limits = self._limits(new, len(px))
                if isinstance(limits, str):
                    return limits
                rows = self.encoder.encode_pixels(px, prompts or [None] * len(px))
            self.encoder.check_length(rows, max(limits))
        except Exception as exc:  # vlcompress's one-line errors (DataError, ConfigError)
            return " ".join(str(exc).split())
        return rows, limits

    def generate(self, parts):
        """New tokens of every row of ``parts`` (the encoder's batched calls), cut to each
        row's limit, split back per request."""
        rows = [r for p, _ in parts for r in p]
        limits = [n for _, lim in parts for n in lim]
        # no merged-length check: positions count per row from its first token, so a row
        # that fits alone (checked in parse) fits beside longer ones
        tokens = self.encoder.generate(self.generator, rows, limits)
        out, at = [], 0
        for p, _ in parts:
            out.append(tokens[at:at + len(p)])
            at += len(p)
        return out
