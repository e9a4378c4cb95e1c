"""The signature of a profile: the fields two CARLoS profiles must share to be comparable, the
named upstream presets, and the compatibility check a corpus and a case go through."""

from __future__ import annotations

import importlib
import json

from carlos_audit.errors import AuditError

#: The fields two profiles must share to be comparable (same order as the manifest's ``signature``).
SIGNATURE_FIELDS = (
    "base_model", "base_model_sha256", "embedder", "embedder_sha256", "feature", "prompts_sha256",
    "seeds", "lora_scale", "trigger_policy", "steps", "guidance_scale", "width", "height",
    "scheduler", "seed_mode",
)


def _carlos_indexing_sha256():
    # filled from protocol.CARLOS_INDEXING_SHA256 when available
    try:
        return getattr(importlib.import_module("carlos_audit.case.protocol"), "CARLOS_INDEXING_SHA256", None)
    except ImportError:
        return None


def preset_signature(preset: str) -> dict:
    """The signature of a named upstream protocol (``carlos-sdxl-vitb32``): what the reference
    code of the official ``carlos`` 0.0.3 wheel does (carlos/index.py, carlos/config.py): SDXL base
    1.0 in fp16, 25 steps, the pipeline's default guidance (5.0), scheduler (Euler) and size
    (1024), LoRA scale 1.0 with ", <trigger>" appended on the LoRA side only, CLIPModel
    get_image_features on CLIPProcessor output, and ``torch.manual_seed(s)`` for each batch of 4
    images of a prompt, s = 42, 46, 50, 54 (images 42..57 here)."""
    if preset != "carlos-sdxl-vitb32":
        raise AuditError(f"unknown corpus preset {preset!r} (known: carlos-sdxl-vitb32)")
    return {
        "base_model": "hf:stabilityai/stable-diffusion-xl-base-1.0",
        "base_model_sha256": None,
        "embedder": "hf-transformers:openai/clip-vit-base-patch32",
        "embedder_sha256": None,
        "feature": "raw_image_features",
        "prompts_sha256": _carlos_indexing_sha256(),
        "seeds": list(range(42, 58)),
        "lora_scale": 1.0,
        "trigger_policy": "lora_only",
        "steps": 25,
        "guidance_scale": 5.0,
        "width": 1024,
        "height": 1024,
        "scheduler": "EulerDiscreteScheduler",
        "seed_mode": seed_mode_signature("carlos-batch", 4),
    }


def seed_mode_signature(seed_mode: str, batch_size: int) -> str:
    """The signature's ``seed_mode``: "per-image", or "carlos-batch/<n>" (one generator per batch
    of n images: the batch size is then part of the noise)."""
    return seed_mode if seed_mode == "per-image" else f"{seed_mode}/{batch_size}"


PRESETS = ("carlos-sdxl-vitb32",)


def empty_signature() -> dict:
    return {k: None for k in SIGNATURE_FIELDS}


# --------------------------------------------------------------------------- signatures


def _norm_value(v):
    if isinstance(v, tuple):
        v = list(v)
    if isinstance(v, list):
        return [_norm_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm_value(x) for k, x in v.items()}
    return v


def _signature_fields(a: dict, b: dict) -> list[str]:
    extra = sorted((set(a) & set(b)) - set(SIGNATURE_FIELDS))
    return list(SIGNATURE_FIELDS) + extra


def check_compatible(corpus_signature: dict | None, case_signature: dict | None) -> list[str]:
    """Names of the signature fields that both sides record and that differ."""
    a, b = corpus_signature or {}, case_signature or {}
    out = []
    for f in _signature_fields(a, b):
        va, vb = a.get(f), b.get(f)
        if va is None or vb is None:
            continue
        if _norm_value(va) != _norm_value(vb):
            out.append(f)
    return out


def unverifiable_fields(corpus_signature: dict | None, case_signature: dict | None) -> list[str]:
    """Names of the signature fields missing (or null) on at least one side."""
    a, b = corpus_signature or {}, case_signature or {}
    return [f for f in _signature_fields(a, b) if a.get(f) is None or b.get(f) is None]


def _short(v, limit: int = 48) -> str:
    s = json.dumps(v, ensure_ascii=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def require_compatible(corpus_signature: dict | None, case_signature: dict | None,
                       allow_incompatible: bool = False) -> dict:
    """Refuse (AuditError) when the signatures differ, unless ``allow_incompatible``.

    Returns ``{"differing": [...], "unverifiable": [...]}`` for the caller to record.
    """
    differing = check_compatible(corpus_signature, case_signature)
    if differing and not allow_incompatible:
        a, b = corpus_signature or {}, case_signature or {}
        detail = ", ".join(f"{f} (corpus {_short(a.get(f))}, case {_short(b.get(f))})" for f in differing)
        raise AuditError(f"the case and the corpus were profiled differently: {detail}; "
                         f"pass --allow-incompatible to compare anyway")
    return {"differing": differing, "unverifiable": unverifiable_fields(corpus_signature, case_signature)}


