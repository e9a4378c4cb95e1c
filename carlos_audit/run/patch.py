"""Applying a LoRA file by patching the base weights, as ComfyUI and A1111/Forge apply every
LyCORIS family: each layer named in the file gets the weight its family's rule gives
(``lora/families_apply.py``) at the arm's scale; the base arm gets the original tensors back.

* Only the layers in the file are touched; the first time a layer is patched its weight (and
  bias) are kept as they were, and restoring copies them back: the base arm's weights are the
  base model's bit for bit.
* Each weight is computed in float64 from the kept original and the file's factors, then cast
  to the layer's dtype, so switching arms or scales never accumulates round-off.
* Accounting is by construction: a module counts as applied when its layer was found, its
  weight computed and its shape matched; every other module is skipped with its reason.

diffusers' loader (peft) stays the path for plain LoRA / LoCon files (``needs_patch``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

#: families the weight patch applies (plain "lora" files go through diffusers/peft)
PATCH_KINDS = ("lora", "lora_tucker", "dora", "loha", "lokr", "full", "ia3", "glora", "diag_oft", "boft")


def needs_patch(inspection: dict) -> bool:
    """A kohya/LyCORIS-layout file with any module diffusers does not load exactly: every
    family but plain LoRA, and any weight decomposition (``dora_scale``)."""
    if inspection.get("architecture") == "zimage":  # every Z-Image layout is applied natively (lora/zimage_keys.py)
        return True
    if inspection.get("format") in ("diffusers_peft", "diffusers_legacy"):
        return False
    return any((r["kind"] not in ("lora", "incomplete")) or r.get("weight_decompose")
               for r in inspection.get("modules") or [])


@dataclass
class Target:
    module: str  # the file's module name (canonical)
    component: str
    layer_name: str
    layer: object
    kind: str
    tensors: dict  # role -> tensor as stored in the file
    meta: dict


@dataclass
class PipeState:
    originals: dict = field(default_factory=dict)  # id(layer) -> (layer, weight, bias)
    adapters: dict = field(default_factory=dict)  # adapter -> [Target]
    active: tuple | None = None


#: the attribute of a pipeline that holds its patch state (kept on the pipeline object, as
#: diffusers keeps its adapters there: a dropped pipeline drops its state)
STATE_ATTRIBUTE = "carlos_patch_state"


def patch_state(pipe) -> PipeState | None:
    """The weight-patch state ``pipe`` holds, or None when no weight patch was loaded into it."""
    return getattr(pipe, STATE_ATTRIBUTE, None)


def _state(pipe) -> PipeState:
    state = patch_state(pipe)
    if state is None:
        state = PipeState()
        setattr(pipe, STATE_ATTRIBUTE, state)
    return state


def _layer_index(model) -> dict:
    """``{flat name: (dotted name, layer)}`` of the weight layers, also under ``text_model_`` +
    name (kohya names keep the text encoder's ``text_model`` level; transformers 5 dropped it)."""
    import torch

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            name = name.removesuffix(".base_layer")  # a layer peft wrapped for another adapter
            flat = name.replace(".", "_")
            out.setdefault(flat, (name, layer))
            out.setdefault("text_model_" + flat, (name, layer))
    return out


def resolve(pipe, rows: list[dict], source, convention: str = "reference") -> tuple[list[Target], list[dict]]:
    """The pipeline layer of each module row, with its tensors; skipped modules with reasons.
    ``convention``: whose rule gives the weights (``reference`` or ``comfyui``, see
    ``lora/comfyui_rules.py``)."""
    from carlos_audit.lora.families_apply import oft_constraint
    from carlos_audit.lora.keys import parse_key

    import torch

    indexes: dict = {}
    targets, skipped = [], []
    for row in rows:
        component, _, body = row["name"].partition(".")
        model = getattr(pipe, component, None)
        if row["kind"] not in PATCH_KINDS:
            skipped.append({"module": row["name"], "reason": f"{row['kind']} module (tensors {', '.join(row['tensors'])}): "
                            "not a LoRA family carlos-audit applies"})
            continue
        if not isinstance(model, torch.nn.Module):
            skipped.append({"module": row["name"], "reason": f"the base model has no {component}"})
            continue
        hits = layer_hits(indexes.setdefault(component, _layer_index(model)), component, body, row)
        if not hits:
            skipped.append({"module": row["name"], "reason": f"no weight layer of the base model's {component} is named {body}"})
            continue
        roles = {parse_key(k)[2]: k for k in row["tensors"]}
        strange = sorted(k for r, k in roles.items() if r.startswith("other:"))
        if strange:
            skipped.append({"module": row["name"], "reason": f"{row['kind']} module with tensor(s) of no LoRA family: {', '.join(strange)}"})
            continue
        tensors = {r: source.get_tensor(k) for r, k in roles.items()}
        tensors.pop("alpha", None)
        for name, layer, rows in hits:
            meta = {"scale": row.get("scale"), "rows": rows, "constraint": oft_constraint(
                (row.get("family_parameters") or {}).get("constraint"), layer.weight.shape[0]), "convention": convention}
            targets.append(Target(row["name"], component, name, layer, row["kind"], tensors, meta))
    return targets, skipped


def layer_hits(index: dict, component: str, body: str, row: dict) -> list[tuple]:
    """``[(layer name, layer, rows)]`` a module of the file lands on: its own layer (rows None),
    or for a fused projection (Z-Image's ``attention.qkv``) each layer with its row range
    ``(start, end, fused out-features)`` of the weight change (lora/zimage_keys.targets)."""
    from carlos_audit.lora.zimage_keys import targets as fused_targets

    if component == "transformer" and body.endswith(".attention.qkv"):
        parts = fused_targets(f"{component}.{body}", row.get("out_features"))
        found = [index.get(name.split(".", 1)[1].replace(".", "_")) for name, _, _ in parts]
        if any(f is None for f in found):
            return []
        return [(f[0], f[1], (a, b, row["out_features"])) for f, (_, a, b) in zip(found, parts)]
    hit = index.get(body.replace(".", "_"))
    return [] if hit is None else [(hit[0], hit[1], None)]


def patched_weight(target: Target, w0, b0, scale: float):
    """``(weight, bias)`` of the target's layer at ``scale``, cast to the layer's dtype."""
    from carlos_audit.lora.comfyui_rules import comfyui_new_weight
    from carlos_audit.lora.families_apply import base_free_delta, new_weight

    rule = comfyui_new_weight if target.meta.get("convention") == "comfyui" else new_weight
    device = "cpu" if w0.device.type == "mps" else w0.device  # MPS has no float64
    t = {k: v.to(device=device, dtype=_f64()) for k, v in target.tensors.items()}
    rows = target.meta.get("rows")
    if rows is not None:  # a slice of a fused projection: its rows of the fused weight change
        if "dora_scale" in t:
            raise ValueError("weight decomposition (DoRA) of a fused projection cannot be split per slice")
        start, end, fused = rows
        delta = base_free_delta(target.kind, t, target.meta, (fused, *w0.shape[1:]))
        if delta is None:
            raise ValueError(f"no rule for splitting a fused {target.kind} module")
        w = w0.to(device, _f64()) + scale * delta[start:end]
        return w.to(w0.device, w0.dtype), b0
    w, b = rule(target.kind, t, target.meta, w0.to(device, _f64()),
                None if b0 is None else b0.to(device, _f64()), scale)
    return w.to(w0.device, w0.dtype), (None if b is None else b.to(b0.device, b0.dtype))


def _f64():
    import torch

    return torch.float64


def _check(target: Target, w0, b0):
    """Compute the weight once: the module's one-line reason if its family cannot give this
    layer a weight (wrong shape, a factor that does not fit), else (weight, bias)."""
    try:
        w, b = patched_weight(target, w0, b0, 1.0)
    except Exception as e:  # torch shape errors name no module: say which one, in one line
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        return f"{target.kind} factors do not fit the {tuple(w0.shape)} layer {target.layer_name}: {first}"
    if tuple(w.shape) != tuple(w0.shape):
        return f"{target.kind} weight change of shape {tuple(w.shape)} for the {tuple(w0.shape)} layer {target.layer_name}"
    if "diff_b" in target.tensors and b0 is None:
        return f"full module with a bias change for the bias-free layer {target.layer_name}"
    return w, b


def tensor_bytes(t) -> bytes:
    import torch

    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def load_patch(pipe, path: Path, adapter: str, inspection: dict, convention: str = "reference",
               scale: float = 1.0) -> dict:
    """Register ``adapter`` as a weight patch of ``pipe`` from the file; the load record.

    The record is load_lora's (``partial``, ``applied``, ``in_file``, ``wrapped``,
    ``by_component``, ``skipped``, ``unapplied``) plus ``application``: the method
    (``weight_patch``) and, per family, the modules applied, the Frobenius norm of their weight
    change at scale 1 and the sha256 of the patched weights at scale 1 (layers in name order,
    weight then bias bytes). Nothing stays patched: the arms apply the patch (``activate``).
    ``convention``: whose rule (``count_applied``: what ComfyUI leaves unchanged); ``against``:
    how the other convention differs at the case's ``scale`` (``convention_difference``).
    """
    from safetensors import safe_open

    import torch

    state = _state(pipe)
    restore(pipe)
    rows = inspection.get("modules") or []
    with safe_open(str(path), framework="pt") as source:
        targets, skipped = resolve(pipe, rows, source, convention)
    applied, families, seen, checked_weights, counted = [], {}, {}, [], set()
    with torch.no_grad():
        for t in sorted(targets, key=lambda t: (t.component, t.layer_name)):
            if id(t.layer) in seen:
                skipped.append({"module": t.module, "reason": f"{t.component}.{t.layer_name} is also patched by {seen[id(t.layer)]}"})
                continue
            w0, b0 = t.layer.weight, getattr(t.layer, "bias", None)
            checked = _check(t, w0, b0)
            if isinstance(checked, str):
                skipped.append({"module": t.module, "reason": checked})
                continue
            seen[id(t.layer)] = t.module
            checked_weights.append((t, w0, checked))
        failed = {s["module"] for s in skipped}  # a fused module applies whole or not at all
        for t, w0, checked in checked_weights:
            if t.module in failed:
                continue
            count_applied(families.setdefault(t.kind, {"method": "weight_patch", "modules": 0, "delta_norm_sq": 0.0,
                                                       "sha": hashlib.sha256()}), t, w0, checked, t.module not in counted)
            counted.add(t.module)  # a fused module's slices count once
            applied.append(t)
    state.adapters[adapter] = applied
    against = convention_difference(applied, convention, scale)
    by_component: dict = {}
    modules = {t.module: t.component for t in applied}  # a fused module's slices count once
    for component in modules.values():
        by_component[component] = by_component.get(component, 0) + 1
    skipped.sort(key=lambda s: s["module"])
    return {"partial": bool(skipped), "applied": len(modules), "in_file": len(rows), "wrapped": len(applied),
            "by_component": dict(sorted(by_component.items())), "skipped": skipped,
            "unapplied": [s["module"] for s in skipped],
            "application": {"method": "weight_patch", "convention": convention, "scale_of_hashes": 1.0, "families": {
                k: {"method": v["method"], "modules": v["modules"], "delta_norm": v["delta_norm_sq"] ** 0.5,
                    "patched_weights_sha256": v["sha"].hexdigest(),
                    **{x: v[x] for x in ("unchanged", "unchanged_reason") if x in v}} for k, v in sorted(families.items())},
            "against": against}}


def count_applied(fam: dict, t: Target, w0, checked: tuple, first: bool = True) -> None:
    """Add an applied module to its family's accounting: the count, the weight change's squared
    norm and the patched-weight hash; under the ``comfyui`` convention, a module ComfyUI leaves
    unchanged is counted with its reason. ``first``: the module's first layer (a fused module's
    slices count once)."""
    from carlos_audit.lora.comfyui_rules import unchanged_reason

    w, b = checked
    fam["modules"] += first
    reason = unchanged_reason(t.kind, t.tensors) if t.meta.get("convention") == "comfyui" else None
    if reason and first:
        fam["unchanged"] = fam.get("unchanged", 0) + 1
        fam["unchanged_reason"] = reason
    fam["delta_norm_sq"] += float(((w.to(_f64()) - w0.to(_f64())) ** 2).sum())
    fam["sha"].update(f"{t.component}.{t.layer_name}".encode() + tensor_bytes(w) + (tensor_bytes(b) if b is not None else b""))


def convention_difference(targets: list[Target], convention: str, scale: float) -> dict:
    """How the other convention (``reference`` <-> ``comfyui``) would change the same layers at
    ``scale``: ``{"convention", "scale", "modules_differing", "relative_difference", "modules"}``,
    the relative difference being ||W_other - W_this||_F / ||W_this - W0||_F over all the
    targets' layers (float64; a module differs when its own relative difference exceeds 1e-9),
    ``modules`` the first ten that differ, largest first."""
    import dataclasses

    import torch

    other = "reference" if convention == "comfyui" else "comfyui"
    num = den = 0.0
    per = []
    with torch.no_grad():
        for t in targets:
            w0 = t.layer.weight.to(_f64())
            b0 = getattr(t.layer, "bias", None)
            b0 = None if b0 is None else b0.to(_f64())
            this = patched_weight(t, w0, b0, scale)[0]
            that = patched_weight(dataclasses.replace(t, meta={**t.meta, "convention": other}), w0, b0, scale)[0]
            d, n = float(((that - this) ** 2).sum()), float(((this - w0) ** 2).sum())
            num, den = num + d, den + n
            if d > 1e-18 * n or (d > 0 and n == 0):
                per.append(((d / n) ** 0.5 if n else float("inf"), t.module))
    per.sort(key=lambda x: -x[0])
    return {"convention": other, "scale": float(scale), "modules_differing": len(per),
            "relative_difference": (num / den) ** 0.5 if den else None,
            "modules": [{"module": m, "relative_difference": r} for r, m in per[:10]]}


def patched_layers(pipe, adapter: str) -> list[str]:
    """``component.layer`` names the adapter patches (what the pipeline holds when it is active)."""
    return sorted(f"{t.component}.{t.layer_name}" for t in _state(pipe).adapters.get(adapter, []))


def restore(pipe) -> None:
    """Every patched layer back to its original tensors (bit for bit)."""
    state = patch_state(pipe)
    if state is None or state.active is None:
        return
    import torch

    with torch.no_grad():
        for layer, w, b in state.originals.values():
            layer.weight.data.copy_(w)
            if b is not None:
                layer.bias.data.copy_(b)
    state.active = None


def activate(pipe, adapter: str | None, scale: float = 1.0) -> bool:
    """Base weights everywhere, then ``adapter``'s patch at ``scale`` if it is a weight patch.
    True when ``adapter`` is a weight patch (the caller then leaves peft adapters disabled)."""
    state = patch_state(pipe)
    if state is None:
        return False
    if state.active == (adapter, float(scale)):
        return True
    restore(pipe)
    if adapter not in state.adapters:
        return False
    import torch

    with torch.no_grad():
        for t in state.adapters[adapter]:
            layer = t.layer
            bias = getattr(layer, "bias", None)
            if id(layer) not in state.originals:
                state.originals[id(layer)] = (layer, layer.weight.detach().clone(),
                                              None if bias is None else bias.detach().clone())
            _, w0, b0 = state.originals[id(layer)]
            w, b = patched_weight(t, w0, b0, float(scale))
            layer.weight.data.copy_(w)
            if b is not None:
                layer.bias.data.copy_(b)
    state.active = (adapter, float(scale))
    return True


def unload(pipe) -> None:
    """Restore the base weights and forget every weight-patch adapter of ``pipe``."""
    restore(pipe)
    if patch_state(pipe) is not None:
        delattr(pipe, STATE_ATTRIBUTE)



def application_differences(recorded: dict, now: dict | None) -> str:
    """How the LoRA's application now differs from the recorded one ("" when it does not):
    the method, and per family the module count and the patched-weight hash."""
    if now is None:
        return "the LoRA was not applied"
    if recorded.get("method") != now.get("method"):
        return f"applied by {now.get('method')}, recorded {recorded.get('method')}"
    out = []
    fams, then = now.get("families", {}), recorded.get("families", {})
    for kind in sorted(set(fams) | set(then)):
        a, b = then.get(kind, {}), fams.get(kind, {})
        for key in ("modules", "patched_weights_sha256"):
            if a.get(key) != b.get(key):
                out.append(f"{kind} {key}: recorded {a.get(key)}, now {b.get(key)}")
    return "; ".join(out)
