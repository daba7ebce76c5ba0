"""Shared fixtures: small real HF models built from configs (no network, no training)."""

from __future__ import annotations

import pytest
import torch

# Tiny models run faster on one thread, and two threads on a busy 2-core CI machine make
# small matmuls dramatically slower; the suite pins one intra-op thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh empty folder of its own: nothing a user ran in the checkout
    (the README's ``vlcompress prune-export`` writes ``vlcompress-out/`` there) changes a
    result, and a command's default output (``--out vlcompress-out``) lands in the test's
    folder, not in the checkout or beside another test's."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def make_tiny_random_clip(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4,
                          mlp: int = 64, image_size: int = 32, patch: int = 8):
    """A randomly initialised ``CLIPModel`` adapter with the shapes tokenizer; seconds to build."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from vlcompress.data.tokenizer import build_shapes_tokenizer
    from vlcompress.models.clip import CLIP

    torch.manual_seed(seed)
    tok = build_shapes_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    img = CLIPImageProcessor(size={"shortest_edge": image_size},
                             crop_size={"height": image_size, "width": image_size},
                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return CLIP(model, tok, img, name="tiny-random-clip", source="test")


@pytest.fixture
def tiny_random_clip():
    return make_tiny_random_clip()


@pytest.fixture
def calib_small():
    from vlcompress.data import load_calibration

    return load_calibration("shapes", n=16, batch_size=8)


class RecordingProgress:
    """A Progress that records (description, total) on every advance, for tests."""

    def __init__(self):
        self.seen: list[tuple[str, int | None]] = []

    def task(self, description, total=None):
        from contextlib import contextmanager

        seen = self.seen

        @contextmanager
        def _cm():
            class T:
                def advance(self, n=1):
                    seen.append((description, total))

                def update(self, **kw):
                    pass

            yield T()

        return _cm()


def make_tiny_random_siglip(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4,
                            mlp: int = 64, image_size: int = 32, patch: int = 8):
    """A randomly initialised ``SiglipModel`` adapter with the shapes tokenizer."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from vlcompress.data.tokenizer import build_shapes_tokenizer
    from vlcompress.models.siglip import SigLIP

    torch.manual_seed(seed)
    tok = build_shapes_tokenizer()
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch),
    )
    model = SiglipModel(cfg).eval()
    img = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return SigLIP(model, tok, img, name="tiny-random-siglip", source="test")


def make_tiny_random_blip(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4,
                          mlp: int = 64, image_size: int = 32, patch: int = 8):
    """A randomly initialised ``BlipForImageTextRetrieval`` adapter with the shapes tokenizer."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    from vlcompress.data.tokenizer import build_shapes_tokenizer
    from vlcompress.models.blip import BLIP

    torch.manual_seed(seed)
    tok = build_shapes_tokenizer()
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=16, encoder_hidden_size=hidden,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, sep_token_id=3),
        # BLIP's vision default initializer_range is 1e-10, which makes a random tower output
        # ~1e-7 and every numerical check vacuous; 0.02 gives O(1) activations.
        vision_config=dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch,
                           initializer_range=0.02),
        image_text_hidden_size=16,
    )
    model = BlipForImageTextRetrieval(cfg).eval()
    img = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BLIP(model, tok, img, name="tiny-random-blip", source="test")


def load_benchmark(name: str, alias: str | None = None):
    """A benchmark script (``benchmarks/NAME.py``) imported as a module, with its folder on
    ``sys.path`` while it loads (for its ``_common`` import)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    spec = importlib.util.spec_from_file_location(alias or name, bench / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(bench))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    return mod


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run wherever torch sees a CUDA GPU and skip, with the reason, where it
    does not (a marker deselected in addopts would skip them silently on a GPU machine too)."""
    if torch.cuda.is_available():
        return
    why = pytest.mark.skip(reason=f"needs a CUDA GPU; torch {torch.__version__} sees none here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(why)


def set_option_defaults(monkeypatch, method: str, **defaults) -> None:
    """Make ``method``'s declared option defaults ``defaults`` for one test (few steps)."""
    import dataclasses

    from vlcompress.methods.registry import _METHODS, get_method

    m = get_method(method)
    opts = tuple(dataclasses.replace(o, default=defaults.get(o.name, o.default)) for o in m.options)
    monkeypatch.setitem(_METHODS, method, dataclasses.replace(m, options=opts))


# --------------------------------------------------------------------------------------------
# ONNX export reuse: the dynamo exporter is most of the suite's time (tens of seconds a tower
# on a busy 2-core machine), and many tests export the very same module on the very same
# inputs (the dense tiny-clip of every prune-export, the dense tiny random models of each
# family). An export is a pure function of the module (classes, attributes, configs,
# weights), its example inputs (values included), the dynamic axes and the opset, so within
# one session its result is reused when all of those are equal; the first export of each is
# real. Failures are never stored (a failing export fails every time). A module that sets
# ``ONNX_EXPORT_REUSE = False`` (tests/test_export.py: the exporter itself, its quietness
# and its fallback, is what it tests) always exports for real.
# --------------------------------------------------------------------------------------------
_EXPORTS: dict[str, bytes] = {}
_EXPORT_COUNTS = {"exported": 0, "reused": 0}
_PRIMITIVE = (bool, int, float, str, type(None))


def _export_fingerprint(module, inputs, axes, opset) -> str:
    import hashlib
    import json

    h = hashlib.sha256()

    def put(*parts):
        for p in parts:
            h.update(repr(p).encode())
            h.update(b"\x00")

    def put_tensor(name, t):
        t = t.detach().cpu().contiguous()
        put(name, t.dtype, tuple(t.shape))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    def put_value(key, v):
        if isinstance(v, _PRIMITIVE):
            put(key, v)
        elif isinstance(v, torch.Tensor):  # a plain tensor attribute: its values, not its repr
            put_tensor(key, v)
        elif isinstance(v, tuple | list):
            put(key, type(v).__name__, len(v))
            for i, x in enumerate(v):
                put_value(f"{key}[{i}]", x)
        elif isinstance(v, dict):
            put(key, "dict", len(v))
            for k, x in sorted(v.items(), key=lambda kv: repr(kv[0])):
                put_value(f"{key}[{k!r}]", x)
        elif hasattr(v, "to_dict"):  # a transformers config, with the private fields to_dict drops
            put(key, json.dumps(v.to_dict(), sort_keys=True, default=repr),
                sorted((k, x) for k, x in vars(v).items() if isinstance(x, _PRIMITIVE)))
        elif callable(v):
            put(key, getattr(v, "__qualname__", type(v).__qualname__), id(v))
        else:  # dtypes, devices, enums...; an object that shows only its address: its type
            r = repr(v)
            put(key, type(v).__module__, type(v).__qualname__, "" if " at 0x" in r else r)

    put(torch.__version__, torch.get_default_dtype(), opset,
        sorted((k, sorted(dict(v).items()) if v else None) for k, v in axes.items()))
    for name, m in module.named_modules(remove_duplicate=False):
        put(name, type(m).__module__, type(m).__qualname__, id(type(m).forward))
        for k, v in sorted(vars(m).items()):
            if k in ("_parameters", "_buffers", "_modules") or k.endswith("hooks"):
                if k.endswith("hooks") and v:
                    put(k, [id(f) for f in v.values()])
                continue
            put_value(k, v)
    for name, t in module.state_dict(keep_vars=True).items():
        put_tensor(name, t)
    for name, t in module.named_buffers(remove_duplicate=False):  # non-persistent ones too
        put_tensor(name, t)
    for name in sorted(inputs):
        v = inputs[name]
        put_tensor(name, v) if isinstance(v, torch.Tensor) else put_value(name, v)
    return h.hexdigest()


@pytest.fixture(autouse=True, scope="module")  # module: before the modules' own fixtures
def _reuse_onnx_exports(request):
    if not getattr(request.module, "ONNX_EXPORT_REUSE", True):
        yield
        return
    import onnx

    import vlcompress.exporters.onnx as onnx_export

    real = onnx_export._export_dynamo

    def export(module, inputs, axes, opset):
        key = _export_fingerprint(module, inputs, axes, opset)
        if key in _EXPORTS:
            _EXPORT_COUNTS["reused"] += 1
            return onnx.load_from_string(_EXPORTS[key])
        proto = real(module, inputs, axes, opset)
        _EXPORT_COUNTS["exported"] += 1
        if proto.ByteSize() < 2**30:
            _EXPORTS[key] = proto.SerializeToString()
        return proto

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "_export_dynamo", export)
        yield


def pytest_terminal_summary(terminalreporter):
    if any(_EXPORT_COUNTS.values()):
        terminalreporter.write_line(
            "dynamo ONNX exports: {exported} run, {reused} reused (tests/conftest.py)".format(
                **_EXPORT_COUNTS))
