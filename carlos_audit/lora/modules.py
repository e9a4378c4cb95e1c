"""The modules of a LoRA file: grouping tensors into modules, the file format, rank/alpha geometry,
reading the low-rank factors and the weight change each module makes."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from carlos_audit.errors import AuditError
from carlos_audit.lora.fileformat import read_header
from carlos_audit.lora.keys import COMPONENTS, parse_key

# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _module_kind(roles: set[str], header: dict | None = None, keys: dict | None = None) -> str:
    """lora | lora_tucker | dora | loha | lokr | full | ia3 | glora | diag_oft | boft | incomplete
    (the families of ``families_apply.FAMILIES``); a LoHa/LoKr with ``dora_scale`` keeps its
    family (its weight decomposition is in the module's ``weight_decompose``)."""
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if {"down", "up"} <= roles:
        if "dora_scale" in roles:
            return "dora"
        return "lora_tucker" if "mid" in roles else "lora"
    if "diff" in roles:
        return "full"
    if {"a1", "a2", "b1", "b2"} <= roles:
        return "glora"
    if "oft_blocks" in roles:
        shape = header[keys["oft_blocks"]]["shape"] if header and keys else []
        return "boft" if len(shape) == 4 else "diag_oft"
    if "weight" in roles and roles <= {"weight", "on_input"}:
        return "ia3"
    return "incomplete"


def group_modules(header: dict, source: str = "LoRA file") -> tuple[dict[str, dict], Counter, list[str]]:
    """Group tensor names into modules from the header alone (no tensor bytes read).

    Returns ``(modules, style_counts, unrecognised)`` where ``modules`` maps the canonical
    module name to ``{"keys": {role: tensor name}}``.
    """
    modules: dict[str, dict] = {}
    styles: Counter = Counter()
    unrecognised = []
    for key in header:
        if key == "__metadata__":
            continue
        parsed = parse_key(key)
        if parsed is None:
            unrecognised.append(key)
            continue
        style, module, role = parsed
        if style != "alpha_only":
            styles[style] += 1
        entry = modules.setdefault(module, {"keys": {}})
        if role in entry["keys"]:
            raise AuditError(
                f"{source}: tensors {entry['keys'][role]!r} and {key!r} both give the {role} "
                f"factor of module {module!r}"
            )
        entry["keys"][role] = key
    # An alpha with no factors beside it is not a module.
    for name in [n for n, m in modules.items() if set(m["keys"]) == {"alpha"}]:
        unrecognised.append(modules.pop(name)["keys"]["alpha"])
    return modules, styles, sorted(unrecognised)


def detect_format(header: dict) -> str:
    """Name the LoRA format of a safetensors header.

    * ``lycoris_loha`` / ``lycoris_lokr`` / ``lycoris_locon_mid``: any ``hada_*`` / ``lokr_*`` /
      ``lora_mid`` tensor (checked in that order); then ``lycoris_full`` / ``_ia3`` / ``_glora`` /
      ``_diag_oft`` / ``_boft``: any module of that family; ``lycoris_dora``: kohya-named
      LoRA modules with ``dora_scale``;
    * ``kohya``: ``lora_unet_*`` / ``lora_te[12]_*`` names with ``.lora_down.weight``,
      ``.lora_up.weight``, ``.alpha``;
    * ``diffusers_peft``: ``<module path>.lora_A.weight`` / ``.lora_B.weight``;
    * ``diffusers_legacy``: ``...to_q_lora.down.weight``, ``.lora.down.weight``,
      ``.lora_linear_layer.down.weight``;
    * ``mixed``: recognised keys of more than one of the last three styles;
    * ``unknown``: nothing recognised.
    """
    modules, styles, _ = group_modules(header)
    roles = {role for m in modules.values() for role in m["keys"]}
    if any(r.startswith("hada_") for r in roles):
        return "lycoris_loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lycoris_lokr"
    if "mid" in roles:
        return "lycoris_locon_mid"
    kinds = {_module_kind(set(m["keys"]), header, m["keys"]) for m in modules.values()}
    for kind in ("full", "ia3", "glora", "diag_oft", "boft"):
        if kind in kinds:
            return f"lycoris_{kind}"
    if "dora" in kinds and "kohya" in styles:
        return "lycoris_dora"
    if len(styles) > 1:
        return "mixed"
    if not styles:
        return "unknown"
    return {"kohya": "kohya", "peft": "diffusers_peft", "legacy": "diffusers_legacy",
            "xlabs": "xlabs"}[styles.most_common(1)[0][0]]


def _shape(header: dict, keys: dict, role: str):
    return header[keys[role]]["shape"] if role in keys else None


def _module_geometry(kind: str, header: dict, keys: dict) -> dict:
    """rank, in_features, out_features, kernel_size from header shapes (None where unknown).

    ``in_features`` is the layer's input channel count; for LoHa/LoKr conv layers whose kernel
    cannot be recovered from the shapes it is the flattened ``in * kh * kw``.
    """
    rank = in_f = out_f = kernel = None
    down, up, mid = _shape(header, keys, "down"), _shape(header, keys, "up"), _shape(header, keys, "mid")
    if kind in ("lora", "dora", "lora_tucker") and down and up and len(down) >= 2 and len(up) >= 2:
        rank, in_f, out_f = down[0], down[1], up[0]
        if len(down) == 4:
            kernel = down[2:]
        if mid and len(mid) == 4:
            kernel = mid[2:]
    elif kind == "loha":
        w1a, w1b = _shape(header, keys, "hada_w1_a"), _shape(header, keys, "hada_w1_b")
        if w1b and len(w1b) >= 1:
            rank = w1b[0]
        if "hada_t1" in keys and w1a and w1b and len(w1a) == 2 and len(w1b) == 2:
            out_f, in_f, kernel = w1a[1], w1b[1], _shape(header, keys, "hada_t1")[2:] or None
        elif w1a and w1b and len(w1a) == 2 and len(w1b) == 2:
            out_f, in_f = w1a[0], w1b[1]
    elif kind == "lokr":
        for role in ("lokr_w2_b", "lokr_w1_b"):
            s = _shape(header, keys, role)
            if s:
                rank = s[0]
                break
        w1 = _shape(header, keys, "lokr_w1") or (
            [_shape(header, keys, "lokr_w1_a")[0], _shape(header, keys, "lokr_w1_b")[1]]
            if "lokr_w1_a" in keys and "lokr_w1_b" in keys else None
        )
        w2 = _shape(header, keys, "lokr_w2") or (
            [_shape(header, keys, "lokr_w2_a")[0], _shape(header, keys, "lokr_w2_b")[1]]
            if "lokr_w2_a" in keys and "lokr_w2_b" in keys and "lokr_t2" not in keys else None
        ) or (
            [_shape(header, keys, "lokr_w2_a")[1], _shape(header, keys, "lokr_w2_b")[1], *_shape(header, keys, "lokr_t2")[2:]]
            if {"lokr_w2_a", "lokr_w2_b", "lokr_t2"} <= set(keys) else None
        )
        if w1 and w2 and len(w1) >= 2 and len(w2) >= 2:
            out_f, in_f = w1[0] * w2[0], w1[1] * w2[1]
            if len(w2) == 4:
                kernel = w2[2:]
    elif kind == "glora":
        a2, b1 = _shape(header, keys, "a2"), _shape(header, keys, "b1")
        rank, in_f, out_f = a2[0], a2[1], b1[0]
        b2 = _shape(header, keys, "b2")
        kernel = b2[2:] if len(b2) == 4 and b2[2:] != [1, 1] else None
    elif kind in ("diag_oft", "boft"):
        blocks = _shape(header, keys, "oft_blocks")
        out_f = blocks[-3] * blocks[-1]
    elif kind == "full":
        diff = _shape(header, keys, "diff")
        if diff and len(diff) >= 2:
            out_f, in_f = diff[0], diff[1]
            if len(diff) == 4:
                kernel = diff[2:]
    return {"rank": rank, "in_features": in_f, "out_features": out_f, "kernel_size": kernel}


# --------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------


class TensorReader:
    """Read tensors of a *validated* safetensors file as float64 numpy arrays.

    Uses ``safetensors.safe_open(framework="numpy")``. numpy has no bfloat16, so BF16 tensors are
    decoded here from their bytes (exact: bf16 is the top half of a float32). float8 tensors are
    decoded with torch, imported only then. Use as a context manager.
    """

    def __init__(self, path: str | Path, header: dict | None = None, payload_start: int | None = None):
        self.path = Path(path)
        if header is None or payload_start is None:
            header, payload_start, _ = read_header(self.path)
        self.header = header
        self.payload_start = payload_start
        self._handle = None

    def __enter__(self):
        from safetensors import safe_open

        self._handle = safe_open(str(self.path), framework="numpy")
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        handle, self._handle = self._handle, None
        return handle.__exit__(*exc) if handle is not None else False

    def _raw(self, entry: dict) -> bytes:
        begin, end = entry["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.payload_start + begin)
            return f.read(end - begin)

    def get(self, key: str) -> np.ndarray:
        entry = self.header[key]
        dtype = entry["dtype"]
        if dtype == "BF16":
            bits = np.frombuffer(self._raw(entry), dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).astype(np.float64).reshape(entry["shape"])
        if dtype.startswith("F8_"):
            return self._get_float8(key, dtype)
        if dtype in ("F4", "F6_E2M3", "F6_E3M2", "C64"):
            raise AuditError(f"{self.path}: tensor {key!r} has dtype {dtype}, which carlos-audit cannot read")
        if self._handle is None:
            raise RuntimeError("TensorReader must be used as a context manager")
        return np.asarray(self._handle.get_tensor(key), dtype=np.float64)

    def _get_float8(self, key: str, dtype: str) -> np.ndarray:
        try:
            import torch
            from safetensors import safe_open
        except ImportError:
            raise AuditError(f"{self.path}: tensor {key!r} is {dtype}; reading it needs torch") from None
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key).to(torch.float32).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------
# Alpha and the effective low-rank factors
# --------------------------------------------------------------------------------------------


def _peft_configs(metadata: dict) -> dict[str, dict] | None:
    """Per-component peft configs from diffusers' ``lora_adapter_metadata`` (None if absent).

    diffusers stores ``json.dumps(config)``; pipeline saves prefix each key with the component
    (``"unet.lora_alpha"``). Returns ``{component or "": config}``. Self-reported, but it is what
    diffusers uses to scale the LoRA when loading it.
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    configs: dict[str, dict] = {}
    for key, value in data.items():
        component, dot, field = key.rpartition(".")
        if dot and component in COMPONENTS:
            configs.setdefault(component, {})[field] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs


def _peft_alpha(configs: dict | None, module: str) -> tuple[float | None, bool]:
    r"""``(alpha, use_rslora)`` for a module from peft configs; alpha None if not stated.

    ``alpha_pattern`` keys are matched as peft does: ``re.match(rf"(.*\.)?({pattern})$", name)``
    against the module name inside its component.
    """
    if not configs:
        return None, False
    component, _, body = module.partition(".")
    if component in COMPONENTS and component in configs:
        config, name = configs[component], body
    elif "" in configs:
        config, name = configs[""], body if component in COMPONENTS else module
    else:
        return None, False
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            try:
                if re.match(rf"(.*\.)?({pattern})$", name):
                    alpha = value
                    break
            except re.error:
                continue
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        alpha = None
    return (float(alpha) if alpha is not None else None), bool(config.get("use_rslora", False))


def _scale(alpha: float | None, rank: int | None, use_rslora: bool = False) -> float:
    """The multiplier of ``up @ down``: alpha/rank (alpha/sqrt(rank) for rsLoRA).

    alpha absent or 0 means alpha = rank (kohya and diffusers both do this), i.e. scale 1.
    """
    if not rank or alpha is None or alpha == 0:
        return 1.0
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def _flatten_down(down: np.ndarray) -> np.ndarray:
    """(r, in[, kh, kw]) -> (r, in*kh*kw)."""
    return down.reshape(down.shape[0], -1)


def _flatten_up(up: np.ndarray) -> np.ndarray:
    """(out, r[, 1, 1]) -> (out, r)."""
    return up.reshape(up.shape[0], -1)


#: families whose weight change is a function of the base weights (no base-free dW)
BASE_DEPENDENT = ("dora", "ia3", "glora", "diag_oft", "boft")


def module_delta(reader: TensorReader, module: dict) -> dict:
    """The weight change ``dW`` of one module, in factored form where possible.

    ``module`` is an entry of ``read_modules``. Returns one of
    ``{"up": (out, r), "down": (r, in*kh*kw), "scale": s}`` (dW = s * up @ down, float64),
    ``{"dense": (out, in*kh*kw)}``, or ``{"unsupported": reason}``.
    Conv weights are flattened as ``(out, in, kh, kw) -> (out, in*kh*kw)`` throughout.
    """
    kind, keys, scale = module["kind"], module["keys"], module["scale"]
    if kind == "lora":
        return {"up": _flatten_up(reader.get(keys["up"])), "down": _flatten_down(reader.get(keys["down"])), "scale": scale}
    if kind == "lora_tucker":
        # y = up(mid(down(x))): W[o,i,h,w] = sum_ab up[o,a] mid[a,b,h,w] down[b,i]
        up = _flatten_up(reader.get(keys["up"]))
        down = _flatten_down(reader.get(keys["down"]))
        mid = reader.get(keys["mid"])
        if mid.ndim != 4:
            return {"unsupported": f"lora_mid of shape {list(mid.shape)} is not a conv kernel"}
        effective_down = np.einsum("abhw,bi->aihw", mid, down).reshape(mid.shape[0], -1)
        return {"up": up, "down": effective_down, "scale": scale}
    if module.get("weight_decompose") or kind in BASE_DEPENDENT:
        from carlos_audit.lora.families_apply import FAMILIES

        name = FAMILIES[kind][0] + (" with weight decomposition (DoRA)" if kind != "dora" and module.get("weight_decompose") else "")
        return {"unsupported": f"{name}: the weight change depends on the base weights"}
    if kind in ("loha", "lokr", "full"):
        import torch

        from carlos_audit.lora.families_apply import base_free_delta

        t = {role: torch.from_numpy(reader.get(k)) for role, k in keys.items() if role != "alpha"}
        dense = base_free_delta(kind, t, module, None)
        return {"dense": dense.reshape(dense.shape[0], -1).numpy()}
    return {"unsupported": f"incomplete module (tensors: {', '.join(sorted(keys))})"}


def delta_inner(a: dict, b: dict) -> float:
    """Frobenius inner product ``<dW_a, dW_b>`` of two ``module_delta`` results.

    Low-rank pairs use ``<s1 U1 D1, s2 U2 D2> = s1 s2 sum((U1^T U2) * (D1 D2^T))`` (r1 x r2
    matrices only, dW never formed); a low-rank/dense pair uses ``<s U D, M> = s sum(U * (M D^T))``.
    """
    if "dense" in a and "dense" in b:
        return float(np.sum(a["dense"] * b["dense"]))
    if "dense" in a:
        a, b = b, a
    if "dense" in b:
        return float(a["scale"] * np.sum(a["up"] * (b["dense"] @ a["down"].T)))
    return float(a["scale"] * b["scale"] * np.sum((a["up"].T @ b["up"]) * (a["down"] @ b["down"].T)))


def delta_shape(d: dict) -> tuple[int, int]:
    """(out, in*kh*kw) of a ``module_delta`` result."""
    if "dense" in d:
        return tuple(d["dense"].shape)
    return (d["up"].shape[0], d["down"].shape[1])


def _oft_parameters(header: dict, keys: dict, constraint: float | None) -> dict:
    shape = header[keys["oft_blocks"]]["shape"]
    out = {"blocks": shape[-3], "block_size": shape[-1], "constraint": constraint or 0.0,
           "rescaled": "rescale" in keys}
    if len(shape) == 4:
        out["stages"] = shape[0]
    return out


def read_modules(path: str | Path, header: dict | None = None, payload_start: int | None = None) -> dict[str, dict]:
    """The LoRA modules of a validated safetensors file, from its header (+ alpha tensors).

    Returns ``{canonical name: {"kind", "keys": {role: tensor name}, "rank", "alpha",
    "alpha_source", "scale", "in_features", "out_features", "kernel_size",
    "parameter_count"}}``. ``alpha`` is the kohya ``.alpha`` tensor, else the peft
    ``lora_alpha`` from diffusers' ``lora_adapter_metadata``, else None (meaning alpha = rank).
    Pass ``header`` and ``payload_start`` from ``read_header`` to skip validating again.
    """
    if header is None or payload_start is None:
        header, payload_start, _ = read_header(path)
    groups, _, _ = group_modules(header, str(path))
    configs = _peft_configs(header.get("__metadata__") or {})
    modules = {}
    with TensorReader(path, header, payload_start) as reader:
        for name in sorted(groups):
            keys = groups[name]["keys"]
            kind = _module_kind(set(keys), header, keys)
            geometry = _module_geometry(kind, header, keys)
            alpha, alpha_source, rslora = None, None, False
            if "alpha" in keys:
                alpha_value = reader.get(keys["alpha"])
                if alpha_value.size != 1:
                    raise AuditError(f"{path}: alpha tensor {keys['alpha']!r} is not a scalar")
                alpha, alpha_source = float(alpha_value.reshape(())), "tensor"
            else:
                alpha, rslora = _peft_alpha(configs, name)
                alpha_source = "peft_metadata" if alpha is not None else None
            family_parameters = {}
            if kind in ("diag_oft", "boft"):  # the alpha tensor is the rotation's norm constraint
                family_parameters = _oft_parameters(header, keys, alpha)
                alpha = alpha_source = scale = None
            elif kind in ("ia3", "full"):
                scale = None if kind == "ia3" else 1.0
                if "on_input" in keys:
                    family_parameters["on_input"] = bool(reader.get(keys["on_input"]).reshape(-1)[0])
            elif kind == "lokr" and "lokr_w1" in keys and "lokr_w2" in keys:
                scale = 1.0  # LyCORIS: both Kronecker factors full -> alpha is ignored
            else:
                scale = _scale(alpha, geometry["rank"], rslora)
            parameter_count = sum(
                math.prod(header[k]["shape"]) for role, k in keys.items() if role != "alpha"
            )
            modules[name] = {
                "kind": kind,
                "keys": dict(sorted(keys.items())),
                **geometry,
                "alpha": alpha,
                "alpha_source": alpha_source,
                "scale": scale,
                "parameter_count": parameter_count,
                "weight_decompose": "dora_scale" in keys,
                "family_parameters": family_parameters,
            }
    return modules


