"""Pruning a model bigger than memory: blocks loaded from the shards for their turn, written
out pruned and freed after it.

:func:`prune_offloaded` prunes a hub-layout folder (sharded safetensors and their
``model.safetensors.index.json``, or one ``model.safetensors``) without ever holding the model:

1. the model is built on the ``meta`` device (accelerate's ``init_empty_weights``: shapes, no
   storage); the weights outside the *offloaded stacks* (embeddings, LM head, norms, the
   projector, the vision tower: every stack another stack reads, see below) are read from the
   shards into memory;
2. the block engine (:func:`vlcompress.blockwise.run_blockwise`) walks the stacks as usual;
   through its store hook (``vlm.block_store``, a :class:`BlockStore`) each block of an
   offloaded stack is read from the shards just before its turn (only its own tensors:
   ``safe_open(...).get_tensor`` per key, the file unmapped again), and after its turn its
   pruned weights are written as one new shard and the block goes back to ``meta``. Whole-
   model passes (the captures, the projector's statistics) run with the offloaded stacks
   replaced by pass-through stand-ins, as the engine's captures already do;
3. the rest of the model, pruned in memory, is written as the last shard, with the index and
   the folder's other files (config, tokenizer, processor, chat template, model card): the
   result reloads with ``from_pretrained`` / ``load_model``.

Which stacks are offloaded: those no other stack reads (``VLM.stack_inputs``). For LLaVA that
is the language model's decoder layers (97% of LLaVA-1.5-7B); the vision tower, read by the
decoder's capture, stays in memory (4%). Memory: the resident weights, one decoder block, the
activation cache (two copies of the calibration sequences' hidden states) and the packed masks
(one bit per weight); measured in ``benchmarks/prune_big.py``.

Methods: ``wanda`` (one-shot: each block's statistics on the dense model's activations, which
are exactly ``wanda``'s masks, ``tests/test_offload.py``), ``wanda-seq`` (each block on the
pruned earlier blocks' outputs) and ``sparsegpt`` (its own block-sequential driver, default
options: the reference's order, each block on the pruned earlier blocks' outputs). The
others need whole-model passes (gradients: snip, ecoflap; every layer's scores at once for
a global or per-modality allocation: magnitude, lamp, multiflow; a search: upop,
efficientvlm; the reconstruction after a scorer, which needs the scorer's masks first) and
are refused in one line.

GPU: each block can run its turn on one ``device`` (read from disk into host memory, moved
there, back, written, freed).

Inference past memory (``prune-export --offload disk`` evaluates the dense and the pruned model
this way): :func:`load_offloaded` loads a folder with a ``device_map`` planned by
:func:`plan_device_map` (accelerate's ``infer_auto_device_map`` on the empty model, whole
blocks never split): the GPUs first where there are several (each up to 90% of its free
memory), then host memory up to :func:`host_budget` (the parts every token needs plus two
decoder blocks), the rest on ``disk``, read from the safetensors shards at each forward by
accelerate's hooks.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError

OFFLOAD_MODES = ("none", "disk")
OFFLOAD_METHODS = ("wanda", "wanda-seq", "sparsegpt")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: files of a hub folder copied next to the pruned weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def free_disk_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


@dataclass
class ShardIndex:
    """The weights of a safetensors folder: ``{checkpoint key: shard file}``."""

    folder: Path
    weight_map: dict[str, str]

    @classmethod
    def open(cls, folder: str | Path) -> ShardIndex:
        folder = Path(folder)
        if (folder / INDEX).is_file():
            wm = json.loads((folder / INDEX).read_text())["weight_map"]
            return cls(folder, dict(wm))
        if (folder / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / SINGLE), "pt") as f:
                return cls(folder, {k: SINGLE for k in f.keys()})
        raise ModelError(f"{folder}: no {INDEX} or {SINGLE}; allowed for --offload disk: a "
                         "folder with safetensors weights")

    @property
    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))

    def read(self, key: str) -> torch.Tensor:
        """One tensor in its own memory. The shard is opened for it and closed (unmapped)
        after: the file's pages read for it leave the resident set with it (a shard kept open
        would count every page touched so far)."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.weight_map[key]), "pt") as fh:
            return fh.get_tensor(key).clone()


def checkpoint_names(model_keys: Sequence[str], ckpt_keys: Sequence[str],
                     prefixes: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """``{model key: checkpoint key}``: the same name, else the first ``(model prefix,
    checkpoint prefix)`` rename that exists (transformers 5 renames LLaVA's modules; its
    checkpoints keep the old names). A model key with no weight is a ModelError."""
    have = set(ckpt_keys)
    out, missing = {}, []
    for k in model_keys:
        if k in have:
            out[k] = k
            continue
        for mp, cp in prefixes:
            if k.startswith(mp) and cp + k[len(mp):] in have:
                out[k] = cp + k[len(mp):]
                break
        else:
            missing.append(k)
    if missing:
        raise ModelError(f"the checkpoint has no weight for {len(missing)} parameter(s) of the "
                         f"model (first: {missing[0]}); allowed: a checkpoint of this config")
    return out


def load_into(model: torch.nn.Module, index: ShardIndex, names: dict[str, str],
              keys: Sequence[str]) -> None:
    """Model parameters ``keys`` read from the shards into host memory, one at a time."""
    from accelerate.utils import set_module_tensor_to_device

    for k in keys:
        t = index.read(names[k])
        set_module_tensor_to_device(model, k, "cpu", value=t, dtype=t.dtype)
        del t


class ShardWriter:
    """Writes safetensors shards one at a time into ``folder`` (each at most ``max_bytes``,
    a larger tensor alone: safetensors serialises a shard in memory before writing it) and
    the index at the end."""

    def __init__(self, folder: Path, max_bytes: int = 256 << 20):
        self.folder, self.max_bytes = folder, max_bytes
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.shards = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        chunk: dict[str, torch.Tensor] = {}
        size = 0
        for k, v in tensors.items():
            nb = v.numel() * v.element_size()
            if chunk and size + nb > self.max_bytes:
                self._write(chunk)
                chunk, size = {}, 0
            chunk[k] = v
            size += nb
        self._write(chunk)

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        self.shards += 1
        name = f"model-{self.shards:05d}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()},
                  str(self.folder / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = name
            self.total += v.numel() * v.element_size()

    def finish(self) -> None:
        (self.folder / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(
                self.weight_map.items()))}, indent=2))


@dataclass
class BlockStore:
    """The block engine's hook (``vlm.block_store``): the blocks of ``stacks`` live in the
    shards, are loaded for their turn (:meth:`block`) and written out and freed after."""

    model: torch.nn.Module
    index: ShardIndex
    names: dict[str, str]  # model key -> checkpoint key
    stacks: tuple[str, ...]
    writer: ShardWriter
    written: set[str] = field(default_factory=set)  # "stack.i" already written
    loads: int = 0

    def keys_of(self, stack: str, i: int) -> list[str]:
        prefix = f"{stack}.{i}."
        return [k for k in self.names if k.startswith(prefix)]

    def _load(self, stack: str, i: int) -> None:
        load_into(self.model, self.index, self.names, self.keys_of(stack, i))
        self.loads += 1

    def _release(self, module: torch.nn.Module) -> None:
        from ..blockwise import release_freed_memory

        module.to("meta")
        release_freed_memory()

    @contextmanager
    def block(self, stack: str, i: int, module: torch.nn.Module):
        """``with store.block(stack, i, module):`` the block's weights in memory for the body;
        after it (without an error) they are written as one shard; then back to ``meta``."""
        if stack not in self.stacks:
            yield
            return
        self._load(stack, i)
        try:
            yield
            sd = module.state_dict()
            self.writer.write({self.names[f"{stack}.{i}.{k}"]: v for k, v in sd.items()
                               if f"{stack}.{i}.{k}" in self.names})
            self.written.add(f"{stack}.{i}")
        finally:
            self._release(module)

    def finish(self) -> None:
        """Copy the blocks no turn visited (read, written, freed one at a time), write the
        resident weights as the last shard and the index."""
        for s in self.stacks:
            mods = self.model.get_submodule(s)
            for i in range(len(mods)):
                if f"{s}.{i}" not in self.written:
                    with self.block(s, i, mods[i]):
                        pass
        rest = {self.names[k]: v for k, v in self.model.state_dict().items()
                if k in self.names and not any(k.startswith(s + ".") for s in self.stacks)}
        self.writer.write(rest)
        self.writer.finish()


class MaskCounts(dict):
    """Where a method puts its masks when only their counts are kept: ``{name: (kept,
    total)}`` (one bit per weight is 0.84 GB for a 7B model)."""

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        super().__setitem__(name, (int(mask.sum()), mask.numel()))

    def sparsity(self) -> float:
        total = sum(t for _, t in self.values())
        return 1.0 - sum(k for k, _ in self.values()) / total if total else 0.0


def offloaded_stacks(vlm, stacks: Sequence[str]) -> tuple[str, ...]:
    """The stacks no other stack reads (``vlm.stack_inputs``): their blocks can stay on disk
    while the model's other parts run."""
    reads = getattr(vlm, "stack_inputs", lambda s: ())
    read = {r for s in stacks for r in reads(s)}
    return tuple(s for s in stacks if s not in read)


def check_offload(mode: str, method: str, pattern: str, source: str | Path | None,
                  out: str | Path | None) -> None:
    """The one-line refusals of ``--offload disk``, before any work: the mode, the method,
    the pattern, a folder of safetensors, and the free disk under ``out`` (the pruned shards
    are as large as the checkpoint)."""
    if mode not in OFFLOAD_MODES:
        raise ConfigError(f"--offload {mode!r}; allowed: {', '.join(OFFLOAD_MODES)}")
    if mode == "none":
        return
    if method not in OFFLOAD_METHODS:
        raise ConfigError(f"--offload disk with --method {method}; allowed: "
                          f"{', '.join(OFFLOAD_METHODS)} (block-by-block methods that need no "
                          "whole-model pass)")
    if pattern == "structured":
        raise ConfigError("--offload disk with --pattern structured; allowed: unstructured, N:M")
    if source is None or not Path(source).is_dir():
        raise ConfigError(f"--offload disk needs a model folder (sharded safetensors), got "
                          f"{str(source)!r}")
    need = ShardIndex.open(source).nbytes
    if out is None:
        raise ConfigError("--offload disk needs an output folder for the pruned shards")
    free = free_disk_bytes(out)
    if need > free:
        raise ConfigError(f"--offload disk: the model is {need / 1e9:.2f} GB and {out} has "
                          f"{free / 1e9:.2f} GB free; allowed: an output folder with at least "
                          "the checkpoint's size free")


def load_empty(source: str | Path, name: str = ""):
    """``(vlm, index, names)``: the model of ``source`` built on ``meta``, its adapter, the
    shard index and ``{model key: checkpoint key}``. Nothing is read yet."""
    from ..optional_deps import require_accelerate

    require_accelerate()
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from ..models.registry import family_for

    source = Path(source)
    cfg = AutoConfig.from_pretrained(source)
    fam = family_for(cfg.model_type, getattr(cfg, "architectures", None))
    if hasattr(fam, "check_config"):
        fam.check_config(cfg)
    with init_empty_weights():
        model = fam.hf_class()._from_config(cfg)
    model.eval()
    index = ShardIndex.open(source)
    names = checkpoint_names(list(model.state_dict()), list(index.weight_map),
                             getattr(fam, "checkpoint_prefixes", ()))
    return fam, model, index, names


def prune_offloaded(source: str | Path, out: str | Path, calibration, *, method: str = "wanda",
                    pattern: str = "2:4", sparsity: float | None = None,
                    parts: Sequence[str] | None = None, name: str = "",
                    keep_masks: bool = True, device: str | None = None) -> dict:
    """Prune the model in folder ``source`` block by block with its big stacks on disk and
    write the pruned checkpoint to ``out`` (see the module doc). Returns ``masks``
    (``PackedMasks``; None with ``keep_masks=False``: only each layer's kept and total
    counts are held, the masks are in the written weights' zeros), ``achieved`` sparsity,
    ``seconds`` and the engine's run details. ``device`` (``cuda``, ``cuda:N``): each block,
    once read into host memory, runs its turn there (the engine's ``device``), with the
    activation cache; the resident parts stay in host memory."""
    from ..blockwise import check_device
    from ..config import Pattern
    from ..sparsity import check_nm, select_layers, sparsity_of
    from .wanda_seq import wanda_sequential

    check_offload("disk", method, pattern, source, out)
    reason = check_device(device)
    if reason:
        raise ConfigError(f"device={device!r}: {reason}")
    pat = Pattern.parse(pattern)
    if not pat.is_nm and sparsity is None:
        sparsity = 0.5
    t0 = time.perf_counter()
    fam, model, index, names = load_empty(source, name)
    vlm = fam.from_folder(model, str(source), name or Path(source).name)
    layers = select_layers(vlm, tuple(parts) if parts else None)
    stacks = offloaded_stacks(vlm, _stacks_of(vlm))
    load_into(model, index, names,
              [k for k in names if not any(k.startswith(s + ".") for s in stacks)])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = BlockStore(model, index, names, stacks, ShardWriter(out))
    vlm.block_store = store
    try:
        if pat.is_nm:
            for ly in layers:
                if ly.weight.shape[1] % pat.m:
                    check_nm(ly.weight.shape[1], pat.n, pat.m, ly.name)
        counts = None if keep_masks else MaskCounts()
        nm = dict(n=pat.n, m=pat.m) if pat.is_nm else {}
        if method == "sparsegpt":
            from .sparsegpt import sparsegpt_prune

            solved = sparsegpt_prune(vlm, layers, calibration,
                                     sparsity=None if pat.is_nm else sparsity, **nm,
                                     masks=counts, device=device)
        else:
            solved = wanda_sequential(vlm, layers, calibration, sparsity=sparsity, **nm,
                                      inputs="dense" if method == "wanda" else "pruned",
                                      masks=counts, device=device)
        store.finish()
    finally:
        vlm.block_store = None
    for f in Path(source).iterdir():
        if f.is_file() and f.name != INDEX and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
    achieved = counts.sparsity() if counts is not None else sparsity_of(solved.masks, layers)
    kept: dict[str, list[int]] = {}  # per part: [kept, total]
    for ly in layers:
        k, t = counts[ly.name] if counts is not None else \
            (int(solved.masks[ly.name].sum()), ly.weight.numel())
        acc = kept.setdefault(ly.modality, [0, 0])
        acc[0], acc[1] = acc[0] + k, acc[1] + t
    return {"masks": solved.masks if keep_masks else None, "achieved": achieved,
            "per_modality": {m: 1.0 - k / t for m, (k, t) in kept.items() if t},
            "seconds": time.perf_counter() - t0, "details": solved.details,
            "offloaded_stacks": list(stacks), "block_loads": store.loads,
            "shards_written": store.writer.shards, "bytes_written": store.writer.total}


def checkpoint_counts(folder: str | Path) -> tuple[int, int]:
    """``(parameters, nonzero)`` of a safetensors folder, one tensor in memory at a time
    (a tied weight stored once is counted once)."""
    index = ShardIndex.open(folder)
    total = nonzero = 0
    for key in index.weight_map:
        t = index.read(key)
        total += t.numel()
        nonzero += int(torch.count_nonzero(t))
        del t
    return total, nonzero


def host_budget(model: torch.nn.Module, stacks: Sequence[str], blocks: int = 2) -> int:
    """Host-memory bytes for offloaded inference: every parameter outside ``stacks`` (the
    vision tower, projector, embeddings, LM head, norms) plus ``blocks`` of the largest block
    of ``stacks``."""
    def nbytes(mod):
        return sum(p.numel() * p.element_size() for p in mod.parameters())

    inside = [m for s in stacks for m in model.get_submodule(s)]
    largest = max((nbytes(m) for m in inside), default=0)
    return nbytes(model) - sum(nbytes(m) for m in inside) + blocks * largest


def gpu_memory(fraction: float = 0.9) -> dict:
    """``{gpu index: bytes}``: ``fraction`` of each visible GPU's free memory (empty without
    CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return {i: int(torch.cuda.mem_get_info(i)[0] * fraction)
            for i in range(torch.cuda.device_count())}


def plan_device_map(model: torch.nn.Module, max_memory: dict) -> dict:
    """``{module name: device}`` for ``model`` (on ``meta``, or loaded) under ``max_memory``
    (``{gpu index: bytes, "cpu": bytes}``): accelerate's ``infer_auto_device_map`` with the
    model's ``_no_split_modules`` kept whole (a decoder layer is never split across devices),
    in module order; what does not fit goes to ``"disk"``."""
    from ..optional_deps import require_accelerate

    require_accelerate()
    import logging

    from accelerate import infer_auto_device_map

    log = logging.getLogger("accelerate.utils.modeling")  # "Device 0 is not available" when
    level = log.level                                     # planning for GPUs not present
    log.setLevel(logging.ERROR)
    try:
        return dict(infer_auto_device_map(
            model, max_memory=dict(max_memory),
            no_split_module_classes=sorted(getattr(model, "_no_split_modules", None) or [])))
    finally:
        log.setLevel(level)


def offload_memory(model: torch.nn.Module, stacks: Sequence[str], device: str | None = None
                   ) -> dict:
    """The ``max_memory`` of offloaded inference: every GPU (unless ``device`` is ``cpu``),
    then :func:`host_budget` of host memory."""
    gpus = {} if device is not None and str(device).startswith("cpu") else gpu_memory()
    return {**gpus, "cpu": host_budget(model, stacks)}


def load_offloaded(source: str | Path, offload_dir: str | Path, name: str = "",
                   device: str | None = None):
    """``(vlm, device_map)``: the model of folder ``source`` loaded for inference with
    :func:`plan_device_map` (GPUs, bounded host memory, then the shards on disk, read by
    accelerate's hooks at each forward; safetensors are read in place, ``offload_dir`` holds
    what accelerate must copy out)."""
    fam, empty, _, _ = load_empty(source, name)
    vlm0 = fam.from_folder(empty, str(source), name or Path(source).name)
    plan = plan_device_map(empty, offload_memory(empty, offloaded_stacks(vlm0, _stacks_of(vlm0)),
                                                 device))
    del vlm0, empty
    model = fam.hf_class().from_pretrained(str(source), device_map=plan, dtype="auto",
                                           offload_folder=str(offload_dir))
    model.eval()
    return fam.from_folder(model, str(source), name or Path(source).name), plan


def _stacks_of(vlm) -> list[str]:
    """The encoder stacks that hold prunable layers (the bridge sits in none)."""
    from ..blockwise import _stack_or_none

    found = (_stack_or_none(vlm.model, ly) for ly in vlm.prunable_layers())
    return list(dict.fromkeys(s for s in found if s is not None))
