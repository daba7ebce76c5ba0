"""ONNX export of one graph per tower, fp16 conversion, validation against PyTorch.

    result = export_model(vlm, "out/onnx", example=batch_a, check=batch_b, fp16=False)
    result.paths  # {"vision": Path("out/onnx/vision.onnx"), "text": ...}

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, the
default since PyTorch 2.9) with ``dynamic_shapes`` given as axis *names* (``"batch"``,
``"sequence"``), so the ONNX inputs carry those names and inputs sharing a name share the
symbol. It captures the graph without tracing Python control flow on concrete values. Should
it fail on some model, the TorchScript exporter (``dynamo=False``, deprecated) is tried as a
fallback; the exporter used is recorded in the model's metadata (``vlcompress.exporter``).
Every export is validated by :func:`validate_tower` on a batch of another size (and, for
text, another sequence length) than the export example.

Weights are plain initializers, bit-exact copies of the PyTorch weights (pruned zeros stay
zeros), renamed after the PyTorch parameters they come from (``vision_model.encoder.layers.0
.self_attn.q_proj.weight``); the exporter stores a ``Linear`` weight as the MatMul operand
``[d_in, d_out]``, i.e. transposed: :func:`check_nm` reads the layout from the consuming node.
Everything is one ``.onnx`` file below 2 GB; above, the weights go to ``<name>.onnx.data``.

fp16: exported in fp32, then converted here (:func:`convert_fp16`): weights and activations in
fp16, except the numerically touchy ops (:data:`FP16_KEEP_FP32_OPS`: LayerNormalization,
Softmax, reductions, Pow, Sqrt, Exp, ...) which run in fp32 behind inserted ``Cast`` nodes.
Graph inputs and outputs keep their fp32 types, so an fp16 model takes the same feeds as the
fp32 one (``pixel_values`` float32, ``input_ids``/``attention_mask`` int64) and returns
float32 ``embeds``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import mmap
import os
import shutil
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..atomic import atomic_path, temp_sibling
from ..data.pairs import PairBatch
from ..errors import ConfigError, ExportError, OutputError
from ..progress import NULL, Progress
from ..runtime.ort_runner import ORT_NP_TYPES as _NP_TYPES

__all__ = [
    "ExportResult", "export_tower", "export_model", "validate_tower", "convert_fp16",
    "onnx_sparsity", "check_nm", "FP16_KEEP_FP32_OPS", "DEFAULT_TOLERANCES",
]

log = logging.getLogger(__name__)

OUTPUT_NAME = "embeds"
#: Models whose initializers exceed this many bytes are saved with external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27  # 2 GiB protobuf limit, less headroom for the graph
#: Opset for the TorchScript fallback when none is asked for (the dynamo exporter picks its own).
TORCHSCRIPT_OPSET = 17

#: Default validation tolerances, by fp16 (False/True). ``ok`` needs
#: ``|onnx - torch| <= atol + rtol * |torch|`` everywhere and, where given, the cosine
#: similarity of every embedding with its PyTorch twin >= ``min_cosine``.
DEFAULT_TOLERANCES = {
    False: {"atol": 1e-4, "rtol": 1e-3, "min_cosine": None},
    True: {"atol": 2e-2, "rtol": 2e-2, "min_cosine": 0.99},
}

#: Ops kept in fp32 by :func:`convert_fp16`: normalisations, softmax, reductions and
#: transcendental ops (range/precision), and ops whose float inputs are not activations.
FP16_KEEP_FP32_OPS = frozenset({
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "GroupNormalization", "InstanceNormalization",
    "BatchNormalization", "LpNormalization", "MeanVarianceNormalization", "RMSNormalization",
    "Softmax", "LogSoftmax", "Hardmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd",
    "Pow", "Sqrt", "Reciprocal", "Exp", "Log",
    "Range", "CumSum", "TopK", "NonMaxSuppression", "Resize", "Upsample", "RoiAlign",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli", "EyeLike",
})

_FP16_MAX = float(np.finfo(np.float16).max)
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how closely each tower matches PyTorch."""

    paths: dict[str, Path]
    max_abs_diff: dict[str, float]
    min_cosine: dict[str, float]
    fp16: bool
    seconds: float
    exporter: dict[str, str] = field(default_factory=dict)  # tower -> "dynamo" | "torchscript"
    validation: dict[str, dict] = field(default_factory=dict)  # tower -> validate_tower() dict
    # tower -> the quantized file written beside it (vlcompress.api.export(quantize=...))
    quantized: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "paths": {k: str(v) for k, v in self.paths.items()},
            "max_abs_diff": dict(self.max_abs_diff),
            "min_cosine": dict(self.min_cosine),
            "fp16": self.fp16,
            "seconds": self.seconds,
            "exporter": dict(self.exporter),
            "validation": {k: dict(v) for k, v in self.validation.items()},
            "quantized": {k: dict(v) for k, v in self.quantized.items()},
        }


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Silence exporter chatter: Python warnings, prints and torch/onnxscript log records.

    Yields the buffer holding whatever was printed, for error messages.
    """
    names = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx",
             "torch._subclasses", "torch.utils._sympy", "torch._functorch", "onnxscript",
             "onnx_ir", "transformers")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    buf = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), \
                contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _export_dynamo(module, inputs, axes, opset) -> onnx.ModelProto:
    # Axis names as strings: torch turns each into Dim.DYNAMIC and names the ONNX dims after them.
    dynamic_shapes = {k: (dict(axes[k]) if axes.get(k) else None) for k in inputs}
    with _quiet():
        program = torch.onnx.export(
            module, (), kwargs=dict(inputs), dynamo=True, dynamic_shapes=dynamic_shapes,
            output_names=[OUTPUT_NAME], opset_version=opset, optimize=True, verbose=False,
        )
        return program.model_proto


def _export_torchscript(module, inputs, axes, opset, workdir: Path) -> onnx.ModelProto:
    # positional arguments, in the order of forward's signature
    params = list(inspect.signature(module.forward).parameters)
    names = sorted(inputs, key=lambda k: params.index(k) if k in params else len(params))
    dyn = {k: dict(v) for k, v in axes.items() if k in names or k == OUTPUT_NAME}
    with tempfile.TemporaryDirectory(prefix=".ts-export-", dir=workdir) as d:
        f = Path(d) / "model.onnx"
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                module, tuple(inputs[k] for k in names), str(f), dynamo=False,
                input_names=names, output_names=[OUTPUT_NAME], dynamic_axes=dyn,
                opset_version=opset or TORCHSCRIPT_OPSET, do_constant_folding=True,
            )
        return load_proto(f)  # pulls in external data, if torch wrote any


def _export_proto(module, inputs, axes, opset, workdir: Path, tower: str
                  ) -> tuple[onnx.ModelProto, str]:
    errors = []
    for exporter in ("dynamo", "torchscript"):
        try:
            if exporter == "dynamo":
                proto = _export_dynamo(module, inputs, axes, opset)
            else:
                proto = _export_torchscript(module, inputs, axes, opset, workdir)
            _check_io(proto, list(inputs))
        except Exception as exc:  # noqa: BLE001 - reported below, with the fallback's error
            errors.append(f"{exporter} exporter: {_short(exc)}")
            continue
        if errors:
            log.info("%s tower: dynamo exporter failed (%s); used the TorchScript exporter",
                     tower, errors[0])
        return proto, exporter
    raise ExportError(f"could not export the {tower} tower to ONNX; " + "; ".join(errors))


def _check_io(proto: onnx.ModelProto, names: list[str]) -> None:
    got = [i.name for i in proto.graph.input]
    inits = {t.name for t in proto.graph.initializer}
    got = [g for g in got if g not in inits]
    if set(got) - set(names):
        raise ExportError(f"exported inputs {got} do not match the tower's inputs {names}")
    outs = [o.name for o in proto.graph.output]
    if outs != [OUTPUT_NAME]:
        raise ExportError(f"exported outputs {outs}; expected one output {OUTPUT_NAME!r}")


def _example_batch(example: PairBatch) -> PairBatch:
    """At least two items: a size-1 example dimension invites specialisation to 1."""
    if len(example) >= 2:
        return example
    if len(example) == 0:
        raise ExportError("the export example batch is empty")
    return PairBatch(list(example.images) * 2, list(example.captions) * 2)


def _tower_check(vlm, tower: str) -> None:
    if tower not in vlm.towers:
        raise ConfigError(f"{vlm.family} has no tower {tower!r}; towers: {', '.join(vlm.towers)}")


def export_tower(vlm, tower: str, path: str | Path, example: PairBatch, *, fp16: bool = False,
                 opset: int | None = None) -> Path:
    """Export ``vlm.tower_module(tower)`` to ``path`` (written atomically); return ``path``.

    Inputs are ``vlm.tower_inputs(tower, example)`` (names = its keys), one output ``embeds``,
    dynamic axes from ``vlm.dynamic_axes(tower)``. ``fp16`` converts the graph to fp16 with
    fp32 inputs/outputs (see the module doc). ``opset`` None lets the exporter choose.
    """
    return _export_tower(vlm, tower, path, example, fp16=fp16, opset=opset)[0]


def _export_tower(vlm, tower, path, example, *, fp16=False, opset=None) -> tuple[Path, str]:
    _tower_check(vlm, tower)
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write ONNX file {str(path)!r}: a folder of that name exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    module = vlm.tower_module(tower).eval()
    inputs = vlm.tower_inputs(tower, _example_batch(example))
    axes = vlm.dynamic_axes(tower)
    proto, exporter = _export_proto(module, inputs, axes, opset, path.parent, tower)
    _strip_debug_metadata(proto)
    _name_initializers(proto, module, getattr(vlm, "model", None))
    if fp16:
        proto = convert_fp16(proto)
    helper.set_model_props(proto, {
        "vlcompress.tower": tower, "vlcompress.model": str(getattr(vlm, "name", "")),
        "vlcompress.family": str(getattr(vlm, "family", "")), "vlcompress.exporter": exporter,
        "vlcompress.precision": "fp16" if fp16 else "fp32",
    })
    save_onnx(proto, path)
    return path, exporter


_DEBUG_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _strip_debug_metadata(proto: onnx.ModelProto) -> None:
    """Drop the dynamo exporter's per-node Python stack traces and FX dumps: they hold this
    machine's file paths and most of a small model's file size. Module scopes are kept."""
    for n in proto.graph.node:
        keep = [p for p in n.metadata_props if p.key not in _DEBUG_KEYS]
        if len(keep) != len(n.metadata_props):
            del n.metadata_props[:]
            n.metadata_props.extend(keep)


def save_onnx(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Save atomically: one file under :data:`EXTERNAL_DATA_THRESHOLD` bytes of weights, else
    ``path`` plus ``<path name>.data`` (the data file is moved into place first)."""
    path = Path(path)
    data_name = path.name + ".data"
    data_path = path.with_name(data_name)
    if _initializer_bytes(proto) < EXTERNAL_DATA_THRESHOLD:
        with atomic_path(path) as tmp:
            with open(tmp, "xb") as fh:
                write_proto(proto, fh)
        if data_path.is_file():  # stale weights of an earlier, larger export
            data_path.unlink()
        return path
    stage = temp_sibling(path)
    stage.mkdir()
    try:
        onnx.save_model(proto, str(stage / path.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        # onnx creates the data file private (0600); give it the model file's permissions
        os.chmod(stage / data_name, stat.S_IMODE(os.stat(stage / path.name).st_mode))
        os.replace(stage / data_name, data_path)
        os.replace(stage / path.name, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return path


# Streaming (de)serialisation: the protobuf wire format of a ModelProto is its fields in field
# number order; the graph (field 7) is one length-delimited field whose initializers (field 5)
# sit between its nodes and name (1, 2) and the rest (10-16). Writing or reading the
# initializers one at a time gives the bytes ``SerializeToString`` gives (tests check it)
# without a second whole copy of the weights in memory.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _split(msg, number: int):
    """Two new messages of ``msg``'s type: its fields numbered below ``number``, and above."""
    lo, hi = type(msg)(), type(msg)()
    for fd, value in msg.ListFields():
        if fd.number == number:
            continue
        dst = lo if fd.number < number else hi
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)
    return lo, hi


def write_proto(model: onnx.ModelProto, fh) -> None:
    """Write ``model.SerializeToString()`` to the binary file ``fh``, the same bytes, holding
    one serialised initializer at a time instead of the whole serialised model."""
    pre, post = _split(model, _MODEL_GRAPH)
    head, tail = _split(model.graph, _GRAPH_INITIALIZER)
    head_b, tail_b = head.SerializeToString(), tail.SerializeToString()
    del head, tail
    tag = _varint(_GRAPH_INITIALIZER << 3 | 2)
    sizes = [t.ByteSize() for t in model.graph.initializer]
    inner = len(head_b) + len(tail_b) + sum(len(tag) + len(_varint(n)) + n for n in sizes)
    fh.write(pre.SerializeToString())
    if model.HasField("graph"):
        fh.write(_varint(_MODEL_GRAPH << 3 | 2) + _varint(inner))
        fh.write(head_b)
        for t, n in zip(model.graph.initializer, sizes, strict=True):
            fh.write(tag + _varint(n))
            fh.write(t.SerializeToString())
        fh.write(tail_b)
    fh.write(post.SerializeToString())


def _read_varint(buf, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """``(number, wire type, field start, value start, field end)`` of each field."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            value = pos
        elif wire == 1:
            value, pos = pos, pos + 8
        elif wire == 2:
            size, value = _read_varint(buf, pos)
            pos = value + size
        elif wire == 5:
            value, pos = pos, pos + 4
        else:
            raise ExportError(f"cannot read the ONNX file: wire type {wire} (groups) at {first}")
        yield number, wire, first, value, pos


def _merge_model(model: onnx.ModelProto, view, drop) -> None:
    """Parse the serialised model ``view`` into ``model`` field by field, the graph's
    initializers one at a time (``drop(start, end)`` is told each one's byte range once
    parsed)."""
    for number, wire, first, value, end in _fields(view, 0, len(view)):
        if number != _MODEL_GRAPH or wire != 2:
            model.MergeFromString(view[first:end])
            continue
        g = model.graph
        g.SetInParent()
        run = None  # a run of non-initializer fields, merged in one call
        for gnum, gwire, gfirst, gvalue, gend in _fields(view, value, end):
            if gnum == _GRAPH_INITIALIZER and gwire == 2:
                if run is not None:
                    g.MergeFromString(view[run[0]:run[1]])
                    run = None
                g.initializer.add().ParseFromString(view[gvalue:gend])
                drop(gfirst, gend)
            else:
                run = (gfirst, gend) if run is None else (run[0], gend)
        if run is not None:
            g.MergeFromString(view[run[0]:run[1]])


def load_proto(path: str | Path) -> onnx.ModelProto:
    """``onnx.load(path)``, the same message, without the file's bytes in memory beside it.

    ``onnx.load`` reads the whole file into one ``bytes`` and parses it: twice the weights at
    its peak. Here the file is mapped and parsed field by field, each initializer from its own
    slice, whose pages are dropped from this process's memory once parsed (they stay in the
    page cache), so the peak is the parsed model plus about one tensor. External data, if the
    file names any, is loaded as ``onnx.load`` loads it."""
    path = Path(path)
    model = onnx.ModelProto()
    size = path.stat().st_size
    if size == 0:
        return model
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            page = mmap.PAGESIZE

            def drop(a: int, b: int) -> None:
                lo, hi = a // page * page, b // page * page
                if hi > lo and hasattr(mm, "madvise"):
                    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

            _merge_model(model, view, drop)
        finally:
            view.release()
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(path.parent))  # as onnx.load: none, nothing done
    return model


def _initializer_array(t: TensorProto) -> np.ndarray:
    """The values of a float initializer, read from its raw bytes with one copy (the bytes
    the protobuf accessor returns); other encodings through ``numpy_helper.to_array``."""
    if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE) and \
            t.HasField("raw_data") and sys.byteorder == "little":
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))
    return np.ascontiguousarray(numpy_helper.to_array(t))


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    total = 0
    for t in proto.graph.initializer:
        if t.data_type == TensorProto.STRING:
            total += sum(len(x) for x in t.string_data)
            continue
        numel = int(np.prod(t.dims)) if len(t.dims) else 1
        total += numel * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


#: Bytes hashed at a time where a tensor must be transposed to be hashed (a bounded copy).
_HASH_CHUNK = 1 << 24


def _tensor_key(arr: np.ndarray, transposed: bool = False):
    """``(shape, dtype, digest)`` of ``arr``'s bytes in C order, or of ``arr.T``'s with
    ``transposed`` (a 2-D array): the same key as the contiguous copy would give, without
    making it. A contiguous array is hashed in place; a transpose in bands of rows of the
    transpose of at most :data:`_HASH_CHUNK` bytes, so no copy of a whole weight is made
    (a 545 MB embedding table used to cost twice its size here, once per orientation)."""
    h = hashlib.blake2b(digest_size=16)
    if transposed:
        cols = max(1, _HASH_CHUNK // max(1, arr.shape[0] * arr.itemsize))
        for j in range(0, arr.shape[1], cols):
            h.update(np.ascontiguousarray(arr[:, j:j + cols].T).data)
        return arr.shape[::-1], arr.dtype.str, h.digest()
    a = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
    h.update(a.reshape(-1).view(np.uint8).data if a.size else b"")
    return a.shape, a.dtype.str, h.digest()


def _name_initializers(proto: onnx.ModelProto, module: torch.nn.Module, root=None) -> dict:
    """Rename float initializers after the PyTorch tensors they come from.

    An initializer named after a parameter of ``module`` (the dynamo exporter keeps some names)
    gets that parameter's name relative to ``root`` (the VLM's model), so names match
    ``PrunableLayer.name + ".weight"``; any other float initializer that equals, bit for bit,
    exactly one PyTorch tensor (directly or transposed, as MatMul stores Linear weights) gets
    that tensor's name. Ambiguous values (e.g. LayerNorm weights all ones) keep their names.
    Returns old -> new.
    """
    root_names = {}
    if root is not None:
        for name, t in list(root.named_parameters()) + list(root.named_buffers()):
            root_names.setdefault(id(t), name)
    by_name: dict[str, str] = {}
    table: dict = {}
    seen: set[int] = set()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        new = root_names.get(id(t), name)
        by_name[name] = new
        if not t.is_floating_point() or id(t) in seen:
            continue
        seen.add(id(t))
        arr = t.detach().cpu().numpy()
        keys = {_tensor_key(arr)}
        if arr.ndim == 2:
            keys.add(_tensor_key(arr, transposed=True))
        for key in keys:
            table[key] = new if key not in table else None  # None: ambiguous
    g = proto.graph
    used = {t.name for t in g.initializer} | {i.name for i in g.input} | \
        {o for n in g.node for o in n.output}
    mapping = {}
    for t in g.initializer:
        new = by_name.get(t.name)
        if new is None:
            if t.data_type not in _FLOAT_TYPES or t.data_location == TensorProto.EXTERNAL:
                continue
            new = table.get(_tensor_key(_initializer_array(t)))
        if new is None or new == t.name:
            continue
        cand, k = new, 1
        while cand in used:
            cand, k = f"{new}_{k}", k + 1
        used.add(cand)
        mapping[t.name] = cand
        t.name = cand
    if mapping:
        _rename_values(g, mapping)
    return mapping


def _rename_values(g: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in mapping:
                n.input[i] = mapping[x]
        for a in n.attribute:  # subgraphs may read outer-scope values
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_values(a.g, mapping)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    _rename_values(sg, mapping)
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name in mapping:
            vi.name = mapping[vi.name]


# --------------------------------------------------------------------------------------------
# fp16
# --------------------------------------------------------------------------------------------
def _to_fp16(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all() or np.abs(arr[finite]).max(initial=0.0) > _FP16_MAX:
        arr = np.where(finite, np.clip(arr, -_FP16_MAX, _FP16_MAX), arr)  # saturate, keep inf/nan
    return arr.astype(np.float16)


def _fp16_tensor(t: TensorProto, name: str | None = None) -> TensorProto:
    return numpy_helper.from_array(_to_fp16(numpy_helper.to_array(t)), name if name is not None
                                   else t.name)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value, by ONNX shape inference on a weightless copy."""
    g = model.graph
    weightless_inputs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                         for t in g.initializer]
    known = {i.name for i in g.input}
    graph = helper.make_graph(list(g.node), g.name or "g",
                              list(g.input) + [v for v in weightless_inputs if v.name not in known],
                              list(g.output), value_info=list(g.value_info))
    light = helper.make_model(graph, opset_imports=list(model.opset_import),
                              ir_version=model.ir_version)
    light.functions.extend(model.functions)
    try:
        light = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - fall back to what the exporter recorded
        log.debug("shape inference failed before fp16 conversion: %s", exc)
    types = {}
    for vi in list(light.graph.input) + list(light.graph.value_info) + list(light.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def convert_fp16(model: onnx.ModelProto, keep_fp32: Iterable[str] = FP16_KEEP_FP32_OPS
                 ) -> onnx.ModelProto:
    """Convert an fp32 model to fp16 in place (and return it).

    Float initializers and activations become fp16, except the inputs and outputs of ops in
    ``keep_fp32``, which run in fp32 with ``Cast`` nodes inserted around them (one cast per
    value and direction). Graph inputs and outputs keep fp32 types. Constants are saturated
    to the fp16 range (so a ``finfo(float32).min`` mask becomes -65504, not -inf); zeros stay
    exact zeros. Control flow (If/Loop/Scan) is not supported.
    """
    keep = frozenset(keep_fp32)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    g = model.graph
    for n in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in n.attribute):
            raise ExportError(f"fp16 conversion does not support control flow ({n.op_type} node "
                              f"{n.name!r}); export in fp32")
    types = _value_types(model)
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == F32

    # 1. which precision each node runs in: 16, 32, "cast", or None (no float tensors).
    mode: list = []
    for n in g.node:
        if n.op_type == "Cast":
            mode.append("cast")
        elif n.op_type in ("Shape", "Size"):  # any float type will do: no casts
            mode.append(None)
        elif not any(is_float(x) for x in list(n.input) + list(n.output)):
            mode.append(None)
        else:
            mode.append(32 if n.op_type in keep else 16)

    # 2. initializers: fp16 when any fp16 node reads them, else left fp32.
    readers: dict[str, set] = {}
    for n, md in zip(g.node, mode, strict=True):
        for x in n.input:
            readers.setdefault(x, set()).add(md)
    prec: dict[str, int] = {}
    for i, t in enumerate(g.initializer):
        if t.data_type != F32:
            continue
        if 16 in readers.get(t.name, ()):
            g.initializer[i].CopyFrom(_fp16_tensor(t))
            prec[t.name] = 16
        else:
            prec[t.name] = 32
    for i in g.input:
        if is_float(i.name) and i.name not in prec:
            prec[i.name] = 32

    # 3. walk the nodes in order, casting inputs to the node's precision.
    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    names = {o for n in g.node for o in n.output} | set(prec) | {i.name for i in g.input}

    def fresh(base: str) -> str:
        cand, k = base, 1
        while cand in names:
            cand, k = f"{base}_{k}", k + 1
        names.add(cand)
        return cand

    def as_prec(x: str, want: int) -> str:
        have = prec.get(x)
        if have is None or have == want:
            return x
        key = (x, want)
        if key not in casts:
            out = fresh(f"{x}__fp{want}")
            new_nodes.append(helper.make_node("Cast", [x], [out], name=fresh(f"Cast_{out}"),
                                              to=F16 if want == 16 else F32))
            casts[key] = out
            prec[out] = want
        return casts[key]

    for n, md in zip(g.node, mode, strict=True):
        if md in (16, 32):
            for k, x in enumerate(n.input):
                if x and x in prec:
                    n.input[k] = as_prec(x, md)
            if md == 16 and n.op_type in ("Constant", "ConstantOfShape"):
                _fp16_constant(n)
            for o in n.output:
                if is_float(o):
                    prec[o] = md
        elif md == "cast":
            to = next((a for a in n.attribute if a.name == "to"), None)
            if to is not None and to.i == F32:
                to.i = F16
                prec[n.output[0]] = 16
        new_nodes.append(n)

    # 4. graph outputs stay fp32.
    out_names = {o.name for o in g.output}
    renames = {o: fresh(f"{o}__fp16") for o in out_names if prec.get(o) == 16}
    if renames:
        for n in new_nodes:
            for k, x in enumerate(n.input):
                if x in renames:
                    n.input[k] = renames[x]
            for k, x in enumerate(n.output):
                if x in renames:
                    n.output[k] = renames[x]
        for o, r in renames.items():
            new_nodes.append(helper.make_node("Cast", [r], [o], name=fresh(f"Cast_{o}"), to=F32))
            prec[r] = 16
            prec[o] = 32

    del g.node[:]
    g.node.extend(new_nodes)
    for vi in g.value_info:
        if prec.get(vi.name) == 16 and vi.type.tensor_type.elem_type == F32:
            vi.type.tensor_type.elem_type = F16
    return model


def _const_attr(n: onnx.NodeProto):
    return next((a for a in n.attribute if a.name in ("value", "value_float", "value_floats")),
                None)


def _fp16_constant(n: onnx.NodeProto) -> None:
    a = _const_attr(n)
    if a is None:
        return
    if a.name == "value":
        if a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(_fp16_tensor(a.t, a.t.name))
        return
    if n.op_type != "Constant":
        return
    arr = np.array(a.f if a.name == "value_float" else list(a.floats), dtype=np.float32)
    n.attribute.remove(a)
    n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(_to_fp16(arr))))


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # not timed: be polite
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _to_numpy(out) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu().numpy()
    if isinstance(out, (tuple, list)):
        return _to_numpy(out[0])
    if hasattr(out, "to_tuple"):
        return _to_numpy(out.to_tuple()[0])
    raise ExportError(f"the tower returned {type(out).__name__}, not a tensor")


def validate_tower(vlm, tower: str, path: str | Path, batch: PairBatch | dict, *,
                   atol: float = 1e-4, rtol: float = 1e-3, min_cosine: float | None = None
                   ) -> dict:
    """Run the ONNX file (onnxruntime, CPU) and the PyTorch tower on ``batch``; compare.

    ``batch`` (a PairBatch, or the tower's input tensors) should differ from the export
    example in batch size and, for text, in sequence length, so dynamic axes are exercised.
    Returns ``{"max_abs_diff", "min_cosine", "ok", "batch", "shapes", "atol", "rtol",
    "min_cosine_required"}``; ``ok`` is ``|onnx - torch| <= atol + rtol * |torch|`` everywhere
    and, if ``min_cosine`` is given, every row's cosine similarity >= ``min_cosine``.
    """
    _tower_check(vlm, tower)
    inputs = vlm.tower_inputs(tower, batch) if isinstance(batch, PairBatch) else dict(batch)
    module = vlm.tower_module(tower).eval()
    with torch.no_grad():
        ref = _to_numpy(module(**inputs)).astype(np.float32)
    try:
        sess = _ort_session(Path(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot load {str(path)!r}: {_short(exc)}") from exc
    feed = {}
    for i in sess.get_inputs():
        if i.name not in inputs:
            raise ExportError(f"{str(path)!r} wants input {i.name!r}; the {tower} tower gives "
                              f"{', '.join(inputs)}")
        arr = inputs[i.name].detach().cpu().numpy()
        want = _NP_TYPES.get(i.type)
        feed[i.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
    out = np.asarray(sess.run(None, feed)[0]).astype(np.float32)
    n = int(next(iter(inputs.values())).shape[0]) if inputs else 0
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    if out.shape != ref.shape:
        return {"max_abs_diff": float("inf"), "min_cosine": float("nan"), "ok": False,
                "batch": n, "shapes": shapes, "atol": atol, "rtol": rtol,
                "min_cosine_required": min_cosine,
                "error": f"output shape {list(out.shape)} != PyTorch {list(ref.shape)}"}
    diff = np.abs(out - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    a, b = out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    cos = (a * b).sum(1) / denom
    min_cos = float(cos.min()) if cos.size else 1.0
    ok = bool(np.isfinite(out).all() and np.allclose(out, ref, atol=atol, rtol=rtol)
              and (min_cosine is None or min_cos >= min_cosine))
    return {"max_abs_diff": max_abs, "min_cosine": min_cos, "ok": ok, "batch": n,
            "shapes": shapes, "atol": atol, "rtol": rtol, "min_cosine_required": min_cosine}


def _check_batch(vlm, tower: str, example: PairBatch, check: PairBatch) -> PairBatch:
    """``check``, grown by one pair if it would repeat the example's size on a dynamic axis.

    The extra pair's caption is the first caption said twice, so it is longer (a different
    sequence length), unless the captions already hit the tokenizer's maximum length.
    """
    axes = vlm.dynamic_axes(tower)
    example = _example_batch(example)
    ex = vlm.tower_inputs(tower, example)
    ck = vlm.tower_inputs(tower, check)

    def same(a, b):
        return any(k in b and a[k].shape[ax] == b[k].shape[ax]
                   for k, dims in axes.items() if k in a for ax in dims)

    if len(check) and same(ex, ck):
        extra = 1 if len(check) + 1 != len(example) else 2
        cap = check.captions[0]
        return PairBatch(list(check.images) + [check.images[0]] * extra,
                         list(check.captions) + [f"{cap} {cap}"] * extra)
    return check


def _fmt(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else str(x)


def export_model(vlm, out_dir: str | Path, example: PairBatch, check: PairBatch, *,
                 fp16: bool = False, towers: Iterable[str] | None = None,
                 progress: Progress = NULL, opset: int | None = None,
                 atol: float | None = None, rtol: float | None = None,
                 min_cosine: float | None = None) -> ExportResult:
    """Export every tower to ``out_dir/<tower>.onnx``, validate each on ``check``.

    Tolerances default to :data:`DEFAULT_TOLERANCES` for fp32 or fp16. If any tower is over
    tolerance, raises ONE :class:`ExportError` naming every failing tower, its max abs diff
    (and cosine) and the tolerance, and writes nothing; otherwise the files appear in
    ``out_dir`` only once all towers passed (other files in ``out_dir`` are left alone; an
    existing ``<tower>.onnx`` is replaced).
    """
    towers = tuple(towers) if towers is not None else tuple(vlm.towers)
    if not towers:
        raise ConfigError("no towers to export")
    for t in towers:
        _tower_check(vlm, t)
    tol = dict(DEFAULT_TOLERANCES[bool(fp16)])
    for k, v in (("atol", atol), ("rtol", rtol), ("min_cosine", min_cosine)):
        if v is not None:
            tol[k] = v
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"export folder {str(out_dir)!r} exists and is a file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create export folder {str(out_dir)!r}: {exc}") from exc
    start = time.perf_counter()
    stage = temp_sibling(out_dir / "onnx", "stage")
    stage.mkdir()
    exporters, checks = {}, {}
    try:
        with progress.task("export onnx", total=len(towers)) as task:
            for tower in towers:
                _, exporters[tower] = _export_tower(vlm, tower, stage / f"{tower}.onnx", example,
                                                    fp16=fp16, opset=opset)
                batch = _check_batch(vlm, tower, example, check)
                checks[tower] = validate_tower(vlm, tower, stage / f"{tower}.onnx", batch, **tol)
                task.advance()
        failing = [t for t in towers if not checks[t]["ok"]]
        if failing:
            parts = []
            for t in failing:
                c = checks[t]
                msg = (f"{t}: max abs diff {_fmt(c['max_abs_diff'])} over tolerance "
                       f"(atol {tol['atol']:g}, rtol {tol['rtol']:g})")
                if tol["min_cosine"] is not None:
                    msg += f", min cosine {_fmt(c['min_cosine'])} (need >= {tol['min_cosine']:g})"
                if "error" in c:
                    msg += f", {c['error']}"
                parts.append(msg)
            prec = "fp16" if fp16 else "fp32"
            raise ExportError(f"{prec} ONNX export does not match PyTorch for {len(failing)} "
                              f"tower(s): " + "; ".join(parts))
        paths = {}
        for tower in towers:
            name = f"{tower}.onnx"
            if (stage / (name + ".data")).exists():
                os.replace(stage / (name + ".data"), out_dir / (name + ".data"))
            elif (out_dir / (name + ".data")).is_file():
                (out_dir / (name + ".data")).unlink()
            os.replace(stage / name, out_dir / name)
            paths[tower] = out_dir / name
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ExportResult(
        paths=paths,
        max_abs_diff={t: checks[t]["max_abs_diff"] for t in towers},
        min_cosine={t: checks[t]["min_cosine"] for t in towers},
        fp16=bool(fp16), seconds=time.perf_counter() - start, exporter=exporters,
        validation=checks,
    )


# --------------------------------------------------------------------------------------------
# sparsity of an exported model
# --------------------------------------------------------------------------------------------
def _load(path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise OutputError(f"ONNX file {str(path)!r} does not exist")
    return onnx.load(str(path))


def onnx_sparsity(path: str | Path) -> dict[str, float]:
    """Fraction of exact zeros in every float initializer of the model at ``path``."""
    out = {}
    for t in _load(path).graph.initializer:
        if t.data_type in _FLOAT_TYPES:
            arr = numpy_helper.to_array(t)
            out[t.name] = float((arr == 0).sum() / arr.size) if arr.size else 0.0
    return out


def is_nm(arr: np.ndarray, axis: int, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive entries along ``axis`` has <= ``n`` nonzeros."""
    a = np.moveaxis(np.asarray(arr), axis, -1)
    if a.shape[-1] % m:
        return False
    groups = (a != 0).reshape(*a.shape[:-1], a.shape[-1] // m, m).sum(-1)
    return bool((groups <= n).all())


def weight_input_axes(model: onnx.ModelProto) -> dict[str, int]:
    """2-D initializers used as MatMul/Gemm weights -> their input (reduction) axis.

    ``MatMul(x, W)`` stores W as ``[d_in, d_out]`` (axis 0); ``Gemm(x, W, transB=1)`` as
    ``[d_out, d_in]`` (axis 1), like ``torch.nn.Linear``. Cast/Identity/Transpose between
    the initializer and the node are followed (a 2-D Transpose flips the axis).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def source(name: str, axis: int):
        for _ in range(8):
            if name in inits:
                return name, axis
            n = producer.get(name)
            if n is None or n.op_type not in ("Cast", "Identity", "Transpose"):
                return None, axis
            if n.op_type == "Transpose":
                perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
                if perm not in (None, [1, 0]):
                    return None, axis
                axis = 1 - axis
            name = n.input[0]
        return None, axis

    found: dict[str, int] = {}
    for n in g.node:
        if n.op_type == "MatMul":
            cands = [(n.input[0], 1), (n.input[1], 0)]  # A [.., K] @ B [K, N]
        elif n.op_type == "Gemm":
            attrs = {a.name: a.i for a in n.attribute}
            cands = [(n.input[0], 0 if attrs.get("transA") else 1),
                     (n.input[1], 1 if attrs.get("transB") else 0)]
        else:
            continue
        for name, axis in cands:
            src, ax = source(name, axis)
            if src is not None and len(inits[src].dims) == 2:
                found.setdefault(src, ax)
    return found


def check_nm(path: str | Path, n: int = 2, m: int = 4) -> list[str]:
    """Names of the 2-D MatMul/Gemm weight initializers that are NOT ``n:m`` sparse along
    their input dimension (at most ``n`` nonzeros in each group of ``m`` input columns)."""
    if not 0 < n < m:
        raise ConfigError(f"{n}:{m} is not a valid N:M pattern; need 0 < N < M")
    model = _load(path)
    inits = {t.name: t for t in model.graph.initializer}
    return [name for name, axis in weight_input_axes(model).items()
            if not is_nm(numpy_helper.to_array(inits[name]), axis, n, m)]
