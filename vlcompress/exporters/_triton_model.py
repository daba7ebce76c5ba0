"""Triton Python-backend model that runs one exported ONNX graph with onnxruntime.

This file is copied verbatim into ``<repository>/<model>/1/model.py`` by
:func:`vlcompress.exporters.triton.export_triton` (``--backend python``). It imports nothing
from vlcompress, so the repository runs on any Triton whose Python environment has numpy and
onnxruntime, including the ``tritonserver`` that ships in the ``nvidia-pytriton`` wheel (it has
the Python backend only).

Dynamic batching hands ``execute`` several requests at once, from different clients. Each
request is checked on its own first (every input present, its dtype, its rank and fixed dims,
the same batch size across its inputs, token ids inside the vocabulary, attention-mask values
0 or 1): a malformed request gets its own error response and never joins a batch. The valid
requests whose inputs have the same non-batch shape are concatenated along the batch axis and
run as one onnxruntime call (what makes server-side batching pay), then the outputs are split
back per request; should that call fail anyway, each of its requests is re-run alone, so one
bad request cannot fail the others.

A ``KIND_GPU`` instance needs onnxruntime's CUDA provider: without it ``initialize`` fails with
that sentence (the model does not load) instead of serving on the CPU unannounced.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

# Triton config data types -> numpy dtypes of the inputs this exporter writes
_NP = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64,
       "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_INT16": np.int16,
       "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_}


def _numpy(t):
    """A request tensor as numpy, through DLPack: the stub's ``as_numpy`` is built against
    the numpy 1 C API and reads numpy 2 arrays wrong (zero-size outputs); DLPack is
    ABI-neutral and zero-copy."""
    return np.from_dlpack(t)


def _tensor(name, a):
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(a))


def providers_for(kind, device_id, available):
    """onnxruntime providers of one model instance: CPU for ``KIND_CPU``; CUDA (then CPU for
    the ops CUDA lacks) for ``KIND_GPU``, which without the CUDA provider is an error."""
    if str(kind).upper() != "GPU":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            "this model instance is KIND_GPU, but the server's onnxruntime has no "
            f"CUDAExecutionProvider (available: {', '.join(available) or 'none'}); install "
            "onnxruntime-gpu in the server's Python, or export with --device cpu")
    return [("CUDAExecutionProvider", {"device_id": int(device_id or 0)}), "CPUExecutionProvider"]


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(folder, params.get("onnx_file", "model.onnx"))
        opts = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "0"))
        if threads > 0:
            opts.intra_op_num_threads = threads
        providers = providers_for(args.get("model_instance_kind"),
                                  args.get("model_instance_device_id"),
                                  ort.get_available_providers())
        self.session = ort.InferenceSession(path, opts, providers=providers)
        if providers[0] != "CPUExecutionProvider" and \
                "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError("onnxruntime could not start its CUDAExecutionProvider for this "
                               "KIND_GPU instance (session providers: "
                               f"{', '.join(self.session.get_providers())})")
        self.inputs = [i["name"] for i in config["input"]]
        self.specs = {i["name"]: (_NP.get(i["data_type"]), [int(d) for d in i["dims"]])
                      for i in config["input"]}
        self.outputs = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.vocab = int(params["vocab_size"]) if params.get("vocab_size") else None

    def check(self, feed):
        """Why this one request cannot run (a sentence), or None."""
        batch = None
        for n in self.inputs:
            a = feed.get(n)
            if a is None:
                return f"input {n!r} is missing"
            want, dims = self.specs[n]
            if want is not None and a.dtype != want:
                return f"input {n!r} has dtype {a.dtype}, the model takes {np.dtype(want)}"
            shape = list(a.shape[1:] if self.batched else a.shape)
            if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape, strict=True)):
                return f"input {n!r} has shape {list(a.shape)}, the model takes dims {dims}"
            if self.batched:
                if batch is not None and a.shape[0] != batch:
                    return f"input {n!r} has batch {a.shape[0]}, another input has {batch}"
                batch = a.shape[0]
            if a.dtype.kind in "iu" and a.size:
                if "mask" in n.lower():
                    if not np.isin(a, (0, 1)).all():
                        return f"input {n!r} holds values other than 0 and 1"
                elif "ids" in n.lower() and self.vocab is not None:
                    bad = a[(a < 0) | (a >= self.vocab)]
                    if bad.size:
                        return (f"input {n!r} holds token id {int(bad.flat[0])} outside the "
                                f"vocabulary [0, {self.vocab})")
        return None

    def _run(self, feeds, idx):
        """Outputs of requests ``idx`` (one onnxruntime call when several): a list per request."""
        if len(idx) == 1:
            return [self.session.run(self.outputs, feeds[idx[0]])]
        big = {n: np.concatenate([feeds[i][n] for i in idx]) for n in self.inputs}
        res = self.session.run(self.outputs, big)
        cuts = np.cumsum([len(feeds[i][self.inputs[0]]) for i in idx])[:-1]
        parts = [np.split(r, cuts) for r in res]
        return [[p[k] for p in parts] for k in range(len(idx))]

    def _answer(self, out):
        return pb_utils.InferenceResponse([_tensor(n, v) for n, v in zip(self.outputs, out, strict=True)])

    @staticmethod
    def _error(msg):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(msg))

    def execute(self, requests):
        responses = [None] * len(requests)
        feeds, groups = {}, {}
        for i, r in enumerate(requests):
            try:
                feed = {n: _numpy(t) for n in self.inputs
                        if (t := pb_utils.get_input_tensor_by_name(r, n)) is not None}
                why = self.check(feed)
            except Exception as exc:  # a tensor the stub cannot hand over: this request only
                why = f"unreadable input ({exc})"
            if why is not None:
                responses[i] = self._error(f"invalid request: {why}")
                continue
            feeds[i] = feed
            key = tuple(feed[n].shape[1:] if self.batched else (i,) for n in self.inputs)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            try:
                for i, out in zip(idx, self._run(feeds, idx), strict=True):
                    responses[i] = self._answer(out)
            except Exception:  # the merged call failed: each request alone, errors its own
                for i in idx:
                    try:
                        responses[i] = self._answer(self._run(feeds, [i])[0])
                    except Exception as exc:
                        responses[i] = self._error(f"onnxruntime: {exc}")
        return responses

    def finalize(self):
        self.session = None
