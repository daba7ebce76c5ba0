"""What a GPU latency number must not include: recompiles, per-call host work, plans.

    compiled = StaticCompile(module)          # one static graph per input shape, counted
    compiled(pixel_values=x); compiled.compiles
    graphed = GraphedCall(fn)                 # CUDA graph per input shape, then replay
    layer = PlannedSparseLinear(linear)       # cuSPARSELt: one algorithm search per shape
    host_bound(host_ms=0.9, gpu_ms=1.0)       # True: the GPU waits on the host

- :class:`StaticCompile`: ``torch.compile(dynamic=False)`` through a backend that counts its
  compilations. With the default ``dynamic=None`` the second batch size makes dynamo
  recompile the frame with symbolic shapes, and the symbolic graph was slower than eager on
  the H200 (ViT-B/16 batch 8: 7.42 ms compiled, 4.18 ms eager; issue 25); a static graph per
  batch size is what a server with fixed batch sizes runs. The count goes into the latency
  row, and a compile inside the timed loop marks the row.
- :class:`GraphedCall`: ``torch.cuda.CUDAGraph`` capture after a few warm-up calls on a side
  stream (PyTorch's "CUDA Graphs" recipe), once per input signature; later calls replay it.
  The inputs given at capture are the graph's static inputs (kept alive here); a call with
  other tensors of the same shape copies them in first. Small batches of a ViT are
  launch-bound in eager mode (hundreds of kernels, a few microseconds of host work each):
  replay issues the whole tower with one call.
- :class:`PlannedSparseLinear`: the 2:4 weight compressed once (``torch._cslt_compress``),
  and per input row count one ``torch._cslt_sparse_mm_search`` (the algorithm id) and one
  zero-padded input buffer, so a call is one copy into the buffer (only when the row count is
  not a multiple of 16) and one ``torch._cslt_sparse_mm``. 16, not PyTorch's dense minimum of
  8: on the H200 the direct op at 197 rows failed in ``cusparseLtDenseDescriptorInit`` and
  left the CUDA context unusable (``benchmarks/gpu_semi_structured.py``). PyTorch's
  semi-structured tensor subclass instead pads with a fresh ``F.pad``, narrows and copies the
  output, and runs algorithm 0 without a search, on every call; under graph replay the host
  part of either disappears, the extra device copies of the subclass do not.
- :func:`host_bound`: a row's host issue time (the wall time of the call that enqueues the
  work, before any synchronisation) against its GPU time (CUDA events): when the host needs
  at least :data:`HOST_BOUND_RATIO` of the GPU time, the number measures launch overhead as
  much as kernels, and the row says so.

Everything here but the CUDA calls runs on CPU (the tests use the ``eager`` compile backend
and fake cuSPARSELt ops); the GPU parts are checked by tests marked ``gpu``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: host issue time / GPU time at or above which a latency row is host-bound
HOST_BOUND_RATIO = 0.8


def host_bound(host_ms: float | None, gpu_ms: float | None,
               ratio: float = HOST_BOUND_RATIO) -> bool | None:
    """Whether issuing the work took at least ``ratio`` of the GPU's time for it (None when
    either time is unknown, e.g. on CPU where the host runs the kernels itself)."""
    if host_ms is None or gpu_ms is None or gpu_ms <= 0:
        return None
    return bool(host_ms >= ratio * gpu_ms)


class CompileCounter:
    """A ``torch.compile`` backend that counts the graphs it compiles, then hands each to
    ``backend`` (a registered backend name: ``inductor``, or ``eager`` for tests)."""

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        import torch._dynamo

        self.compiles += 1
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


class StaticCompile:
    """``module`` under ``torch.compile(dynamic=False)``: one static graph per input shape
    (never a symbolic one), compilations counted in :attr:`compiles`."""

    def __init__(self, module, backend: str = "inductor"):
        self.counter = CompileCounter(backend)
        self.module = module
        self.fn = torch.compile(module, dynamic=False, backend=self.counter)

    @property
    def compiles(self) -> int:
        return self.counter.compiles

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _signature(inputs: dict) -> tuple:
    return tuple((k, tuple(v.shape), str(v.dtype), str(v.device)) for k, v in inputs.items())


class GraphedCall:
    """``fn(**inputs)`` captured as a CUDA graph per input signature and replayed (needs
    CUDA). ``warmup`` calls on a side stream precede each capture (lazy initialisation,
    cuBLAS/cuSPARSELt handles and plans, autotuning happen there, not in the graph)."""

    def __init__(self, fn: Callable, warmup: int = 3):
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple] = {}

    @property
    def captures(self) -> int:
        return len(self.graphs)

    def __call__(self, **inputs):
        hit = self.graphs.get(_signature(inputs))
        if hit is None:
            hit = self.graphs[_signature(inputs)] = self._capture(inputs)
        graph, static, out = hit
        for k, v in inputs.items():
            if v is not static[k]:
                static[k].copy_(v)
        graph.replay()
        return out

    def _capture(self, inputs: dict) -> tuple:
        static = dict(inputs)  # the graph reads these tensors: keep them alive
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode():
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(**static)
        torch.cuda.synchronize()
        return graph, static, out


class _CusparseltOps:
    """The three PyTorch cuSPARSELt ops (CUDA builds with cuSPARSELt)."""

    @staticmethod
    def compress(w):
        return torch._cslt_compress(w)

    @staticmethod
    def search(packed, dense_t, bias) -> int:
        return int(torch._cslt_sparse_mm_search(packed, dense_t, bias=bias,
                                                transpose_result=True))

    @staticmethod
    def mm(packed, dense_t, bias, alg_id: int):
        return torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=True,
                                     alg_id=alg_id)


class PlannedSparseLinear(nn.Module):
    """A 2:4 ``nn.Linear`` on cuSPARSELt with its plan made once per input row count.

    Built from the dense (2:4) weight and bias; ``ops`` supplies ``compress``, ``search``
    and ``mm`` (default: PyTorch's cuSPARSELt ops; tests pass CPU stand-ins). :attr:`plans`
    maps a row count to ``(algorithm id, padded input buffer or None)``; :attr:`searches`
    counts the algorithm searches made."""

    def __init__(self, weight, bias=None, *, min_rows: int = 16, ops=None):
        super().__init__()
        self.ops = ops or _CusparseltOps
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.packed = self.ops.compress(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach()
        self.min_rows = int(min_rows)
        self.plans: dict[int, tuple[int, torch.Tensor | None]] = {}
        self.searches = 0

    def _plan(self, x2) -> tuple:
        m = int(x2.shape[0])
        pad = (-m) % self.min_rows
        buf = None
        if pad:  # zero rows stay zero: the extra output rows are never read
            buf = torch.zeros(m + pad, self.in_features, dtype=x2.dtype, device=x2.device)
        probe = buf if buf is not None else x2.contiguous()
        alg = self.ops.search(self.packed, probe.t(), self.bias)
        self.searches += 1
        self.plans[m] = (alg, buf)
        return self.plans[m]

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        m = int(x2.shape[0])
        alg, buf = self.plans.get(m) or self._plan(x2)
        if buf is not None:
            buf[:m].copy_(x2)
            dense = buf
        else:
            dense = x2 if x2.is_contiguous() else x2.contiguous()
        out = self.ops.mm(self.packed, dense.t(), self.bias, alg)  # [rows, out_features]
        return out[:m].reshape(*x.shape[:-1], self.out_features)


def attn_implementation(module) -> str | None:
    """The attention implementation an HF module runs (``sdpa``, ``eager``,
    ``flash_attention_2``, ...): its own config's, else the first submodule config's."""
    for m in ([module] + [m for _, m in module.named_modules()]) if hasattr(
            module, "named_modules") else [module]:
        cfg = getattr(m, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        if impl:
            return str(impl)
    return None


__all__ = ["HOST_BOUND_RATIO", "host_bound", "CompileCounter", "StaticCompile", "GraphedCall",
           "PlannedSparseLinear", "attn_implementation"]
