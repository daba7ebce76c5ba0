"""Structured surgery: physically slice encoder layers, and save / reload the result.

After structured pruning each encoder layer keeps its own number of attention heads and its
own MLP width. :func:`slice_block` cuts the ``nn.Linear`` modules of one layer in place (q/k/v
output rows and the out-projection's input columns of the kept heads; fc1 rows and fc2
columns of the kept neurons) and sets the attention module's ``num_heads``; ``head_dim`` and
``embed_dim`` (the residual width, the out-projection's output) are unchanged, which is all
transformers v5's ``CLIPAttention.forward`` needs: it reshapes to ``(..., -1, head_dim)``.
:func:`remove_layers` drops whole layers (depth pruning) and updates the tower config's
``num_hidden_layers``. The model stays the same HF class (``CLIPModel``).

A sliced model cannot be described by ``config.json`` alone, so :func:`write_manifest` saves
``vlcompress_manifest.json`` (per-layer head counts and MLP widths) and a ``README.md`` next to
the weights; :func:`load_sliced` rebuilds the architecture from config + manifest and loads the
weights (``load_model(folder)`` does this automatically).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError

MANIFEST = "vlcompress_manifest.json"
MANIFEST_FORMAT = "vlcompress-structured"
MANIFEST_VERSION = 1
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


@dataclass
class Block:
    """One encoder layer seen as prunable groups: its heads and its MLP neurons.

    ``prefix`` is the layer's dotted path (``vision_model.encoder.layers.3``), ``stack`` the
    path of its ``ModuleList`` and ``index`` its position there. ``linears`` maps a role
    (``attn.q`` ... ``mlp.out``) to its ``PrunableLayer``.
    """

    modality: str
    index: int
    prefix: str
    stack: str
    linears: dict
    root: nn.Module | None = field(default=None, repr=False)

    def lin(self, role: str) -> nn.Linear:
        return self.linears[role].module

    @property
    def attn(self) -> nn.Module:
        name = self.linears["attn.q"].name.rsplit(".", 1)[0]
        return self.root.get_submodule(name)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.attn, "head_dim", 0) or self.lin("attn.q").out_features // self.num_heads)

    @property
    def num_heads(self) -> int:
        return int(self.attn.num_heads)

    @property
    def mlp_width(self) -> int:
        return int(self.lin("mlp.in").out_features)

    def names(self) -> list[str]:
        return [ly.name for ly in self.linears.values()]


def find_blocks(vlm, layers=None) -> list[Block]:
    """Group ``layers`` (default: all prunable layers of ``vlm``) into :class:`Block` s.

    Only complete blocks (all six roles present) are returned, in layer order.
    """
    layers = list(vlm.prunable_layers() if layers is None else layers)
    by_prefix: dict[str, dict] = {}
    meta: dict[str, tuple[str, int]] = {}
    for ly in layers:
        path = ROLE_PATHS.get(ly.role)
        if path is None or not ly.name.endswith("." + path):
            continue
        prefix = ly.name[: -len(path) - 1]
        by_prefix.setdefault(prefix, {})[ly.role] = ly
        meta[prefix] = (ly.modality, ly.block)
    blocks = []
    for prefix, lins in by_prefix.items():
        if len(lins) != len(ROLE_PATHS):
            continue
        stack, idx = prefix.rsplit(".", 1)
        blocks.append(Block(meta[prefix][0], int(idx), prefix, stack, lins, vlm.model))
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


def slice_layer(attn: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear,
                fc1: nn.Linear, fc2: nn.Linear, heads_keep=None, neurons_keep=None) -> None:
    """Slice one encoder layer in place to the kept heads and neurons (sorted index tensors;
    None keeps all)."""
    if heads_keep is not None:
        heads_keep = torch.as_tensor(heads_keep, dtype=torch.long).sort().values
        if heads_keep.numel() < 1:
            raise ValueError("a layer must keep at least one attention head")
        hd = int(attn.head_dim)
        rows = head_rows(heads_keep, hd)
        for lin in (q, k, v):
            _slice_linear(lin, out_idx=rows)
        _slice_linear(o, in_idx=rows)
        attn.num_heads = int(heads_keep.numel())
    if neurons_keep is not None:
        neurons_keep = torch.as_tensor(neurons_keep, dtype=torch.long).sort().values
        _slice_linear(fc1, out_idx=neurons_keep)
        _slice_linear(fc2, in_idx=neurons_keep)


def slice_block(block: Block, heads_keep=None, neurons_keep=None) -> None:
    """:func:`slice_layer` on a :class:`Block`."""
    slice_layer(block.attn, block.lin("attn.q"), block.lin("attn.k"), block.lin("attn.v"),
                block.lin("attn.o"), block.lin("mlp.in"), block.lin("mlp.out"),
                heads_keep, neurons_keep)


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
    """``{stack: {"modality", "layers": [{"num_heads", "head_dim", "intermediate_size"}]}}``."""
    out: dict[str, dict] = {}
    for b in find_blocks(vlm):
        st = out.setdefault(b.stack, {"modality": b.modality, "layers": []})
        st["layers"].append({"num_heads": b.num_heads, "head_dim": b.head_dim,
                             "intermediate_size": b.mlp_width})
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
                b.mlp_width != getattr(cfg, "intermediate_size", b.mlp_width):
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


def manifest_of(vlm) -> dict:
    cls = type(vlm.model).__name__
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "family": vlm.family,
        "hf_class": cls,
        "stacks": structure_of(vlm),
        "how_to_load": (
            "Each encoder layer has its own head count and MLP width, which config.json cannot "
            f"express: {cls}.from_pretrained(folder) fails with size mismatches. Load with "
            "vlcompress.load_model(folder) (model at .model), or build the model from "
            "config.json, slice every layer listed under 'stacks' to its num_heads * head_dim "
            "q/k/v rows and out_proj columns and its intermediate_size fc1 rows and fc2 "
            "columns, set self_attn.num_heads, then load the safetensors weights strictly "
            "(see README.md)."
        ),
    }


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
        heads = ",".join(str(x["num_heads"]) for x in spec["layers"])
        widths = ",".join(str(x["intermediate_size"]) for x in spec["layers"])
        rows.append(f"- `{stack}` ({spec['modality']}): {len(spec['layers'])} layers; heads "
                    f"[{heads}]; MLP widths [{widths}]")
    readme = (
        f"# Structurally pruned {cls} (vlcompress)\n\n"
        "Attention heads and MLP neurons were physically removed: every encoder layer has its "
        "own width, listed in `vlcompress_manifest.json`:\n\n" + "\n".join(rows) + "\n\n"
        "`config.json` cannot express per-layer widths, so "
        f"`{cls}.from_pretrained(folder)` fails with size-mismatch errors. Load it with\n\n"
        "```python\nimport vlcompress\nmodel = vlcompress.load_model(folder).model\n```\n\n"
        "or, with plain transformers:\n\n```python\n" + _HF_SNIPPET.format(cls=cls) + "```\n"
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
    first heads / neurons of each layer (their values are overwritten by the weights)."""
    for stack, spec in manifest["stacks"].items():
        try:
            layers = model.get_submodule(stack)
        except AttributeError:
            raise ModelError(f"manifest names {stack!r}, which the model does not have") from None
        shapes = spec["layers"]
        if len(layers) != len(shapes):
            if len(layers) < len(shapes):
                raise ModelError(f"manifest lists {len(shapes)} layers for {stack}; the config "
                                 f"builds {len(layers)}")
            remove_layers(model, stack, range(len(shapes), len(layers)))
            layers = model.get_submodule(stack)
        for i, shp in enumerate(shapes):
            layer = layers[i]
            attn = layer.get_submodule("self_attn")
            if int(attn.head_dim) != int(shp["head_dim"]):
                raise ModelError(f"{stack}.{i}: head_dim {attn.head_dim} != manifest {shp['head_dim']}")
            mods = {r: layer.get_submodule(p) for r, p in ROLE_PATHS.items()}
            slice_layer(attn, mods["attn.q"], mods["attn.k"], mods["attn.v"], mods["attn.o"],
                        mods["mlp.in"], mods["mlp.out"],
                        heads_keep=torch.arange(int(shp["num_heads"])),
                        neurons_keep=torch.arange(int(shp["intermediate_size"])))
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
        # Non-persistent buffers (position_ids) may be absent from the file: fine.
        missing = [k for k in missing if k not in dict(model.named_buffers())]
        if missing or unexpected:
            raise ModelError(f"weights in {str(folder)!r} do not match the manifest's "
                             f"architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return model
