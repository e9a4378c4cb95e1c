"""``carlos-audit init LORA``: a ready case file for a LoRA.

The file's sha256 is pinned; the preset follows the detected architecture (``sdxl`` ->
``carlos-sdxl``, the CARLoS reference protocol against the public corpus; ``sd15`` -> ``sd15``; ``flux`` ->
``flux-dev``, most Flux LoRAs being trained on FLUX.1-dev; ``zimage`` -> ``zimage-turbo``, or
``zimage-base`` when the file's metadata names Base),
and the tool refuses to guess for anything else. Trigger words found in the file's self-reported
metadata are proposed as a commented list marked SELF-REPORTED (never enabled: an examiner decides);
the examiner and question are placeholders that ``run`` refuses until filled in.

Everything taken from the file (its name, metadata) is written as an escaped TOML string
(``json.dumps`` with ASCII escapes), so hostile metadata cannot add keys or lines.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from carlos_audit.errors import AuditError

#: what `init` writes where the expert must fill in (check.py refuses a case that still holds it)
PLACEHOLDER = "<FILL IN"

#: preset -> (architecture it is for, [section] -> {key: value}) written in this order.
PRESETS = {
    "carlos-sdxl": ("sdxl", {
        "base_model": {"source": "stabilityai/stable-diffusion-xl-base-1.0", "dtype": "float16", "device": "cuda"},
        "embedder": {"model": "hf:openai/clip-vit-base-patch32"},
        "protocol": {"prompts": "builtin:carlos-indexing", "seeds": {"count": 16, "start": 42},
                     "seed_mode": "carlos-batch", "batch_size": 4, "steps": 25, "guidance_scale": 5.0,
                     "width": 1024, "height": 1024, "scheduler": "EulerDiscreteScheduler",
                     "bootstrap_resamples": 1000, "bootstrap_seed": 0},
        "indicators": {"trigger_dependence": False, "prompt_override": True, "effect_labels": True},
        "reference": {"corpus": "${CARLOS_AUDIT_HOME}/corpora/carlos-public", "top_k": 10},
    }),
    "sd15": ("sd15", {
        "base_model": {"source": "stable-diffusion-v1-5/stable-diffusion-v1-5", "dtype": "float16", "device": "cuda"},
        "embedder": {"model": "hf:openai/clip-vit-base-patch32"},
        "protocol": {"prompts": "builtin:standard", "seeds": {"count": 16, "start": 42}, "seed_mode": "carlos-batch",
                     "batch_size": 4, "steps": 25, "guidance_scale": 7.5, "width": 512, "height": 512,
                     "bootstrap_resamples": 1000, "bootstrap_seed": 0},
        "indicators": {"trigger_dependence": True, "prompt_override": True, "effect_labels": True},
    }),
    # FLUX.1-dev with the CARLoS indexing prompts and seed layout; the variant's defaults
    # (models/families.py): guidance embedding 3.5, 28 steps, T5 length 512, 1024 px
    "flux-dev": ("flux", {
        "base_model": {"source": "black-forest-labs/FLUX.1-dev", "family": "flux-dev", "dtype": "bfloat16", "device": "cuda"},
        "embedder": {"model": "hf:openai/clip-vit-base-patch32"},
        "protocol": {"prompts": "builtin:carlos-indexing", "seeds": {"count": 16, "start": 42}, "seed_mode": "carlos-batch",
                     "batch_size": 4, "steps": 28, "guidance_scale": 3.5, "max_sequence_length": 512,
                     "width": 1024, "height": 1024, "scheduler": "FlowMatchEulerDiscreteScheduler",
                     "bootstrap_resamples": 1000, "bootstrap_seed": 0},
        "indicators": {"trigger_dependence": True, "prompt_override": True, "effect_labels": True},
    }),
    # Z-Image with the CARLoS indexing prompts and seed layout; each variant's defaults
    # (models/families.py): Base 50 steps with CFG 4.0; Turbo 9 steps without CFG; Qwen length 512
    "zimage-base": ("zimage", {
        "base_model": {"source": "Tongyi-MAI/Z-Image", "family": "zimage-base", "dtype": "bfloat16", "device": "cuda"},
        "embedder": {"model": "hf:openai/clip-vit-base-patch32"},
        "protocol": {"prompts": "builtin:carlos-indexing", "seeds": {"count": 16, "start": 42}, "seed_mode": "carlos-batch",
                     "batch_size": 4, "steps": 50, "guidance_scale": 4.0, "max_sequence_length": 512,
                     "width": 1024, "height": 1024, "scheduler": "FlowMatchEulerDiscreteScheduler",
                     "bootstrap_resamples": 1000, "bootstrap_seed": 0},
        "indicators": {"trigger_dependence": True, "prompt_override": True, "effect_labels": True},
    }),
    "zimage-turbo": ("zimage", {
        "base_model": {"source": "Tongyi-MAI/Z-Image-Turbo", "family": "zimage-turbo", "dtype": "bfloat16", "device": "cuda"},
        "embedder": {"model": "hf:openai/clip-vit-base-patch32"},
        "protocol": {"prompts": "builtin:carlos-indexing", "seeds": {"count": 16, "start": 42}, "seed_mode": "carlos-batch",
                     "batch_size": 4, "steps": 9, "guidance_scale": 0.0, "max_sequence_length": 512,
                     "width": 1024, "height": 1024, "scheduler": "FlowMatchEulerDiscreteScheduler",
                     "bootstrap_resamples": 1000, "bootstrap_seed": 0},
        "indicators": {"trigger_dependence": True, "prompt_override": True, "effect_labels": True},
    }),
}
#: architecture -> its default preset (the last one listed: Z-Image Turbo, the variant most LoRAs are for)
ARCH_PRESET = {arch: name for name, (arch, _) in PRESETS.items()}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=True)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def case_id_from(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).stem).strip("-._") or "case"
    return stem[:100]


def init_case(lora, *, preset: str | None = None, out=None, force: bool = False) -> dict:
    """Write a case file for ``lora``; returns where, the preset and the proposed trigger words."""
    from carlos_audit.lora.inspection import inspect_lora

    lora = Path(lora).resolve()
    if not lora.is_file():
        raise AuditError(f"LoRA file not found: {lora}")
    info = inspect_lora(lora)
    arch = info["architecture"]
    if preset is None:
        if arch not in ARCH_PRESET:
            raise AuditError(f"{lora.name}: architecture detected as {arch!r}; refusing to guess a preset. "
                             f"Choose one with --preset ({', '.join(PRESETS)}) if you know the base model")
        # a Z-Image LoRA whose metadata names its variant (SELF-REPORTED) gets that variant's preset
        preset = (info["architecture_evidence"] or {}).get("declared_variant") or ARCH_PRESET[arch]
    if preset not in PRESETS:
        raise AuditError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    want = PRESETS[preset][0]
    if arch in ARCH_PRESET and arch != want:
        raise AuditError(f"{lora.name} is a {arch} LoRA; preset {preset} is for {want} (use --preset {ARCH_PRESET[arch]})")
    out = Path(out) if out else Path.cwd() / f"{case_id_from(lora.name)}.toml"
    if out.exists() and not force:
        raise AuditError(f"{out} exists; pass --force to replace it, or choose another --out")
    text = render_case(lora, info, preset, out.parent.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    from carlos_audit.case.casefile import load_case

    load_case(out)  # what we wrote must parse (placeholders aside, which only `run` refuses)
    return {"casefile": str(out), "preset": preset, "architecture": arch, "sha256": info["sha256"],
            "trigger_hints": info["trigger_word_hints"]}


def render_case(lora: Path, info: dict, preset: str, folder: Path) -> str:
    arch, sections = PRESETS[preset]
    try:
        rel = os.path.relpath(lora, folder)
    except ValueError:  # another drive
        rel = str(lora)
    hints = info["trigger_word_hints"]
    lines = [
        f"# Case file written by `carlos-audit init` for {_toml_value(lora.name)} (preset {preset}, architecture {arch}).",
        "# Fill in the examiner and the question (`run` refuses the placeholders), review the trigger words,",
        "# then: carlos-audit check THIS_FILE",
        "",
        "[case]",
        f"id = {_toml_value(case_id_from(lora.name))}",
        f"title = {_toml_value('CARLoS profile of ' + lora.name)}",
        f"examiner = {_toml_value(PLACEHOLDER + ': examiner name and affiliation>')}",
        f"question = {_toml_value(PLACEHOLDER + ': the question this examination answers>')}",
        'exhibit = "Exhibit 1"',
        "",
    ]
    for section in ("base_model", "embedder"):
        lines += [f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in sections[section].items()] + [""]
    lines += ["[lora]", f"path = {_toml_value(rel)}", f"sha256 = {_toml_value(info['sha256'])}", "scale = 1.0"]
    if hints:
        lines.append("# SELF-REPORTED by the file's own metadata (attacker-controllable; not verified):")
        for h in hints:
            count = f", count {h['count']}" if "count" in h else ""
            lines.append(f"#   {_toml_value(h['text'])}   ({h['source']}{count})")
        lines.append(f"# trigger_words = {_toml_value([h['text'] for h in hints[:3]])}   # SELF-REPORTED: enable after review")
    else:
        lines.append("# no trigger words in the file's metadata (SELF-REPORTED source: none)")
    lines += ["trigger_words = []", 'trigger_policy = "lora_only"', ""]
    for section in ("protocol", "indicators", "reference"):
        if section in sections:
            lines += [f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in sections[section].items()] + [""]
    return "\n".join(lines)
