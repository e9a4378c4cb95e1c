"""The weight each LoRA family gives a layer, as its reference implementation (the LyCORIS
library's forward pass) computes it, in float64 torch.

``new_weight(kind, tensors, meta, W0, b0, multiplier)`` returns the layer's weight and bias with
the module applied at ``multiplier`` (the case's LoRA scale). Conv weights keep their 4-D shape;
every factor product is formed flat ``(out, in*kh*kw)`` and reshaped to ``W0``'s shape.

The families and their rule at scale ``s`` (``dW`` the module's weight change at scale 1):

=============  =================================================================  ==========
family         weight at scale s                                                  in s
=============  =================================================================  ==========
lora / locon   W0 + s * (alpha/r) * up @ down                                     linear
lora_tucker    W0 + s * (alpha/r) * up x mid x down (Tucker core on the kernel)   linear
loha           W0 + s * (alpha/r) * (w1a @ w1b) * (w2a @ w2b) (Hadamard)          linear
lokr           W0 + s * (alpha/r) * kron(w1, w2) (alpha ignored: both full)       linear
full           W0 + s * diff, b0 + s * diff_b                                     linear
ia3            W0 * (1 + s * w) along the in or out axis (``on_input``)           linear
glora          W0 + s * (alpha/r) * (W0 @ a1 @ a2 + b1 @ b2)                      linear
diag_oft       rescale * (blockwise (s R + (1-s) I)^T W0), R the Cayley rotation  linear*
boft           rescale * (butterfly stages, each s R_i + (1-s) I) applied to W0   no
+ dora_scale   (W0 + dW) * (s (m / ||W0 + dW|| - 1) + 1), norm per row of m's axis  no
=============  =================================================================  ==========

(*) affine with ``rescale``: at s = 0 the weight is ``rescale * W0``. The DoRA rule is the
library's (``functional.general.weight_decompose``): the multiplier interpolates the rescaling,
not the weight change, so at s = 0 the weight is ``W0 + dW``. The base arm never uses s = 0: it
restores the base weights themselves.
"""

from __future__ import annotations

import math

#: kind -> (what users call it, the tensors that make a module of it, how the scale acts)
FAMILIES = {
    "lora": ("LoRA / LoCon", "lora_down, lora_up, alpha", "linear"),
    "lora_tucker": ("LoCon with Tucker (CP) conv decomposition", "lora_down, lora_mid, lora_up, alpha", "linear"),
    "dora": ("DoRA (LoRA with weight decomposition)", "lora_down, lora_up, dora_scale, alpha", "DoRA rule"),
    "loha": ("LoHa (Hadamard product)", "hada_w1_a/b, hada_w2_a/b[, hada_t1/t2], alpha", "linear"),
    "lokr": ("LoKr (Kronecker product)", "lokr_w1[_a/_b], lokr_w2[_a/_b][, lokr_t2], alpha", "linear"),
    "full": ("full (weight differences)", "diff[, diff_b]", "linear"),
    "ia3": ("(IA)^3", "weight, on_input", "linear"),
    "glora": ("GLoRA", "a1, a2, b1, b2, alpha", "linear"),
    "diag_oft": ("diag-OFT (orthogonal fine-tuning)", "oft_blocks (3-D)[, rescale], alpha (constraint)", "linear (affine with rescale)"),
    "boft": ("BOFT (butterfly OFT)", "oft_blocks (4-D)[, rescale], alpha (constraint)", "BOFT rule (each stage interpolated)"),
}


#: families with a rank and an alpha (alpha absent or 0 means alpha = rank)
LOW_RANK = ("lora", "lora_tucker", "dora", "loha", "lokr", "glora")


def family_summary(rows: list[dict]) -> dict:
    """Per family of an ``inspect`` report: its name, module count, ranks and alphas (low-rank
    families only), the weight-change norm where it does not depend on the base weights, the
    norm of its own parameters, and how the scale acts."""
    out: dict = {}
    for r in rows:
        kind = r["kind"]
        name, tensors, rule = FAMILIES.get(kind, (kind, "", ""))
        f = out.setdefault(kind, {"name": name, "tensors": tensors, "scale_rule": rule, "modules": 0,
                                  "weight_decompose": 0, "ranks": set(), "alphas": set(),
                                  "delta_norm_sq": 0.0, "delta_norm_known": True, "parameter_norm_sq": 0.0})
        f["modules"] += 1
        f["weight_decompose"] += bool(r.get("weight_decompose"))
        if kind in LOW_RANK:
            f["ranks"].add(r["rank"])
            f["alphas"].add(r["alpha"])
        if r.get("delta_norm") is None:
            f["delta_norm_known"] = False
        else:
            f["delta_norm_sq"] += r["delta_norm"] ** 2
        f["parameter_norm_sq"] += (r.get("parameter_norm") or 0.0) ** 2
    for f in out.values():
        f["ranks"] = sorted(x for x in f["ranks"] if x is not None)
        f["alphas"] = sorted(x for x in f["alphas"] if x is not None)
        f["delta_norm"] = f.pop("delta_norm_sq") ** 0.5 if f.pop("delta_norm_known") else None
        f["parameter_norm"] = f.pop("parameter_norm_sq") ** 0.5
    return dict(sorted(out.items()))


def _torch():
    import torch

    return torch


def _flat(t):
    return t.reshape(t.shape[0], -1)


def _shaped(x, shape):
    """``x`` reshaped to a layer's weight shape (None: as built)."""
    return x if shape is None else x.reshape(shape)


def loha_delta(t: dict, scale: float, shape) -> "object":
    """scale * (w1a @ w1b) * (w2a @ w2b); with Tucker cores t1/t2 each half is rebuilt by
    ``einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a)`` (w_a then holds (r, out))."""
    torch = _torch()
    if "hada_t1" in t:
        w1 = torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
        w2 = torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        return _shaped(w1 * w2 * scale, shape)
    w1 = _flat(t["hada_w1_a"]) @ _flat(t["hada_w1_b"])
    w2 = _flat(t["hada_w2_a"]) @ _flat(t["hada_w2_b"])
    return _shaped(w1 * w2 * scale, shape)


def lokr_delta(t: dict, scale: float, shape):
    """scale * kron(w1, w2), each half rebuilt from its factors (w2 from a Tucker core when
    ``lokr_t2`` is present); the kron of the flat halves is the flat 4-D kron."""
    torch = _torch()
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = torch.einsum("i j ..., i p, j r -> p r ...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ _flat(t["lokr_w2_b"])
    return _shaped(torch.kron(_flat(w1), _flat(w2)) * scale, shape)


def lora_delta(t: dict, scale: float, shape):
    """scale * up @ down; with ``mid`` the Tucker rebuild ``einsum("m n ..., i m, n j -> i j ...")``."""
    torch = _torch()
    up, down = _flat(t["up"]), _flat(t["down"])
    if "mid" in t:
        return _shaped(torch.einsum("m n ..., i m, n j -> i j ...", t["mid"], up, down) * scale, shape)
    return _shaped(up @ down * scale, shape)


def glora_delta(t: dict, scale: float, w0):
    """scale * (W0 a1 a2 + b1 b2): ``a1`` is (in, r), ``a2`` (r, in), ``b1`` (out, r), ``b2`` (r, in*k)."""
    torch = _torch()
    a1, a2 = _flat(t["a1"]), _flat(t["a2"])
    wb = (_flat(t["b1"]) @ _flat(t["b2"])).reshape(w0.shape)
    if w0.dim() > 2:
        wa = torch.einsum("o i ..., i j -> o j ...", torch.einsum("o i ..., i j -> o j ...", w0, a1), a2)
    else:
        wa = (w0 @ a1) @ a2
    return (wb + wa) * scale


def cayley(blocks, constraint: float):
    """R = (I + Q)(I - Q)^-1 per block, Q = B - B^T scaled down to norm ``constraint`` (> 0)."""
    torch = _torch()
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def diag_oft_weight(t: dict, constraint: float, w0, s: float):
    """rescale * blockwise ``einsum("k n m, k n ... -> k m ...", s R + (1-s) I, W0)``."""
    torch = _torch()
    blocks = t["oft_blocks"]
    num, size, _ = blocks.shape
    eye = torch.eye(size, dtype=blocks.dtype, device=blocks.device)
    m = s * cayley(blocks, constraint) + (1 - s) * eye
    w = torch.einsum("k n m, k n ... -> k m ...", m, w0.reshape(num, size, *w0.shape[1:])).reshape(w0.shape)
    return t["rescale"].reshape(-1, *[1] * (w0.dim() - 1)) * w if "rescale" in t else w


def boft_weight(t: dict, constraint: float, w0, s: float):
    """The butterfly: stage i mixes rows within groups of 2^i * b/2, each stage's rotation
    interpolated to the identity by ``s`` (the library's ``functional.boft``); then rescale."""
    torch = _torch()
    blocks = t["oft_blocks"]
    stages, _, b, _ = blocks.shape
    eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
    r = cayley(blocks, constraint)
    x = w0
    for i in range(stages):
        bi = r[i] if s == 1 else r[i] * s + (1 - s) * eye
        k = 2**i * (b // 2)
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("b i j, b j ... -> b i ...", bi, x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return t["rescale"].reshape(-1, *[1] * (w0.dim() - 1)) * x if "rescale" in t else x


def weight_decompose(w, dora_scale, s: float):
    """DoRA: W * (s (m / ||W|| - 1) + 1), the norm (plus float32 eps, as the library adds) per
    output row when ``dora_scale`` is (out, 1, ...), per input column when it is (1, in, ...)."""
    torch = _torch()
    eps = torch.finfo(torch.float32).eps
    if dora_scale.shape[0] == w.shape[0] and (dora_scale.dim() < 2 or dora_scale.shape[1] == 1):
        norm = _flat(w).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1)) + eps
    else:
        norm = _flat(w.transpose(0, 1)).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2)) + eps
    ratio = dora_scale.reshape(norm.shape) / norm
    if s != 1:
        ratio = s * (ratio - 1) + 1
    return w * ratio


def base_free_delta(kind: str, t: dict, meta: dict, shape):
    """The weight change at scale 1 of a family that does not depend on the base weights (lora,
    lora_tucker, loha, lokr, full), else None."""
    scale = meta["scale"]
    if kind in ("lora", "lora_tucker", "dora"):
        return lora_delta(t, scale, shape)
    if kind == "loha":
        return loha_delta(t, scale, shape)
    if kind == "lokr":
        return lokr_delta(t, scale, shape)
    if kind == "full":
        return _shaped(t["diff"], shape)
    return None


def new_weight(kind: str, t: dict, meta: dict, w0, b0, s: float):
    """``(weight, bias)`` of a layer with base ``w0``/``b0`` (float64) and the module applied at
    scale ``s`` by the family's rule (see the module doc). ``t``: role -> float64 tensor;
    ``meta``: ``scale`` (alpha/rank as the family defines it) and ``constraint`` (OFT)."""
    bias = b0
    if kind == "ia3":
        w = t["weight"].reshape(-1)
        on_input = bool(t["on_input"].reshape(-1)[0]) if "on_input" in t else False
        axis = 1 if on_input else 0
        shape = [1] * w0.dim()
        shape[axis] = w.numel()
        return w0 * (1 + s * w.reshape(shape)), bias
    if kind == "glora":
        return w0 + s * glora_delta(t, meta["scale"], w0), bias
    if kind == "diag_oft":
        return diag_oft_weight(t, meta["constraint"], w0, s), bias
    if kind == "boft":
        return boft_weight(t, meta["constraint"], w0, s), bias
    delta = base_free_delta(kind, t, meta, w0.shape)
    if delta is None:
        raise ValueError(f"no rule for LoRA family {kind!r}")
    if kind == "full" and "diff_b" in t and b0 is not None:
        bias = b0 + s * t["diff_b"].reshape(b0.shape)
    if "dora_scale" in t:
        return weight_decompose(w0 + delta, t["dora_scale"], s), bias
    return w0 + s * delta, bias


def oft_constraint(alpha: float | None, out_features: int) -> float:
    """The library stores the constraint per output channel: the norm bound is alpha * out."""
    return 0.0 if not alpha or math.isnan(alpha) else float(alpha) * out_features
