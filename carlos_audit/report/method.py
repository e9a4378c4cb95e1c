"""The method chapter's context: what the LoRA file says about itself (SELF-REPORTED) and the
arms generated with the profiles that use them."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

from carlos_audit.records import Manifest
from carlos_audit.record_sections import Inspection, Lora
from carlos_audit.report.text import clip

METADATA_MAX_KEYS = 60    # self-reported metadata shown in the body (all of it is in manifest.json)
METADATA_MAX_CHARS = 400


def self_reported(lora: Lora, base_family: str | None = None) -> dict:
    """What the LoRA file says about itself (``lora.inspection``): its metadata, read defensively
    (a dict of the file's own values), and the facts of the inspection; ``base_family``: the
    base model's family variant as run (the signature's ``family``), set against the variant the
    file declares (Z-Image Turbo vs Base)."""
    inspection = lora.inspection
    if inspection is None:
        return {"present": False, "has_metadata": False, "rows": [], "n_keys": 0, "facts": []}
    meta = inspection.metadata
    rows = []
    if isinstance(meta, dict):
        for k in sorted(meta, key=str)[:METADATA_MAX_KEYS]:
            key, _ = clip(k, 120)
            value, cut = clip(meta[k] if isinstance(meta[k], str) else json.dumps(meta[k], ensure_ascii=False), METADATA_MAX_CHARS)
            rows.append({"key": key, "value": value, "truncated": cut})
    facts = [(label, getattr(inspection, key)) for label, key in (
        ("format", "format"), (LAYOUT_LABELS.get(inspection.architecture, "layout"), "layout"),
        ("detected architecture", "architecture"), ("modules", "module_count"),
        ("parameters", "parameter_count"), ("payload sha256 (tensors only)", "payload_sha256"),
        ("AutoV2 short hash", "autov2")) if getattr(inspection, key) is not None]
    facts += base_hash_facts(inspection) + declared_variant_facts(inspection, base_family)
    ranks = inspection.rank_summary.distinct if inspection.rank_summary is not None else None
    if ranks:
        facts.append(("ranks", ", ".join(str(r) for r in ranks)))
    if inspection.trigger_word_hints:
        facts.append(("trigger word hints (SELF-REPORTED)", hints_text(inspection.trigger_word_hints)))
    return {"present": True, "has_metadata": isinstance(meta, dict) and bool(meta), "rows": rows,
            "n_keys": len(meta) if isinstance(meta, dict) else 0, "facts": facts}


def convention_rows(lora: Lora) -> list[tuple[str, str]]:
    """The application convention the LoRA was applied by (``[lora] convention``), what it left
    unchanged, and how the other convention would differ for this file at the case's scale."""
    from carlos_audit.lora.comfyui_rules import COMFYUI_COMMIT

    load = lora.load
    app = (load.application if load is not None else None) or {}
    convention = lora.convention or app.get("convention") or "reference"
    comfy = f"ComfyUI's behaviour (Comfy-Org/ComfyUI at commit {COMFYUI_COMMIT[:8]})"
    used = comfy if convention == "comfyui" else "each format's reference implementation (the LyCORIS library for its families, diffusers/peft for plain LoRA)"
    rows = [("Application convention", f"{convention}: {used}")]
    fams = app.get("families") or {}
    unchanged = {k: f for k, f in fams.items() if f.get("unchanged")}
    if unchanged:
        total = sum(f.get("modules", 0) for f in fams.values())
        n = sum(f["unchanged"] for f in unchanged.values())
        what = "ComfyUI applies nothing of this file" if n == total else f"ComfyUI leaves {n} of {total} applied modules unchanged"
        rows.append(("Left unchanged by the convention", f"{what}: " + "; ".join(
            f"{k}: {f['unchanged']} ({f.get('unchanged_reason', '')})" for k, f in sorted(unchanged.items()))))
    against = app.get("against")
    if against:
        other = comfy if against["convention"] == "comfyui" else "the reference implementation"
        if not against.get("modules_differing"):
            rows.append(("Under the other convention", f"{other} gives the same weights at scale {against['scale']:g}"))
        elif against.get("relative_difference") is None:  # this convention leaves every weight as it was
            rows.append(("Under the other convention", f"{other} changes {against['modules_differing']} modules at scale "
                         f"{against['scale']:g} that the convention above leaves unchanged"))
        else:
            worst = ", ".join(f"{m['module']} ({m['relative_difference']:.3g})" for m in against["modules"][:3])
            rel = against.get("relative_difference")
            rows.append(("Under the other convention", f"{other} gives different weights at scale {against['scale']:g}: "
                         f"{against['modules_differing']} modules differ, relative difference {rel:.3g} over all patched "
                         f"layers (largest: {worst}); this report describes the convention above"))
    elif fams and set(fams) == {"lora"}:
        rows.append(("Under the other convention", "plain LoRA/LoCon modules: both conventions apply them alike "
                     "(measured against ComfyUI's own code, tests/test_comfyui_agreement.py)"))
    return rows


#: the label of a family's key-map layout in the facts
LAYOUT_LABELS = {"flux": "FLUX.1 layout", "zimage": "Z-Image layout"}


def declared_variant_facts(inspection: Inspection, base_family: str | None) -> list[tuple[str, str]]:
    """The base variant the file's metadata declares (lora/zimage_keys.declared_variant), and
    whether the base model as run is that variant or its sibling."""
    evidence = inspection.architecture_evidence
    if not isinstance(evidence, dict) or "declared_variant" not in evidence:
        return []
    declared = evidence["declared_variant"]
    text = f"{declared} (metadata {evidence['declared_by']})"
    if base_family and base_family != declared:
        text += (f"; the base model as run is {base_family}: the LoRA was trained for the sibling variant, which "
                 "loads without error (same modules and shapes) but generates differently")
    elif base_family:
        text += "; the base model as run is that variant"
    return [("declared base variant (SELF-REPORTED)", text)]


def hints_text(hints: list) -> str:
    """The trigger-word hints taken from the file's metadata (untrusted: each read defensively)."""
    shown = []
    for h in hints[:20]:
        if isinstance(h, dict):
            count = f"{h['count']}× in " if h.get("count") is not None else ""
            shown.append(f"“{clip(h.get('text', ''), 120)[0]}” ({count}{h.get('source', '?')})")
        else:
            shown.append(f"“{clip(h, 120)[0]}”")
    return "; ".join(shown)


def base_hash_facts(inspection: Inspection) -> list[tuple[str, str]]:
    """The claimed base-model hash as text (taken from the file's metadata), and the check made during the run."""
    claim = inspection.claimed_base_model_hash
    if not isinstance(claim, dict):
        return []
    text = f"{clip(str(claim.get('value', '')), 120)[0]} ({claim.get('source')}{', legacy A1111 hash' if claim.get('legacy') else ''})"
    words = {"match": "matches", "mismatch": "differs", "not_comparable": "cannot compare", "absent": "no claim",
             "not_checked": "not checked"}
    check = inspection.base_model_hash_check
    detail = inspection.base_model_hash_check_detail
    shown = words.get(check, str(check)) + (f": {detail}" if detail else "")
    return [("claimed base model hash (SELF-REPORTED)", text), ("base model hash check", shown)]



def _profile_purpose(name: str, adapters: dict) -> str:
    if name == "main":
        return "the CARLoS profile (sections 1 and 3)"
    if name.startswith("scale:"):
        return f"dose-response at LoRA scale {name.split(':', 1)[1]}"
    if name == "trigger:with":
        return "trigger dependence: trigger words in the prompt"
    if name == "trigger:without":
        return "trigger dependence: no trigger words in either arm"
    if name.startswith("comparison:"):
        adapter = name.split(":", 1)[1]
        return f"head-to-head with {adapters.get(adapter, adapter)}"
    return ""


def arms_plan(manifest: Manifest) -> dict:
    """Method: the arms generated and the profiles (base arm, LoRA arm) that use them."""
    proto = manifest.protocol
    arms = proto.arms or {}
    profiles = proto.profiles or ({"main": ["base", "lora"]} if {"base", "lora"} <= set(arms) else {})
    aliases = proto.arm_aliases or {}
    lora_name = manifest.lora.file_name or "the examined LoRA"
    adapters = {"target": f"the examined LoRA ({clip(lora_name, 60)[0]})"}
    for c in manifest.comparison_loras:
        if c.adapter:
            path = c.path if "path" in c else ""
            adapters[str(c.adapter)] = f"comparison LoRA {clip(PurePosixPath(str(path)).name or c.adapter, 60)[0]}"
    def order(name: str):
        kind, _, rest = name.partition(":")
        rank = {"main": 0, "scale": 1, "trigger": 2, "comparison": 3}.get(kind, 4)
        try:
            sub = (float(rest), "") if kind == "scale" else (0.0, rest)
        except ValueError:
            sub = (0.0, rest)
        return (rank, sub, name)

    profiles = {k: profiles[k] for k in sorted(profiles, key=order)}
    used: dict[str, list[str]] = {}
    for prof, pair in profiles.items():
        for a in pair:
            used.setdefault(a, []).append(prof)
    first_use = {}
    for prof, pair in profiles.items():
        for a in pair:
            first_use.setdefault(a, len(first_use))
    rows = []
    for name in sorted(arms, key=lambda n: (first_use.get(n, len(first_use)), n)):
        a = arms[name]
        adapter = a.adapter
        rows.append({"name": name, "adapter": "none (base weights)" if adapter is None else adapters.get(adapter, str(adapter)),
                     "scale": a.scale, "triggers": bool(a.with_triggers),
                     "profiles": used.get(name, [])})
    profile_rows = [{"name": p, "base": pair[0], "lora": pair[1], "purpose": _profile_purpose(p, adapters)}
                    for p, pair in profiles.items() if isinstance(pair, (list, tuple)) and len(pair) == 2]
    shared = [{"arm": a, "profiles": ps} for a, ps in used.items() if len(ps) > 1]
    renamed = [{"requested": k, "generated": v} for k, v in aliases.items() if k != v]
    return {"rows": rows, "profiles": profile_rows, "shared": shared, "aliases": renamed}
