"""FLUX.1 LoRAs compared in weight space across layouts: each module of the file seen as the
diffusers modules it lands on (``flux_keys.targets``), its weight change split row-wise
(``dW[rows] = s * up[rows] @ down``), so a kohya file with a fused ``img_attn.qkv`` and a
diffusers file with ``to_q`` / ``to_k`` / ``to_v`` holding the same weights compare as identical.
The transformer's width is read off the file (the in-features of a fused qkv or ``linear1`` is
the inner dim); CLIP-L names are taken without transformers' old ``text_model.`` level.
"""

from __future__ import annotations

from carlos_audit.lora.flux_keys import is_flux, targets
from carlos_audit.lora.modules import module_delta


def _inner_dim(modules: dict) -> int:
    for name, m in modules.items():
        if name.endswith((".img_attn.qkv", ".linear1", ".processor.qkv_lora1", ".processor.qkv_lora")) and m["in_features"]:
            return int(m["in_features"])
    return 3072


def flux_view(modules: dict) -> dict | None:
    """``{diffusers module: (file module, first row, end row)}`` for a Flux LoRA, None otherwise."""
    if not is_flux(modules):
        return None
    inner, view = _inner_dim(modules), {}
    for name, m in modules.items():
        for target, start, end in targets(name, m["out_features"], inner) if m["out_features"] else [(name, 0, None)]:
            view[target.replace("text_encoder.text_model.", "text_encoder.", 1)] = (name, start, end)
    return view


def view_delta(reader, modules: dict, view: dict | None, name: str) -> dict:
    """The weight change of ``name``: the file's module, or (with a Flux view) its rows."""
    if view is None:
        return module_delta(reader, modules[name])
    module, start, end = view[name]
    delta = module_delta(reader, modules[module])
    if end is None or "unsupported" in delta:
        return delta
    if "dense" in delta:
        return {"dense": delta["dense"][start:end]}
    return dict(delta, up=delta["up"][start:end])
