"""Triton Python-backend model that runs one exported ONNX graph with onnxruntime.

This file is copied verbatim into ``<repository>/<model>/1/model.py`` by
:func:`vlcompress.exporters.triton.export_triton` (``--backend python``). It imports nothing
from vlcompress, so the repository runs on any Triton whose Python environment has numpy and
onnxruntime, including the ``tritonserver`` that ships in the ``nvidia-pytriton`` wheel (it has
the Python backend only).

Dynamic batching hands ``execute`` several requests at once; requests whose inputs have the
same non-batch shape are concatenated along the batch axis and run as one onnxruntime call,
then the outputs are split back per request. That is what makes the server-side batching pay.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _numpy(t):
    """A request tensor as numpy, through DLPack: the stub's ``as_numpy`` is built against
    the numpy 1 C API and reads numpy 2 arrays wrong (zero-size outputs); DLPack is
    ABI-neutral and zero-copy."""
    return np.from_dlpack(t)


def _tensor(name, a):
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(a))


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
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and \
                "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}),
                         "CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, opts, providers=providers)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        feeds = [{n: _numpy(pb_utils.get_input_tensor_by_name(r, n)) for n in self.inputs}
                 for r in requests]
        responses = [None] * len(requests)
        groups = {}
        for i, feed in enumerate(feeds):  # same non-batch shapes -> one onnxruntime call
            key = tuple(feed[n].shape[1:] if self.batched else (i,) for n in self.inputs)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            try:
                if len(idx) == 1:
                    outs = [self.session.run(self.outputs, feeds[idx[0]])]
                else:
                    big = {n: np.concatenate([feeds[i][n] for i in idx]) for n in self.inputs}
                    res = self.session.run(self.outputs, big)
                    cuts = np.cumsum([len(feeds[i][self.inputs[0]]) for i in idx])[:-1]
                    parts = [np.split(r, cuts) for r in res]
                    outs = [[p[k] for p in parts] for k in range(len(idx))]
                for i, out in zip(idx, outs, strict=True):
                    responses[i] = pb_utils.InferenceResponse(
                        [_tensor(n, v) for n, v in zip(self.outputs, out, strict=True)])
            except Exception as exc:  # one failed group answers its requests with the error
                for i in idx:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"onnxruntime: {exc}"))
        return responses

    def finalize(self):
        self.session = None
