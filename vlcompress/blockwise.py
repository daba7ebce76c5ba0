"""Block-sequential calibration: run one encoder block at a time on cached inputs.

The structure of SparseGPT's reference loop (IST-DASLab/sparsegpt ``opt.py``: ``Catcher`` on
layer 0, then per layer: hooks, run, prune, run again, the outputs become the next inputs),
for every tower a family has. Cost is linear in depth: the calibration pairs go through the
embeddings once per capture and through each block once (twice when the next block must see
pruned inputs), instead of one whole-model pass per block index.

:func:`run_blockwise` does, for the ``layers`` given (any subset of ``vlm.prunable_layers()``):

1. **group** them by encoder stack (the ``nn.ModuleList`` that holds their block: vision
   ``...encoder.layers``, text ``...encoder.layer`` ...) and block index;
2. **capture** each stack's block-0 inputs: every batch is encoded once, token masks per
   modality are kept, and the model runs with every block of the stacks still to do replaced
   by a stand-in that records its first call's ``(args, kwargs)`` (hidden states, attention
   mask, ...) and passes the hidden states through unchanged, so one capture costs about the
   embeddings. Each call of a stack's layer 0 within one batch is one *stream* (BLIP's text
   encoder could be called in several modes). A stream whose layer reads another tower
   (``encoder_hidden_states`` not None: BLIP's cross-attention reads the vision tower's
   output) is captured in a second round, after the stacks it may read are done, with those
   stacks running for real (their pruned weights): the fusion tower sees the vision tower as
   it will be at inference;
3. per stack, per block in order: hooks (:class:`~vlcompress.calibrate.StatsAccumulator`, the
   same accumulation as :func:`~vlcompress.calibrate.collect_stats`, padding excluded) on the
   block's prunable layers while the block alone runs on every cached batch; then
   ``visit(block, stats)`` (the method prunes, may update weights); then the block's outputs
   become the next block's inputs: ``inputs="pruned"`` runs the block again after ``visit``
   (the reference's choice: each block is calibrated on the inputs it will see at
   inference), ``inputs="dense"`` keeps the outputs of the first run (the dense model's
   activations throughout; one run per block). When the first run's output is not kept,
   it stops at the last hooked layer's input (:class:`_StopAfterLast`: a ViT block's MLP
   output product, a third of its matmul work, is not computed for nothing).

The kwargs a stack's layer 0 received (attention masks, position embeddings, cross-attention
inputs) are reused for every block of that stack, as the HF encoders pass the same ones to
each layer. Memory: the model, one stream's cached hidden states for the current block and
the next (``2 x pairs x tokens x width`` floats), the per-batch kwargs, and the statistics of
one block's layers. Cached tensors (hidden states and kwargs together, one
:class:`CacheBudget`) beyond ``max_cache_bytes`` (default: unlimited) are streamed to
``cache_dir`` (default: a temporary folder, removed at the end) and read back one batch at a
time; with ``device`` the kwargs stay where they were captured and move to the device one batch
at a time (BLIP's ``encoder_hidden_states`` are as large as the vision tower's hidden states).

Methods built on it: ``sparsegpt`` (``inputs="pruned"``, Gram matrices) and ``wanda-seq``
(``inputs="pruned"``, Wanda's reference loop; ``"dense"`` gives one-shot ``wanda``). Any
per-block method (ECoFLaP's block scores) can call :func:`run_blockwise` with its own
``visit``. The engine touches one block at a time through ``stack[i]``: with ``device``
(``cuda``) each block moves there for its turn and back after (:class:`_OnDevice`), with the
cache and statistics there, so the GPU holds one block, not the model (measured on an H200:
``benchmarks/prune_offload.py``). Disk offload of idle blocks (accelerate's
``device_map="disk"`` style) would plug in at the same seam, loading block i before its turn
and releasing it after: a model may carry a block store (``vlm.block_store``,
:class:`vlcompress.methods.offload.BlockStore`) that loads a block of an offloaded stack from the
checkpoint's shards before its turn and writes it out and frees it after; whole-model passes
run with those stacks skipped (:func:`vlcompress.methods.offload.prune_offloaded`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .calibrate import LayerStats, StatsAccumulator, batch_masks
from .errors import ConfigError
from .methods.registry import Option
from .models.base import VLM, PrunableLayer
from .progress import NULL, Progress

INPUTS = ("pruned", "dense")

def check_device(value) -> str | None:
    """Why ``value`` cannot be the ``device`` blocks run on (None when it can): ``""`` (where
    each block is), ``cpu``, ``cuda`` or ``cuda:N`` of a visible GPU."""
    if value in ("", None):
        return None
    try:
        dev = torch.device(str(value))
    except (RuntimeError, ValueError):
        return "allowed: '' (where each block is), cpu, cuda, cuda:N"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"device type {dev.type!r} is not supported; allowed: '', cpu, cuda, cuda:N"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch here; allowed: '' or cpu"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


#: what a block-sequential method exposes about its activation cache and the device its blocks
#: run on (``--method-option``)
CACHE_OPTIONS = (
    Option("max_cache_mb", float, -1.0, "cached activations kept in memory, MiB (hidden "
           "states of two blocks and per-batch inputs such as cross-attention's image "
           "tokens, together); beyond it they stream to disk one batch per file (< 0: no "
           "limit, 0: all on disk)",
           minimum=-1.0),
    Option("cache_dir", str, "", "folder for the streamed hidden states (default: a "
           "temporary folder, removed at the end)"),
    Option("device", str, "", "run each block on this device (cuda, cuda:N), moved there for "
           "its turn and back after, with the cached hidden states and statistics there: the "
           "rest of the model stays where it is (default: where each block is)",
           validate=check_device),
)


def cache_kwargs(options: dict) -> dict:
    """``max_cache_bytes`` and ``cache_dir`` for :func:`run_blockwise` from a method's
    checked options (:data:`CACHE_OPTIONS`)."""
    mb = float(options.get("max_cache_mb", -1.0))
    return {"max_cache_bytes": None if mb < 0 else int(mb * (1 << 20)),
            "cache_dir": options.get("cache_dir") or None,
            "device": options.get("device") or None}


@dataclass
class BlockRef:
    """One encoder block seen by the engine: its stack path, index, module and the
    prunable layers of ``layers`` inside it (in the adapter's order)."""

    stack: str
    index: int
    module: nn.Module
    layers: list[PrunableLayer]
    #: where the block's weights live between turns (``visit`` runs with them on the run's
    #: ``device``; results kept past the visit, such as masks, belong here)
    home: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def modalities(self) -> list[str]:
        return sorted({ly.modality for ly in self.layers})


@dataclass
class BlockwiseRun:
    """What :func:`run_blockwise` did: ``forward_seconds`` (capture and block runs, the
    calibration part), ``visit_seconds`` (inside ``visit``), ``captures`` (capture rounds),
    ``block_runs`` (block forwards over the cached data), ``cut_runs`` (batches of a hooked
    run ended early, :class:`_StopAfterLast`), ``spilled_bytes`` (hidden states
    written to disk) and ``order`` (``stack.index`` of each visited block)."""

    forward_seconds: float = 0.0
    visit_seconds: float = 0.0
    captures: int = 0
    block_runs: int = 0
    cut_runs: int = 0  # batches whose hooked run ended at the last hooked layer's input
    spilled_bytes: int = 0
    order: list[str] = field(default_factory=list)


class CacheBudget:
    """The bytes every :class:`ActivationCache` of one run may keep in memory together
    (``max_bytes``; None: no limit): hidden states of the current and the next block and the
    per-batch keyword arguments (BLIP's ``encoder_hidden_states``) draw on the same limit."""

    def __init__(self, max_bytes: int | None):
        self.max_bytes, self.used = max_bytes, 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) when that would pass the limit."""
        if self.max_bytes is not None and self.used + size > self.max_bytes:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (tuples, lists, dicts nested)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


class ActivationCache:
    """Per-batch items (a tensor, or tuples / lists / dicts holding tensors) kept in memory
    while the run's :class:`CacheBudget` allows, the rest on disk (one file per batch under
    ``folder``, written with its descriptor closed, so a deleted file frees its space at once
    and a run may spill any number of batches). ``len``, ``[i]`` and ``append``;
    :meth:`close` deletes the files and returns the memory to the budget.

    ``device``: where ``[i]`` returns the item (None: as stored). ``store_on_device``: items
    kept in memory move there on ``append`` (the hidden states, which every block reads);
    else they stay where they were given and move one batch per ``[i]`` (the per-batch
    keyword arguments, read once per block), so the device holds one batch of them."""

    def __init__(self, budget: CacheBudget | int | None, folder: Path, run: BlockwiseRun,
                 device: torch.device | None = None, *, store_on_device: bool = True):
        if not isinstance(budget, CacheBudget):
            budget = CacheBudget(budget)
        self.budget, self.folder, self.run, self.device = budget, folder, run, device
        self.store_on_device = store_on_device
        self.items: list = []
        self.bytes = 0  # held in memory
        self.spilled: list[bool] = []

    def append(self, x) -> None:
        x = _detach(x)
        size = sum(t.numel() * t.element_size() for t in _tensors(x))
        if self.budget.take(size):
            self.items.append(_to(x, self.device) if self.store_on_device else x)
            self.spilled.append(False)
            self.bytes += size
            return
        fd, name = tempfile.mkstemp(suffix=".pt", dir=self.folder)
        os.close(fd)  # torch.save opens the path itself
        path = Path(name)
        torch.save(_to(x, torch.device("cpu")), path)
        self.items.append(path)
        self.spilled.append(True)
        self.run.spilled_bytes += size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        it = self.items[i]
        if self.spilled[i]:
            return torch.load(it, weights_only=True, map_location=self.device)
        return _to(it, self.device)

    def close(self) -> None:
        for it, spilled in zip(self.items, self.spilled, strict=True):
            if spilled:
                it.unlink(missing_ok=True)
        self.items.clear()
        self.spilled.clear()
        self.budget.give(self.bytes)
        self.bytes = 0


@dataclass
class _Stream:
    """One stream of a stack: per batch, the hidden states and the other call arguments
    ``(args[1:], kwargs)``, both in activation caches under the run's one memory limit."""

    hidden: ActivationCache
    rest: ActivationCache  # (args[1:], kwargs) per batch; moved to the device per batch
    masks: list[dict] = field(default_factory=list)  # per batch, StatsAccumulator.set_masks
    positional: bool = True  # hidden states passed positionally (else as hidden_states=)

    def close(self) -> None:
        self.hidden.close()
        self.rest.close()


class _Skip(nn.Module):
    """Stand-in for a block during capture: records the call (layer 0 only) and returns the
    hidden states unchanged."""

    def __init__(self, record: Callable | None):
        super().__init__()
        self.record = record

    def forward(self, *args, **kwargs):
        if self.record is not None:
            self.record(args, kwargs)
        return args[0] if args else kwargs["hidden_states"]


def _stack_of(model: nn.Module, ly: PrunableLayer) -> str:
    parts = ly.name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == str(ly.block) and i > 0:
            path = ".".join(parts[:i])
            if isinstance(model.get_submodule(path), nn.ModuleList):
                return path
    raise ConfigError(f"layer {ly.name}: no encoder stack (nn.ModuleList) holds its block "
                      f"{ly.block}; block-sequential calibration needs one")


def group_blocks(vlm: VLM, layers: Sequence[PrunableLayer]) -> dict[str, list[BlockRef]]:
    """``{stack path: [BlockRef, ...]}`` of ``layers``, stacks in first-seen order, blocks in
    index order (blocks with no layer of ``layers`` in between are run but not visited)."""
    stacks: dict[str, dict[int, list[PrunableLayer]]] = {}
    for ly in layers:
        stacks.setdefault(_stack_of(vlm.model, ly), {}).setdefault(int(ly.block), []).append(ly)
    out = {}
    for path, blocks in stacks.items():
        mods = vlm.model.get_submodule(path)
        out[path] = [BlockRef(path, b, mods[b], blocks[b], _home(mods[b])) for b in sorted(blocks)]
    return out


_TRIM: Callable | bool | None = None


def release_freed_memory() -> None:
    """Hand the heap pages freed so far back to the OS (glibc ``malloc_trim(0)``; nothing
    where the C library has no such call).

    The engine frees large buffers (a block's Gram matrices and factors, a spent activation
    cache) between small ones that live on (packed masks, the next block's statistics), and
    glibc raises its mmap threshold once a large block is freed, so later large buffers come
    from the heap and the small survivors pin its pages: the resident set creeps up block
    after block. Trimming after each block's visit and each OBS layer keeps it flat; the
    effect on peak RSS, and the calls' time inside the prune times, are in
    ``benchmarks/prune_cost.py``'s results (docs/benchmarks.md, "SparseGPT block by block").
    """
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _TRIM = getattr(libc, "malloc_trim", False)
        except OSError:
            pass
    if _TRIM:
        _TRIM(0)


def _home(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    # a block offloaded to disk (``meta`` between turns) is loaded into host memory
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")


def _store(vlm: VLM):
    """The model's block store (:class:`vlcompress.methods.offload.BlockStore`: blocks of some
    stacks live on disk and are loaded for their turn), or None."""
    return getattr(vlm, "block_store", None)


def _offloaded(vlm: VLM) -> tuple[str, ...]:
    st = _store(vlm)
    return tuple(st.stacks) if st is not None else ()


@contextlib.contextmanager
def _turn(vlm: VLM, stack: str, index: int, module: nn.Module):
    """The block's weights loaded for its turn and released after, when a store holds it."""
    st = _store(vlm)
    if st is None:
        yield
        return
    with st.block(stack, index, module):
        yield


@contextlib.contextmanager
def _skipped(model: nn.Module, stacks: Sequence[str], recorders: dict | None = None):
    """Every block of ``stacks`` replaced by a :class:`_Skip` for the body (layer 0 records
    its call where ``recorders`` has one), the real blocks back after. The stand-ins carry the
    blocks' forward hooks (transformers 5 records hidden states with them)."""
    saved: dict[str, list[nn.Module]] = {}
    _install_output_hooks(model)
    try:
        for s in stacks:
            mods = model.get_submodule(s)
            saved[s] = list(mods)
            for i in range(len(mods)):
                mods[i] = _Skip((recorders or {}).get(s) if i == 0 else None)
                for hook in saved[s][i]._forward_hooks.values():  # e.g. hidden-state recorders
                    mods[i].register_forward_hook(hook)
        yield
    finally:
        for s, mods in saved.items():
            stack = model.get_submodule(s)
            for i, m in enumerate(mods):
                stack[i] = m


def _to(obj, device: torch.device | None):
    """``obj`` with every tensor in it (tuples, lists, dicts) on ``device`` (None: as is)."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _OnDevice:
    """``with _OnDevice(block, device):`` the block's weights on ``device`` for the body, back
    where they were after (errors too). The Parameter objects stay the same (``.to`` swaps
    their data), so :class:`PrunableLayer` references and in-place updates carry over."""

    def __init__(self, module: nn.Module, device: torch.device | None):
        self.module, self.device = module, device
        self.home = _home(module)

    def __enter__(self):
        if self.device is not None and self.device != self.home:
            self.module.to(self.device)
        return self

    def __exit__(self, *exc):
        if self.device is not None and self.device != self.home:
            self.module.to(self.home)
        return False


def _reads_other_tower(layer: nn.Module, args: tuple, kwargs: dict) -> bool:
    try:
        bound = inspect.signature(layer.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    return bound.get("encoder_hidden_states") is not None


def _install_output_hooks(model: nn.Module) -> None:
    """transformers 5 records hidden states with forward hooks on the layer modules,
    installed at the model's first forward: install them now, on the real layers, so that
    the stand-ins can carry them (LLaVA reads a vision layer's hidden states)."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers 4: hidden states are returned, not hooked
        return
    from transformers import PreTrainedModel

    for sub in model.modules():  # each sub-model once, as its own first forward would
        if isinstance(sub, PreTrainedModel) and getattr(sub, "_can_record_outputs", None):
            maybe_install_capturing_hooks(sub)


def _capture(vlm: VLM, data, stacks: list[str], modalities: dict[str, list[str]],
             cache: Callable[..., ActivationCache], run: BlockwiseRun
             ) -> tuple[dict[str, list[_Stream]], set[str]]:
    """One capture round for ``stacks``: ``({stack: streams}, stacks that read another
    tower)``. Every block of ``stacks`` is a :class:`_Skip` during the pass."""
    streams: dict[str, list[_Stream]] = {s: [] for s in stacks}
    dependent: set[str] = set()
    state = {"calls": {}, "masks": None}

    def recorder(stack: str, layer0: nn.Module):
        def record(args, kwargs):
            k = state["calls"].get(stack, 0)
            state["calls"][stack] = k + 1
            st = streams[stack]
            if k == len(st):
                st.append(_Stream(cache(), cache(store_on_device=False)))
            s = st[k]
            kwargs = dict(kwargs)
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest, s.positional = kwargs.pop("hidden_states"), (), False
            s.hidden.append(hidden)
            s.rest.append((rest, kwargs))
            s.masks.append(state["masks"][stack])
            if _reads_other_tower(layer0, (hidden, *rest) if s.positional else rest,
                                  kwargs if s.positional else {"hidden_states": hidden, **kwargs}):
                dependent.add(stack)
        return record

    recorders = {s: recorder(s, vlm.model.get_submodule(s)[0]) for s in stacks}
    # stacks offloaded to disk and not captured now: read by no other, so skipped as well
    off = [s for s in _offloaded(vlm) if s not in stacks]
    try:
        with _skipped(vlm.model, [*stacks, *off], recorders):
            expected: dict[str, int] = {}
            with torch.no_grad():
                for batch in data.batches():
                    encoded = vlm.encode(batch)
                    state["calls"] = {}
                    state["masks"] = {s: batch_masks(vlm, encoded, modalities[s])
                                      for s in stacks}
                    vlm.model(**vlm.model_inputs(encoded))
                    for s in stacks:  # every batch must call each stack the same number of times
                        n = state["calls"].get(s, 0)
                        if expected.setdefault(s, n) != n:
                            raise RuntimeError(f"stack {s}: layer 0 ran {n} times in one batch, "
                                               f"{expected[s]} in the first")
    except BaseException:
        for st in (st for sts in streams.values() for st in sts):
            st.close()  # spilled files in the user's cache_dir go too
        raise
    run.captures += 1
    missing = [s for s in stacks if not streams[s]]
    if missing:
        for st in (st for sts in streams.values() for st in sts):
            st.close()
        raise ConfigError(f"block-sequential calibration: the model's forward never ran "
                          f"{', '.join(missing)} on this data")
    return streams, dependent


class _BlockDone(Exception):
    """Raised by :class:`_StopAfterLast` to end a block's forward early (nothing lost)."""


class _StopAfterLast:
    """Ends a hooked block run as soon as its last hooked layer has had its input recorded,
    when the run's output is not needed (``inputs="pruned"``: the block runs again after
    ``visit``): the rest of the block (a ViT MLP's second product, a third of the block's
    matmul work) would be computed for nothing. The first batch runs whole and is watched:
    only when every hooked layer was called exactly once does it learn the last one, and
    later batches stop at that layer's pre-hook (registered after the statistics' pre-hooks,
    so it runs after them). A block whose layers run more than once is never cut."""

    def __init__(self, layers: Sequence[PrunableLayer]):
        self.names = {ly.module: ly.name for ly in layers}
        self.calls: list[str] = []
        self.last: nn.Module | None = None
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.names]

    def _hook(self, module, args):
        if self.last is not None:
            if module is self.last:
                raise _BlockDone
        elif self.calls is not None:  # the watched first batch
            self.calls.append(self.names[module])

    def batch_done(self) -> None:
        if self.last is None and self.calls is not None:
            if sorted(self.calls) == sorted(self.names.values()):
                self.last = next(m for m, n in self.names.items() if n == self.calls[-1])
            self.calls = None  # decided after one batch: cut from now on, or never

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _run_block(module: nn.Module, stream: _Stream, out: ActivationCache | None,
               acc: StatsAccumulator | None, run: BlockwiseRun,
               stop: _StopAfterLast | None = None) -> None:
    with torch.no_grad():
        for i in range(len(stream.hidden)):
            if acc is not None:
                acc.set_masks(stream.masks[i])
            rest, kwargs = stream.rest[i]
            h = stream.hidden[i]
            try:
                y = module(h, *rest, **kwargs) if stream.positional else module(
                    *rest, hidden_states=h, **kwargs)
            except _BlockDone:
                run.cut_runs += 1
                continue
            if stop is not None:
                stop.batch_done()
            if isinstance(y, tuple):
                y = y[0]
            if out is not None:
                out.append(y)
    run.block_runs += 1


def run_blockwise(vlm: VLM, data, layers: Sequence[PrunableLayer],
                  visit: Callable[[BlockRef, dict[str, LayerStats]], None], *,
                  gram: bool = False, inputs: str = "pruned", max_cache_bytes: int | None = None,
                  cache_dir: str | Path | None = None, device: str | torch.device | None = None,
                  progress: Progress = NULL) -> BlockwiseRun:
    """Visit every block holding ``layers``, in order, with its layers' input statistics.

    ``visit(block, stats)`` gets a :class:`BlockRef` and ``{layer.name: LayerStats}`` (with
    ``gram`` if asked) of the block's layers in ``layers``, over the whole calibration
    ``data``, computed on the block's cached inputs; it may change the block's weights.
    ``inputs``: ``"pruned"`` (the next block sees this block's output after ``visit``) or
    ``"dense"`` (its output before). See the module doc for memory and ``max_cache_bytes``.
    ``device`` (``cuda``, ``cuda:N``; None: where each block is): each block moves there for
    its turn (statistics, ``visit``, the next block's inputs) and back after, and the cached
    hidden states live there; the rest of the model is not moved (the captures run where it
    is). On that device: one block, two copies of the cache, one block's statistics.
    """
    from .data.pairs import as_pair_data

    if inputs not in INPUTS:
        raise ConfigError(f"inputs={inputs!r}; allowed: {', '.join(INPUTS)}")
    if max_cache_bytes is not None and max_cache_bytes < 0:
        raise ConfigError(f"max_cache_bytes={max_cache_bytes}; allowed: None or >= 0")
    reason = check_device(device)
    if reason:
        raise ConfigError(f"device={device!r}: {reason}")
    dev = torch.device(device) if device else None
    data = as_pair_data(data)
    run = BlockwiseRun()
    layers = _visit_loose(vlm, data, layers, visit, gram, run)
    groups = group_blocks(vlm, layers)
    if not groups:
        return run
    own_dir = cache_dir is None
    folder = Path(tempfile.mkdtemp(prefix="vlc-blockwise-")) if own_dir else Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)

    budget = CacheBudget(max_cache_bytes)

    def new_cache(store_on_device: bool = True) -> ActivationCache:
        return ActivationCache(budget, folder, run, dev, store_on_device=store_on_device)

    modalities = {s: sorted({m for b in bl for m in b.modalities}) for s, bl in groups.items()}
    pending = list(groups)
    try:
        with progress.task("blockwise", total=sum(len(b) for b in groups.values())) as task:
            while pending:
                t = time.perf_counter()
                streams, dependent = _capture(vlm, data, pending, modalities, new_cache, run)
                # a stack fed by another through code the capture cannot see (LLaVA: the
                # decoder's image tokens come from the vision tower) waits for it too
                reads = getattr(vlm, "stack_inputs", lambda s: ())
                # a declared reader whose inputs are all done is ready (BLIP VQA: the
                # question encoder after the vision encoder, the decoder after the encoder)
                dependent -= {s for s in pending if reads(s) and not set(reads(s)) & set(pending)}
                dependent |= {s for s in pending if set(reads(s)) & (set(pending) - {s})}
                run.forward_seconds += time.perf_counter() - t
                # A stack that reads another tower waits for the stacks it may read; when
                # every pending stack does, those that read no pending stack go ahead (BLIP-2
                # pruned without its ViT: the Q-Former before the decoder that reads it), and
                # when none is left to wait for, all of them.
                ready = [s for s in pending if s not in dependent] or \
                    [s for s in pending if not set(reads(s)) & (set(pending) - {s})] or \
                    list(pending)
                for s in pending:
                    if s not in ready:
                        for st in streams[s]:
                            st.close()
                for s in ready:
                    _run_stack(vlm, groups[s], streams[s], visit, gram, inputs, new_cache,
                               run, task, dev)
                pending = [s for s in pending if s not in ready]
    finally:
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)
    return run


def _visit_loose(vlm: VLM, data, layers, visit, gram: bool, run: BlockwiseRun) -> list:
    """Visit first the ``layers`` that sit in no encoder stack (a generative model's bridge:
    LLaVA's projector), grouped by parent module, with statistics from one whole-model pass
    on the dense model; return the others. Deviation from a strictly sequential order: the
    bridge is calibrated on the dense vision tower's features (the stacks after it see the
    pruned bridge)."""
    loose = [ly for ly in layers if _stack_or_none(vlm.model, ly) is None]
    if not loose:
        return list(layers)
    from .calibrate import collect_stats

    t = time.perf_counter()
    with _skipped(vlm.model, _offloaded(vlm)):  # a stack on disk reads, never feeds, these
        stats = collect_stats(vlm, data, loose, gram=gram)
    run.forward_seconds += time.perf_counter() - t
    parents: dict[str, list[PrunableLayer]] = {}
    for ly in loose:
        parents.setdefault(ly.name.rsplit(".", 1)[0], []).append(ly)
    for path, lys in parents.items():
        t = time.perf_counter()
        mod = vlm.model.get_submodule(path)
        visit(BlockRef(path, 0, mod, lys, _home(mod)), {ly.name: stats.pop(ly.name) for ly in lys})
        run.visit_seconds += time.perf_counter() - t
        run.order.append(path)
    return [ly for ly in layers if ly not in loose]


def _stack_or_none(model: nn.Module, ly: PrunableLayer) -> str | None:
    try:
        return _stack_of(model, ly)
    except ConfigError:
        return None


def _advance(module: nn.Module, streams: list[_Stream], outs: list, new_cache,
             run: BlockwiseRun) -> None:
    """Each stream's hidden states become ``module``'s outputs: the ones already kept in
    ``outs`` (a dense run), else from running it now (on its current weights)."""
    for st, out in zip(streams, outs, strict=True):
        if out is None:
            out = new_cache()
            _run_block(module, st, out, None, run)
        st.hidden.close()
        st.hidden = out


def _block_turn(module: nn.Module, ref: BlockRef | None, more: bool, streams: list[_Stream],
                visit, gram: bool, inputs: str, new_cache, run: BlockwiseRun) -> None:
    """One block's turn: statistics, ``visit``, then its outputs become the streams' hidden
    states (``more``: a later block needs them). A block with nothing to prune only carries
    the data through."""
    t = time.perf_counter()
    if ref is None:
        _advance(module, streams, [None] * len(streams), new_cache, run)
        run.forward_seconds += time.perf_counter() - t
        return
    keep_dense = inputs == "dense" and more
    acc = StatsAccumulator(ref.layers, gram=gram)
    outs = []
    with acc:
        # the output of this run is thrown away unless it feeds the next block
        # (one watcher per stream: BLIP's streams call different layers)
        for st in streams:
            out = new_cache() if keep_dense else None
            stop = None if keep_dense else _StopAfterLast(ref.layers)
            try:
                _run_block(module, st, out, acc, run, stop)
            finally:
                if stop is not None:
                    stop.close()
            outs.append(out)
    stats = acc.result()
    del acc
    run.forward_seconds += time.perf_counter() - t
    t = time.perf_counter()
    visit(ref, stats)
    del stats
    release_freed_memory()
    run.visit_seconds += time.perf_counter() - t
    run.order.append(f"{ref.stack}.{ref.index}")
    if more:
        t = time.perf_counter()
        _advance(module, streams, outs, new_cache, run)
        release_freed_memory()
        run.forward_seconds += time.perf_counter() - t


def _run_stack(vlm, blocks: list[BlockRef], streams: list[_Stream], visit, gram: bool,
               inputs: str, new_cache, run: BlockwiseRun, task,
               device: torch.device | None = None) -> None:
    stack = vlm.model.get_submodule(blocks[0].stack)
    by_index = {b.index: b for b in blocks}
    last = blocks[-1].index
    try:
        for i in range(last + 1):
            with _turn(vlm, blocks[0].stack, i, stack[i]), _OnDevice(stack[i], device):
                _block_turn(stack[i], by_index.get(i), i < last, streams, visit, gram, inputs,
                            new_cache, run)
            if i in by_index:
                task.advance()
    finally:
        for st in streams:
            st.close()
