"""How far the tool's weight changes are from ComfyUI's (the stored fixtures), per fixture file
and multiplier: ``max |R_tool - R_comfy| / max |R_comfy|`` over the probe responses of every
weight either side changes (a weight one side leaves alone counts with a zero response)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from make_fixtures import DATA, MULTIPLIERS, response


def effective_weights(pipe) -> dict:
    """``{"unet.<name>.weight": tensor}`` (and ``.bias``) of the parameters as the loaded model
    uses them: a peft layer's base weight plus its active adapters' change, a patched layer's
    own tensors."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for comp in ("unet", "text_encoder"):
        for name, module in getattr(pipe, comp).named_modules():
            if ".base_layer" in name or ".lora_" in name or name.endswith(".base_layer"):
                continue
            layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            for pname, p in layer.named_parameters(recurse=False):
                out[f"{comp}.{name}.{pname}"] = p.detach().clone().float()
            if isinstance(module, BaseTunerLayer) and not module.disable_adapters:
                for a in module.active_adapters:
                    if a in module.lora_A:
                        out[f"{comp}.{name}.weight"] += module.get_delta_weight(a).float()
    return out


def compare(tool: dict, comfy: dict) -> tuple[float, int, int]:
    """``(relative difference, weights the tool changes, weights ComfyUI changes)``."""
    names = set(tool) | set(comfy)
    scale = max((float(np.abs(v).max()) for v in comfy.values()), default=0.0) or max(
        (float(np.abs(v).max()) for v in tool.values()), default=1.0)
    worst = 0.0
    for n in names:
        a, b = tool.get(n), comfy.get(n)
        if a is None:
            a = np.zeros_like(b)
        if b is None:
            b = np.zeros_like(a)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst / scale, sum(float(np.abs(v).max()) > 0 for v in tool.values()), sum(float(np.abs(v).max()) > 0 for v in comfy.values())


def stored(name: str) -> dict:
    """``{multiplier: {layer weight name: response}}`` of one fixture file."""
    out: dict = {}
    with np.load(DATA / f"{name}.npz") as z:
        for key in z.files:
            m, layer = key.split("|", 1)
            out.setdefault(float(m), {})[layer] = z[key]
    return out


def manifest() -> dict:
    return json.loads((Path(DATA) / "manifest.json").read_text())


def tool_responses(pipe, base: dict) -> dict:
    now = effective_weights(pipe)
    out = {}
    for k, w in now.items():
        d = (w - base[k]).detach()
        if float(d.abs().max()) > 0:
            out[k] = response(d)
    return out
