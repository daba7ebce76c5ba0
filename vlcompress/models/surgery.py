"""Structured surgery: physically slice encoder layers, and save / reload the result.

After structured pruning each encoder layer keeps its own number of attention heads and its
own MLP width. A layer is seen through a :class:`Layout`: where its attention module (the
head count), its q/k/v projections (separate, or one fused ``qkv`` Linear whose rows are
``[q; k; v]``), its out-projection and its MLP live. A layer may hold several sliceable
units, each its own :class:`Block`: a BLIP text layer has its self-attention with the MLP,
and a cross-attention (heads only; its key/value read image tokens of the vision width,
which stays). :func:`slice_block` cuts the ``nn.Linear`` modules of one unit in place (q/k/v
output rows and the out-projection's input columns of the kept heads; fc1 rows and fc2
columns of the kept neurons) and updates the attention module's head count (the layout's
``set_heads``); ``head_dim`` and the residual width are unchanged. CLIP / SigLIP layers need
nothing more: transformers v5's ``CLIPAttention.forward`` reshapes to ``(..., -1,
head_dim)``. Families register the layouts of their layers (:func:`register_layout`; BLIP's
in ``blip.py``). :func:`remove_layers` drops whole layers (depth pruning) and updates the
tower config's ``num_hidden_layers``. The model stays the same HF class (``CLIPModel``).

A sliced model cannot be described by ``config.json`` alone, so :func:`write_manifest` saves
``vlcompress_manifest.json`` (per stack its layouts, per layer its head counts and MLP width)
and a ``README.md`` next to the weights; :func:`load_sliced` rebuilds the architecture from
config + manifest and loads the weights (``load_model(folder)`` does this automatically).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError

MANIFEST = "vlcompress_manifest.json"
MANIFEST_FORMAT = "vlcompress-structured"
#: 2: stacks name their ``layouts``; a layer entry holds a sub-unit's shape under its name
#: (``crossattention``). A version-1 manifest (no ``layouts``) is CLIP-style.
MANIFEST_VERSION = 2
#: Attribute set on a model whose layers were sliced (survives deepcopy).
STRUCTURED_FLAG = "_vlcompress_structured"

#: Sub-module paths inside one encoder layer (CLIP / SigLIP naming).
ROLE_PATHS = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.out_proj",
    "mlp.in": "mlp.fc1",
    "mlp.out": "mlp.fc2",
}
QKV_ROLES = ("attn.q", "attn.k", "attn.v")
ATTN_ROLE_ORDER = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o")
#: MLP roles: ``mlp.gate`` (a gated MLP's gate projection, sliced like ``mlp.in``), fc1, fc2
MLP_ROLE_ORDER = ("mlp.gate", "mlp.in", "mlp.out")


@dataclass(frozen=True, eq=False)
class Layout:
    """Where one sliceable unit of an encoder layer lives, paths relative to the layer.

    ``attn``: the module holding the head count; ``paths``: canonical role -> Linear, the
    roles ``attn.q``/``attn.k``/``attn.v`` (or one fused ``attn.qkv``, rows ``[q; k; v]``),
    ``attn.o`` and, when the unit has an MLP, ``mlp.in``/``mlp.out``; ``sub``: "" for the
    layer's main unit, else the name of a second unit of the same layer (its block prefix is
    ``<layer>.<sub>``, its manifest entry ``layer[sub]``); ``heads_attr``/``head_dim_attr``:
    the attention module's attribute names; ``set_heads(attn, n, head_dim)``: what slicing to
    ``n`` heads updates on it (default: ``heads_attr = n``); ``get_heads(attn)``: the head
    count when the module holds none (a LLaMA attention: its q rows / head_dim);
    ``kv_groups(attn)``: the key/value heads of a grouped-query attention (its k/v projections
    are then not among ``paths`` and stay whole; query heads are removed the same number from
    each group, so the kept head count is a multiple of it); default 1 (no constraint). A gated
    MLP names its gate projection ``mlp.gate`` (sliced with ``mlp.in``). ``kv_paths``: role
    (``kv.k``, ``kv.v``) -> the k/v projections of a grouped-query attention, which
    :func:`slice_unit` cuts to the kept key/value heads when whole groups are removed (they are
    not among ``paths``: query-head slicing leaves them whole).
    """

    name: str
    attn: str
    paths: Mapping[str, str]
    sub: str = ""
    heads_attr: str = "num_heads"
    head_dim_attr: str = "head_dim"
    set_heads: Callable | None = None
    get_heads: Callable | None = None
    kv_groups: Callable | None = None
    kv_paths: Mapping[str, str] | None = None

    @property
    def fused(self) -> bool:
        return "attn.qkv" in self.paths

    @property
    def has_mlp(self) -> bool:
        return "mlp.in" in self.paths

    def num_heads(self, attn: nn.Module) -> int:
        if self.get_heads is not None:
            return int(self.get_heads(attn))
        return int(getattr(attn, self.heads_attr))

    def groups(self, attn: nn.Module) -> int:
        """Key/value groups the query heads are split into (1: heads are free)."""
        return int(self.kv_groups(attn)) if self.kv_groups is not None else 1

    def head_dim(self, attn: nn.Module) -> int:
        return int(getattr(attn, self.head_dim_attr))

    def update_heads(self, attn: nn.Module, n: int) -> None:
        if self.set_heads is not None:
            self.set_heads(attn, int(n), self.head_dim(attn))
        else:
            setattr(attn, self.heads_attr, int(n))


_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Make ``layout`` known to :func:`find_blocks` and to manifests (by its name)."""
    _LAYOUTS[layout.name] = layout
    return layout


def get_layout(name: str) -> Layout:
    if name not in _LAYOUTS:
        from .registry import families

        families()  # the family modules register their layouts on import
    if name not in _LAYOUTS:
        raise ModelError(f"manifest names the layer layout {name!r}; known: {', '.join(_LAYOUTS)}")
    return _LAYOUTS[name]


#: CLIP / SigLIP encoder layers (and their vision towers).
CLIP_LAYOUT = register_layout(Layout("clip", "self_attn", ROLE_PATHS))


@dataclass
class Block:
    """One sliceable unit of an encoder layer, seen as prunable groups: its heads and (when
    its layout has one) its MLP neurons.

    ``prefix`` is the unit's dotted path (``vision_model.encoder.layers.3``; a second unit of
    a layer: ``text_encoder.encoder.layer.3.crossattention``), ``stack`` the path of the
    layers' ``ModuleList`` and ``index`` the layer's position there. ``linears`` maps a
    canonical role (``attn.q`` ... ``mlp.out``, or ``attn.qkv``) to its ``PrunableLayer``.
    """

    modality: str
    index: int
    prefix: str
    stack: str
    linears: dict
    root: nn.Module | None = field(default=None, repr=False)
    layout: Layout = field(default=CLIP_LAYOUT, repr=False)

    def lin(self, role: str) -> nn.Linear:
        return self.linears[role].module

    @property
    def layer_prefix(self) -> str:
        return f"{self.stack}.{self.index}"

    @property
    def attn(self) -> nn.Module:
        return self.root.get_submodule(f"{self.layer_prefix}.{self.layout.attn}")

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim(self.attn)

    @property
    def num_heads(self) -> int:
        return self.layout.num_heads(self.attn)

    @property
    def has_mlp(self) -> bool:
        return self.layout.has_mlp

    @property
    def mlp_width(self) -> int:
        """MLP neurons (0 for a unit without an MLP, e.g. a cross-attention)."""
        return int(self.lin("mlp.in").out_features) if self.has_mlp else 0

    @property
    def attn_roles(self) -> tuple[str, ...]:
        return tuple(r for r in ATTN_ROLE_ORDER if r in self.linears)

    @property
    def mlp_roles(self) -> tuple[str, ...]:
        return tuple(r for r in MLP_ROLE_ORDER if r in self.linears) if self.has_mlp else ()

    @property
    def kv_groups(self) -> int:
        return self.layout.groups(self.attn)

    @property
    def kv_linears(self) -> dict[str, nn.Linear]:
        """The k/v projections (role -> Linear) of a grouped-query unit (else empty)."""
        return {r: self.root.get_submodule(f"{self.layer_prefix}.{p}")
                for r, p in (self.layout.kv_paths or {}).items()}

    def names(self) -> list[str]:
        return [ly.name for ly in self.linears.values()]


def find_blocks(vlm, layers=None) -> list[Block]:
    """Group ``layers`` (default: all prunable layers of ``vlm``) into :class:`Block` s, one
    per registered layout a layer matches completely, in layer order (a Linear belongs to a
    layout's unit when its name is ``<stack>.<index>.<path>``)."""
    layers = list(vlm.prunable_layers() if layers is None else layers)
    found: dict[tuple[str, str], dict] = {}
    for ly in layers:
        for lay in _LAYOUTS.values():
            for role, path in lay.paths.items():
                if not ly.name.endswith("." + path):
                    continue
                prefix = ly.name[: -len(path) - 1]
                if "." in prefix and prefix.rsplit(".", 1)[1].isdigit():
                    found.setdefault((prefix, lay.name), {})[role] = ly
    blocks = []
    for (prefix, name), lins in found.items():
        lay = _LAYOUTS[name]
        if set(lins) != set(lay.paths):
            continue
        stack, idx = prefix.rsplit(".", 1)
        full = f"{prefix}.{lay.sub}" if lay.sub else prefix
        blocks.append(Block(lins["attn.o"].modality, int(idx), full, stack, lins, vlm.model, lay))
    return blocks


# --------------------------------------------------------------------------------------------
# slicing
# --------------------------------------------------------------------------------------------
def _slice_linear(lin: nn.Linear, out_idx: torch.Tensor | None = None,
                  in_idx: torch.Tensor | None = None) -> None:
    """Keep rows ``out_idx`` and columns ``in_idx`` of ``lin`` (in place, same module)."""
    with torch.no_grad():
        w = lin.weight
        if out_idx is not None:
            w = w.index_select(0, out_idx.to(w.device))
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.index_select(0, out_idx.to(w.device)).clone(),
                                        requires_grad=lin.bias.requires_grad)
        if in_idx is not None:
            w = w.index_select(1, in_idx.to(w.device))
        lin.weight = nn.Parameter(w.contiguous().clone(), requires_grad=lin.weight.requires_grad)
    lin.out_features, lin.in_features = lin.weight.shape


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the q/k/v projections (columns of the out-projection) of ``heads``."""
    heads = torch.as_tensor(heads, dtype=torch.long).reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def qkv_rows(heads: torch.Tensor, head_dim: int, width: int) -> torch.Tensor:
    """Rows of ``heads`` in a fused ``[q; k; v]`` Linear whose q block has ``width`` rows."""
    rows = head_rows(heads, head_dim)
    return torch.cat([rows + c * int(width) for c in range(3)])


def slice_unit(layout: Layout, attn: nn.Module, lins: Mapping[str, nn.Linear], heads_keep=None,
               neurons_keep=None, kv_keep=None) -> None:
    """Slice one unit (``lins``: canonical role -> Linear) in place to the kept heads and
    neurons (index tensors; None keeps all). ``kv_keep``: the key/value heads a grouped-query
    unit keeps (its ``kv.k`` / ``kv.v`` rows in ``lins``), cut before the query heads so the
    attention's group size is set from the new key/value count."""
    if kv_keep is not None:
        kv_keep = torch.as_tensor(kv_keep, dtype=torch.long).sort().values
        if kv_keep.numel() < 1 or not layout.kv_paths:
            raise ValueError("a grouped-query layer must keep at least one key/value head")
        rows = head_rows(kv_keep, layout.head_dim(attn))
        for role in layout.kv_paths:
            _slice_linear(lins[role], out_idx=rows)
    if heads_keep is not None:
        heads_keep = torch.as_tensor(heads_keep, dtype=torch.long).sort().values
        if heads_keep.numel() < 1:
            raise ValueError("a layer must keep at least one attention head")
        hd = layout.head_dim(attn)
        rows = head_rows(heads_keep, hd)
        if layout.fused:
            qkv = lins["attn.qkv"]
            _slice_linear(qkv, out_idx=qkv_rows(heads_keep, hd, qkv.out_features // 3))
        else:  # a grouped-query layout lists q only: its k/v heads stay
            for role in QKV_ROLES:
                if role in lins:
                    _slice_linear(lins[role], out_idx=rows)
        _slice_linear(lins["attn.o"], in_idx=rows)
        layout.update_heads(attn, int(heads_keep.numel()))
    if neurons_keep is not None:
        if not layout.has_mlp:
            raise ValueError(f"layout {layout.name!r} has no MLP neurons to slice")
        neurons_keep = torch.as_tensor(neurons_keep, dtype=torch.long).sort().values
        _slice_linear(lins["mlp.in"], out_idx=neurons_keep)
        if "mlp.gate" in lins:
            _slice_linear(lins["mlp.gate"], out_idx=neurons_keep)
        _slice_linear(lins["mlp.out"], in_idx=neurons_keep)


def slice_block(block: Block, heads_keep=None, neurons_keep=None, kv_keep=None) -> None:
    """:func:`slice_unit` on a :class:`Block`."""
    slice_unit(block.layout, block.attn,
               {**{r: block.lin(r) for r in block.linears}, **block.kv_linears},
               heads_keep, neurons_keep, kv_keep)


def _stack_config(model: nn.Module, stack: str):
    """The config object whose ``num_hidden_layers`` counts the layers of ``stack``."""
    owner = model.get_submodule(stack.rsplit(".", 1)[0]) if "." in stack else model
    return getattr(owner, "config", None)


def remove_layers(model: nn.Module, stack: str, indices: Sequence[int]) -> list[int]:
    """Drop the layers ``indices`` of the ``ModuleList`` at ``stack``; returns the original
    indices of the layers kept. The stack's config ``num_hidden_layers`` is updated."""
    layers = model.get_submodule(stack)
    drop = set(int(i) for i in indices)
    if any(i < 0 or i >= len(layers) for i in drop):
        raise ValueError(f"layer index out of range for {stack} ({len(layers)} layers)")
    if len(drop) >= len(layers):
        raise ValueError(f"cannot remove every layer of {stack}")
    kept = [i for i in range(len(layers)) if i not in drop]
    new = nn.ModuleList([layers[i] for i in kept])
    parent_name, attr = stack.rsplit(".", 1) if "." in stack else ("", stack)
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    cfg = _stack_config(model, stack)
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        cfg.num_hidden_layers = len(kept)
    setattr(model, STRUCTURED_FLAG, True)
    return kept


# --------------------------------------------------------------------------------------------
# manifest, save and load
# --------------------------------------------------------------------------------------------
def structure_of(vlm) -> dict:
    """``{stack: {"modality", "layouts": [names], "layers": [{"num_heads", "head_dim",
    "intermediate_size", <sub>: {"num_heads", "head_dim"}}]}}``: a layer's main unit's shape
    at the top of its entry, a second unit's (BLIP's ``crossattention``) under its name."""
    out: dict[str, dict] = {}
    entries: dict[str, dict[int, dict]] = {}
    for b in find_blocks(vlm):
        st = out.setdefault(b.stack, {"modality": b.modality, "layouts": [], "layers": []})
        if b.layout.name not in st["layouts"]:
            st["layouts"].append(b.layout.name)
        entry = entries.setdefault(b.stack, {}).setdefault(b.index, {})
        shape = {"num_heads": b.num_heads, "head_dim": b.head_dim}
        if b.has_mlp:
            shape["intermediate_size"] = b.mlp_width
        if b.layout.kv_paths:
            shape["num_key_value_heads"] = b.kv_groups
        if b.layout.sub:
            entry[b.layout.sub] = shape
        else:
            entry.update(shape)
    for stack, st in out.items():
        st["layers"] = [entries[stack][i] for i in sorted(entries[stack])]
        n = len(vlm.model.get_submodule(stack))
        if n != len(st["layers"]):  # layers past the prunable ones (LLaVA's unused vision
            st["num_layers"] = n    # layers after vision_feature_layer) stay as built
    return out


def is_sliced(vlm) -> bool:
    """Whether ``vlm``'s layers differ from what its config alone would build."""
    if getattr(vlm.model, STRUCTURED_FLAG, False):
        return True
    for b in find_blocks(vlm):
        cfg = _stack_config(vlm.model, b.stack)
        if cfg is None:
            continue
        if b.num_heads != getattr(cfg, "num_attention_heads", b.num_heads) or \
                (b.has_mlp and b.mlp_width != getattr(cfg, "intermediate_size", b.mlp_width)) or \
                (b.layout.kv_paths and b.kv_groups != getattr(cfg, "num_key_value_heads",
                                                              b.kv_groups)):
            return True
    return False


_HF_SNIPPET = """\
import json, torch
from safetensors.torch import load_file
from transformers import {cls}, AutoConfig

P = torch.nn.Parameter
folder = "path/to/this/folder"
model = {cls}(AutoConfig.from_pretrained(folder))
manifest = json.load(open(f"{{folder}}/vlcompress_manifest.json"))
for stack, spec in manifest["stacks"].items():
    for i, shape in enumerate(spec["layers"]):
        layer = model.get_submodule(f"{{stack}}.{{i}}")
        attn, mlp = layer.self_attn, layer.mlp
        width = shape["num_heads"] * shape["head_dim"]
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):  # keep the first `width` rows
            lin.weight, lin.bias = P(lin.weight[:width]), P(lin.bias[:width])
        attn.out_proj.weight = P(attn.out_proj.weight[:, :width])
        attn.num_heads = shape["num_heads"]
        f = shape["intermediate_size"]
        mlp.fc1.weight, mlp.fc1.bias = P(mlp.fc1.weight[:f]), P(mlp.fc1.bias[:f])
        mlp.fc2.weight = P(mlp.fc2.weight[:, :f])
state = {{}}
for name in manifest["weights"]:
    state.update(load_file(f"{{folder}}/{{name}}"))
model.load_state_dict(state, strict=True)
"""


_GENERIC_SNIPPET = """\
import json, torch
from safetensors.torch import load_file
from transformers import {cls}, AutoConfig
from vlcompress.models.surgery import apply_manifest

folder = "path/to/this/folder"
model = {cls}(AutoConfig.from_pretrained(folder))
manifest = json.load(open(f"{{folder}}/vlcompress_manifest.json"))
apply_manifest(model, manifest)  # per-layer head counts and MLP widths
state = {{}}
for name in manifest["weights"]:
    state.update(load_file(f"{{folder}}/{{name}}"))
model.load_state_dict(state, strict=True)
"""


def _clip_only(stacks: dict) -> bool:
    return all(spec.get("layouts", ["clip"]) == ["clip"] for spec in stacks.values())


def manifest_of(vlm) -> dict:
    cls = type(vlm.model).__name__
    stacks = structure_of(vlm)
    how = ("slice every layer listed under 'stacks' to its num_heads * head_dim q/k/v rows and "
           "out_proj columns and its intermediate_size fc1 rows and fc2 columns, set "
           "self_attn.num_heads" if _clip_only(stacks) else
           "call vlcompress.models.surgery.apply_manifest(model, manifest) (each stack's "
           "'layouts' say where its heads and neurons live: fused qkv rows, cross-attention)")
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "family": vlm.family,
        "hf_class": cls,
        "stacks": stacks,
        "how_to_load": (
            "Each encoder layer has its own head count and MLP width, which config.json cannot "
            f"express: {cls}.from_pretrained(folder) fails with size mismatches. Load with "
            "vlcompress.load_model(folder) (model at .model), or build the model from "
            f"config.json, {how}, then load the safetensors weights strictly (see README.md)."
        ),
    }


def _widths(layers: list[dict], key: str, sub: str = "") -> str:
    return ",".join(str((x.get(sub) or {}).get(key, "-") if sub else x.get(key, "-"))
                    for x in layers)


def write_manifest(vlm, folder: str | Path) -> Path | None:
    """Write ``vlcompress_manifest.json`` and ``README.md`` into a saved model folder when
    ``vlm`` is sliced; returns the manifest path (None for an unsliced model)."""
    if not is_sliced(vlm):
        return None
    folder = Path(folder)
    man = manifest_of(vlm)
    man["weights"] = sorted(p.name for p in folder.glob("*.safetensors"))
    path = folder / MANIFEST
    path.write_text(json.dumps(man, indent=2) + "\n")
    cls = man["hf_class"]
    rows = []
    for stack, spec in man["stacks"].items():
        lys = spec["layers"]
        row = (f"- `{stack}` ({spec['modality']}): {len(lys)} layers; heads "
               f"[{_widths(lys, 'num_heads')}]; MLP widths [{_widths(lys, 'intermediate_size')}]")
        for name in spec.get("layouts", ()):
            sub = get_layout(name).sub
            if sub:
                row += f"; {sub} heads [{_widths(lys, 'num_heads', sub)}]"
        rows.append(row)
    snippet = _HF_SNIPPET if _clip_only(man["stacks"]) else _GENERIC_SNIPPET
    plain = "plain transformers" if _clip_only(man["stacks"]) else \
        "transformers and vlcompress's `apply_manifest`"
    readme = (
        f"# Structurally pruned {cls} (vlcompress)\n\n"
        "Attention heads and MLP neurons were physically removed: every encoder layer has its "
        "own width, listed in `vlcompress_manifest.json`:\n\n" + "\n".join(rows) + "\n\n"
        "`config.json` cannot express per-layer widths, so "
        f"`{cls}.from_pretrained(folder)` fails with size-mismatch errors. Load it with\n\n"
        "```python\nimport vlcompress\nmodel = vlcompress.load_model(folder).model\n```\n\n"
        f"or, with {plain}:\n\n```python\n" + snippet.format(cls=cls) + "```\n"
    )
    (folder / "README.md").write_text(readme)
    return path


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of a saved folder, or None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        man = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None
    if man.get("format") != MANIFEST_FORMAT or not isinstance(man.get("stacks"), dict):
        raise ModelError(f"{path} is not a vlcompress structured-pruning manifest")
    return man


def apply_manifest(model: nn.Module, manifest: dict) -> None:
    """Give ``model`` (built from the saved config) the manifest's per-layer shapes: keep the
    first heads / neurons of each unit (their values are overwritten by the weights)."""
    for stack, spec in manifest["stacks"].items():
        try:
            layers = model.get_submodule(stack)
        except AttributeError:
            raise ModelError(f"manifest names {stack!r}, which the model does not have") from None
        layouts = [get_layout(n) for n in spec.get("layouts", ["clip"])]
        shapes = spec["layers"]
        n_layers = int(spec.get("num_layers", len(shapes)))
        if len(layers) != n_layers:
            if len(layers) < n_layers:
                raise ModelError(f"manifest lists {n_layers} layers for {stack}; the config "
                                 f"builds {len(layers)}")
            remove_layers(model, stack, range(n_layers, len(layers)))
            layers = model.get_submodule(stack)
        for i, shp in enumerate(shapes):
            layer = layers[i]
            for lay in layouts:
                entry = shp.get(lay.sub) if lay.sub else shp
                if not entry or "num_heads" not in entry:
                    continue  # this unit was not in scope: left as the config builds it
                try:
                    attn = layer.get_submodule(lay.attn)
                    mods = {r: layer.get_submodule(p)
                            for r, p in {**lay.paths, **(lay.kv_paths or {})}.items()}
                except AttributeError:
                    raise ModelError(f"{stack}.{i} does not have the {lay.name!r} layout the "
                                     "manifest names") from None
                if lay.head_dim(attn) != int(entry["head_dim"]):
                    raise ModelError(f"{stack}.{i}: head_dim {lay.head_dim(attn)} != manifest "
                                     f"{entry['head_dim']}")
                width = entry.get("intermediate_size")
                kv = entry.get("num_key_value_heads")
                slice_unit(lay, attn, mods, heads_keep=torch.arange(int(entry["num_heads"])),
                           neurons_keep=torch.arange(int(width))
                           if lay.has_mlp and width is not None else None,
                           kv_keep=torch.arange(int(kv)) if kv is not None and lay.kv_paths
                           else None)
    setattr(model, STRUCTURED_FLAG, True)


def load_sliced(folder: str | Path, model_cls, config, manifest: dict | None = None,
                *, random_init: bool = False) -> nn.Module:
    """Rebuild a sliced model saved with :func:`write_manifest` and load its weights."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if manifest is None:
        raise ModelError(f"{folder} has no {MANIFEST}")
    model = model_cls(config)
    apply_manifest(model, manifest)
    if not random_init:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"model folder {str(folder)!r} has no .safetensors weights")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ModelError(f"weights in {str(folder)!r} do not fit the manifest's "
                             f"architecture: {str(exc).splitlines()[-1].strip()}") from None
        # Non-persistent buffers (position_ids) may be absent from the file, and so may tied
        # weights (a captioning decoder's output layer is its word embedding): fine when
        # another name of the same tensor was loaded.
        names: dict[int, set[str]] = {}
        for n, t in [*model.named_parameters(remove_duplicate=False),
                     *model.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(t), set()).add(n)
        by_name = {n: ns for ns in names.values() for n in ns}
        missing = [k for k in missing if k not in dict(model.named_buffers())
                   and not (by_name.get(k, set()) - {k}) & state.keys()]
        if missing or unexpected:
            raise ModelError(f"weights in {str(folder)!r} do not match the manifest's "
                             f"architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return model
