"""Module accounting for FLUX.1 LoRA layouts whose factors diffusers transforms on loading.

kohya and XLabs files store fused projections (``img_attn.qkv``, ``linear1``, ``qkv_lora1``)
that diffusers splits row-wise over several modules (q, k, v, the MLP input), and kohya's alpha
is folded into the factors (``down * scale_down``, ``up * scale_up``): the tensors peft holds are
then not the file's tensors, so the value-for-value match of ``load.module_accounting`` cannot
see them. They are matched here by the weight change itself, still from what peft wrapped and
never by names: for a fixed probe ``X`` (seeded normals, 4 columns), a module of the file with
``dW = s * up @ down`` is applied when the wrapped modules' ``s_i * B_i @ A_i @ X`` tile
``dW @ X`` row block by row block, without gaps or overlaps (relative tolerance 1e-4, for the
float32 rounding of the folded alpha). A module none of whose row blocks is held is skipped;
one only partly held is skipped with the rows that are missing.
"""

from __future__ import annotations

import numpy as np

PROBES = 4
RTOL = 1e-4


def wrapped_lora_layers(pipe, adapter: str, components) -> dict[str, tuple]:
    """``{"component.module": (A (r, in), B (out, r), scaling)}`` of the peft LoRA layers for
    ``adapter`` (float64 numpy)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for comp in components:
        model = getattr(pipe, comp, None)
        if not isinstance(model, torch.nn.Module):
            continue
        for name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer) or adapter not in getattr(module, "lora_A", {}):
                continue
            a = module.lora_A[adapter].weight.detach().to("cpu", torch.float64).numpy()
            b = module.lora_B[adapter].weight.detach().to("cpu", torch.float64).numpy()
            out[f"{comp}.{name}"] = (a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), float(module.scaling[adapter]))
    return out


def _probe(in_features: int) -> np.ndarray:
    return np.random.default_rng(in_features).standard_normal((in_features, PROBES))


def match_by_weight_change(pipe, adapter: str, path, rows: list[dict], components, claimed: set[str]) -> dict:
    """``{file module: [wrapped modules, in row order]}`` for the ``rows`` (inspection modules)
    whose weight change the wrapped layers reproduce; ``claimed`` wrapped modules are not reused.
    Rows of a kind other than plain LoRA are left to the caller."""
    from carlos_audit.lora.modules import TensorReader

    layers = {n: v for n, v in wrapped_lora_layers(pipe, adapter, components).items() if n not in claimed}
    responses: dict[int, dict[str, np.ndarray]] = {}
    found: dict[str, list[str]] = {}
    with TensorReader(path) as reader:
        for row in rows:
            if row["kind"] != "lora" or not row["in_features"]:
                continue
            down_key = next((k for k in row["tensors"] if k.endswith(("lora_down.weight", ".down.weight", "lora_A.weight"))), None)
            up_key = next((k for k in row["tensors"] if k.endswith(("lora_up.weight", ".up.weight", "lora_B.weight"))), None)
            if down_key is None or up_key is None:
                continue
            down = reader.get(down_key).reshape(row["rank"], -1)
            up = reader.get(up_key).reshape(row["out_features"], -1)
            fin = down.shape[1]
            x = _probe(fin)
            want = row["scale"] * (up @ (down @ x))
            if fin not in responses:
                responses[fin] = {n: s * (b @ (a @ x)) for n, (a, b, s) in layers.items() if a.shape[1] == fin}
            tiles = _tile(want, {n: q for n, q in responses[fin].items() if n not in claimed})
            if tiles:
                found[row["name"]] = tiles
                claimed.update(tiles)
    return found


def _tile(want: np.ndarray, candidates: dict[str, np.ndarray]) -> list[str] | None:
    """Names of candidate responses that tile ``want``'s rows exactly from the top, or None."""
    tol = RTOL * (float(np.abs(want).max()) + 1e-30)
    order = np.argsort(want[:, 0], kind="stable")
    first = want[order, 0]
    at: dict[int, list[str]] = {}
    for name, q in candidates.items():
        if q.shape[0] > want.shape[0]:
            continue
        lo, hi = np.searchsorted(first, q[0, 0] - tol), np.searchsorted(first, q[0, 0] + tol, side="right")
        for o in sorted(int(order[i]) for i in range(lo, hi)):
            if o + q.shape[0] <= want.shape[0] and np.all(np.abs(want[o:o + q.shape[0]] - q) <= tol):
                at.setdefault(o, []).append(name)
    tiles, row = [], 0
    while row < want.shape[0]:
        names = at.get(row)
        if not names:
            return None
        name = sorted(names)[0]
        tiles.append(name)
        row += candidates[name].shape[0]
    return tiles


def flux_skip_reasons(pipe, path, skipped: list[str], rows: dict[str, dict]) -> dict[str, str]:
    """Why each skipped module of a FLUX.1 LoRA was not applied, from diffusers' own conversion
    of the file (``FluxPipeline.lora_state_dict``) and the modules the pipeline has."""
    from safetensors.torch import load_file

    from carlos_audit.lora.flux_keys import targets

    try:
        converted = type(pipe).lora_state_dict(load_file(str(path)))
    except Exception as e:
        why = f"diffusers cannot convert the file: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return {n: why for n in skipped}
    inner = int(pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim)
    converted_modules = {k.rsplit(".", 2)[0] for k in converted if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    converted_modules |= {k.split(".lora_linear_layer.")[0] for k in converted if ".lora_linear_layer." in k}
    out = {}
    for name in skipped:
        names = [t for t, _, _ in targets(name, rows[name].get("out_features"), inner)]
        got = [t for t in names if t in converted_modules]
        if not got:
            out[name] = "dropped by diffusers' conversion (a layout it does not load)"
            continue
        missing = [t for t in got if not _has_module(pipe, t)]
        if missing:
            out[name] = f"converted to {missing[0]}, but the base model has no such module"
        else:
            out[name] = f"converted to {', '.join(got)}, but peft did not apply it there"
    return out


def _has_module(pipe, name: str) -> bool:
    comp, _, rest = name.partition(".")
    model = getattr(pipe, comp, None)
    if model is None:
        return False
    try:
        model.get_submodule(rest)
    except AttributeError:
        return False
    return True
