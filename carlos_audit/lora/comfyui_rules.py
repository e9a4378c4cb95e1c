"""The weight a layer gets when ComfyUI applies a LoRA module (the ``comfyui`` application
convention), where ComfyUI departs from the format's reference implementation
(``families_apply``).

Measured against ComfyUI's own code at the commit below (``tests/comfyui/make_fixtures.py``
runs it from a snapshot; ``tests/test_comfyui_agreement.py`` holds this module to what it
computed, per family, at multipliers 1.0 and 0.5). Written from those measurements and the
behaviour they show; no ComfyUI code is copied (ComfyUI is GPL-3.0).

Where ComfyUI departs (``dW`` the module's weight change at scale 1, ``s`` the multiplier):

==================  ================================================================
family              weight under ComfyUI
==================  ================================================================
DoRA (any family    ``W1 = (W0 + dW) * m / n``, ``n`` the row norm of **W0** when the
with dora_scale)    magnitude is per output row (of ``W0 + dW`` per input column); at
                    ``s != 1`` the finished weight is interpolated:
                    ``W0 + s (W1 - W0)`` (the reference interpolates the rescaling)
diag-OFT            ``W0 + s^2 (R^T W0 - W0)``: ``s`` applied twice; no ``rescale``;
                    the rotation bounded by ``alpha`` (the reference: alpha x out)
BOFT                ``W0 + s (B_s(W0) - W0)``, ``B_s`` the reference's butterfly at s
                    (each stage interpolated, rescale applied): ``s`` twice; bound alpha
LoKr, Tucker core   unchanged: ComfyUI's LoKr computation raises on a module with a
(``lokr_t2``)       Tucker core and logs it, leaving the weight as it was
(IA)^3              unchanged: ComfyUI's loader takes none of the file's keys
==================  ================================================================

Every other family (LoRA/LoCon, LoCon Tucker, LoHa, LoKr, full, GLoRA) ComfyUI applies as the
reference does (relative difference <= 1.2e-6 measured), and ``new_weight`` gives it.
"""

from __future__ import annotations

from carlos_audit.lora.families_apply import base_free_delta, boft_weight, diag_oft_weight, new_weight

#: the ComfyUI commit whose behaviour this convention reproduces (Comfy-Org/ComfyUI)
COMFYUI_COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"

#: families of which ComfyUI leaves the weight unchanged, and why (shown in the report)
UNCHANGED = {
    "ia3": "ComfyUI's loader takes none of an (IA)^3 module's keys",
    "lokr_tucker": "ComfyUI's LoKr computation fails on a module with a Tucker core (lokr_t2) and leaves it unpatched",
}


def unchanged_reason(kind: str, tensors) -> str | None:
    """Why ComfyUI leaves a module of this family unapplied, or None when it applies it."""
    if kind == "ia3":
        return UNCHANGED["ia3"]
    if kind == "lokr" and "lokr_t2" in tensors:
        return UNCHANGED["lokr_tucker"]
    return None


def comfyui_decompose(w0, delta, dora_scale, s: float):
    """DoRA as ComfyUI applies it (see the module doc)."""
    import torch

    eps = torch.finfo(torch.float32).eps
    w1 = w0 + delta
    if dora_scale.shape[0] == w0.shape[0]:
        norm = w0.reshape(w0.shape[0], -1).norm(dim=1).reshape(w0.shape[0], *[1] * (w0.dim() - 1)) + eps
    else:
        norm = w1.transpose(0, 1).reshape(w1.shape[1], -1).norm(dim=1).reshape(1, w1.shape[1], *[1] * (w1.dim() - 2)) + eps
    w1 = w1 * (dora_scale.reshape(norm.shape) / norm)
    return w1 if s == 1 else w0 + s * (w1 - w0)


def comfyui_new_weight(kind: str, t: dict, meta: dict, w0, b0, s: float):
    """``(weight, bias)`` of a layer as ComfyUI gives it (float64, as ``new_weight``)."""
    if unchanged_reason(kind, t):
        return w0, b0
    alpha = meta["constraint"] / w0.shape[0] if meta.get("constraint") else 0.0
    if kind == "diag_oft":
        rotated = diag_oft_weight({"oft_blocks": t["oft_blocks"]}, alpha, w0, 1.0)
        change = s * (rotated - w0)
        if "dora_scale" in t:
            return comfyui_decompose(w0, alpha * change, t["dora_scale"], s), b0
        return w0 + s * change, b0
    if kind == "boft":
        change = boft_weight({k: v for k, v in t.items() if k != "dora_scale"}, alpha, w0, s) - w0
        if "dora_scale" in t:
            return comfyui_decompose(w0, alpha * change, t["dora_scale"], s), b0
        return w0 + s * change, b0
    if "dora_scale" in t:
        delta = base_free_delta(kind, t, meta, w0.shape)
        if delta is not None:
            return comfyui_decompose(w0, delta, t["dora_scale"], s), b0
    return new_weight(kind, t, meta, w0, b0, s)
