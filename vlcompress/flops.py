"""Parameters and FLOPs per tower, read from the model's actual (possibly sliced) shapes.

FLOPs are the matmul FLOPs of one input (one image, one caption of ``text_length`` tokens,
default the model's maximum), 2 per multiply-accumulate: every encoder Linear
(``2 * T * d_in * d_out``), attention scores and weighted sum (``4 * T^2 * heads *
head_dim``), the patch embedding and the final projection. Norms, softmax and activations
are left out (a few percent). They count what a dense runtime executes, so a structurally
pruned model's FLOPs drop while an unstructured or N:M one's do not.

    tower_size(vlm)  # {"vision": {"params": ..., "flops": ..., "tokens": 50, "layers": 12}, ...}
"""

from __future__ import annotations

#: Parameter name prefixes of each tower, by family.
TOWER_PREFIXES = {
    "clip": {"vision": ("vision_model.", "visual_projection."),
             "text": ("text_model.", "text_projection.")},
}


def tower_params(vlm) -> dict[str, int]:
    """``{tower: parameter count}`` (parameters outside every tower, e.g. ``logit_scale``,
    are not counted)."""
    prefixes = TOWER_PREFIXES.get(vlm.family)
    if prefixes is None:
        return {}
    out = dict.fromkeys(prefixes, 0)
    for name, p in vlm.model.named_parameters():
        for tower, pre in prefixes.items():
            if name.startswith(pre):
                out[tower] += p.numel()
                break
    return out


def _tokens(vlm, tower: str, text_length: int | None) -> int:
    cfg = vlm.model.config
    if tower == "vision":
        vc = cfg.vision_config
        return (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1
    return int(text_length or cfg.text_config.max_position_embeddings)


def tower_flops(vlm, text_length: int | None = None) -> dict[str, dict]:
    """``{tower: {"flops", "tokens", "layers"}}`` for one input, from the current shapes."""
    from .models.surgery import find_blocks

    if vlm.family not in TOWER_PREFIXES:
        return {}
    m = vlm.model
    out: dict[str, dict] = {}
    towers = {"vision": "vision_model.encoder.layers", "text": "text_model.encoder.layers"}
    blocks = find_blocks(vlm)
    for tower, stack in towers.items():
        T = _tokens(vlm, tower, text_length)
        flops = 0
        n = 0
        for b in blocks:
            if b.stack != stack:
                continue
            n += 1
            for ly in b.linears.values():
                flops += 2 * T * ly.weight.shape[0] * ly.weight.shape[1]
            flops += 4 * T * T * b.num_heads * b.head_dim
        if tower == "vision":
            vc = m.config.vision_config
            patches = T - 1
            flops += 2 * patches * int(vc.num_channels) * int(vc.patch_size) ** 2 * int(vc.hidden_size)
            flops += 2 * m.visual_projection.weight.numel()
        else:
            flops += 2 * m.text_projection.weight.numel()
        out[tower] = {"flops": int(flops), "tokens": T, "layers": n}
    return out


def tower_size(vlm, text_length: int | None = None) -> dict[str, dict]:
    """``{tower: {"params", "flops", "tokens", "layers"}}``."""
    params = tower_params(vlm)
    fl = tower_flops(vlm, text_length)
    return {t: {"params": params.get(t, 0), **fl.get(t, {})} for t in sorted(set(params) | set(fl))}


def size_section(dense: dict[str, dict], pruned: dict[str, dict]) -> dict[str, dict]:
    """Report rows: ``{tower: {params_dense, params_pruned, flops_dense, flops_pruned, ...}}``."""
    out = {}
    for t in dense:
        d, p = dense[t], pruned.get(t, dense[t])
        out[t] = {"params_dense": d["params"], "params_pruned": p["params"],
                  "flops_dense": d.get("flops", 0), "flops_pruned": p.get("flops", 0),
                  "params_ratio": p["params"] / d["params"] if d["params"] else 1.0,
                  "flops_ratio": p.get("flops", 0) / d["flops"] if d.get("flops") else 1.0,
                  "tokens": d.get("tokens"), "layers_dense": d.get("layers"),
                  "layers_pruned": p.get("layers")}
    return out
