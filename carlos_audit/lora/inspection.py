"""Intake of a LoRA file: architecture, self-reported metadata and claims, and ``inspect_lora``,
the one report of a file that ``inspect`` and ``run`` use (validation and hashes in
``fileformat.py``, key names in ``keys.py``, modules and weights in ``modules.py``)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from carlos_audit.errors import AuditError
from carlos_audit.lora.families_apply import LOW_RANK, family_summary
from carlos_audit.lora.fileformat import LoraFile
from carlos_audit.lora.flux_keys import blocks_touched, is_flux, layout
from carlos_audit.lora import zimage_keys
from carlos_audit.lora.modules import (
    TensorReader,
    delta_inner,
    detect_format,
    group_modules,
    module_delta,
    read_modules,
)

# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------

_ATTN2_KV = re.compile(r"^unet\..*\.attn2\.(to_k|to_v)$")
_TRANSFORMER_INDEX = re.compile(r"^unet\..*\.transformer_blocks\.(\d+)\.")


def detect_architecture(modules: dict[str, dict]) -> tuple[str, dict]:
    """Guess the base-model family a LoRA was trained for: ``flux``, ``zimage``, ``sdxl``, ``sd15`` or ``other``.

    First ``flux`` by ``flux_keys.is_flux``, then ``zimage`` by ``zimage_keys.is_zimage`` (evidence
    then lists the blocks touched, and for Z-Image the width). Then the
    rule, first match wins (canonical diffusers names are used, so kohya SDXL
    ``input_blocks`` names count as the diffusers blocks they map to):

    1. The cross-attention dim, i.e. the in-features of UNet ``attn2.to_k`` / ``attn2.to_v``
       modules: 2048 -> ``sdxl``; 768 -> ``sd15``; any other single value (1024 is SD 2.x; 32 is
       the project's tiny test model) or conflicting values -> ``other``.
    2. No attn2 k/v module: ``text_encoder_2`` modules -> ``sdxl``.
    3. ``unet.down_blocks.0.attentions`` modules (SDXL's first down block has none) -> ``sd15``.
    4. ``transformer_blocks`` index >= 1 (SD 1.x has one transformer per attention, SDXL 2 or
       10) -> ``sdxl``.
    5. Otherwise ``other``.

    Returns ``(architecture, evidence)``; evidence has ``rule`` (which step decided),
    ``cross_attention_dims``, ``has_text_encoder_2``, ``has_down_blocks_0_attentions`` and
    ``max_transformer_block_index``.
    """
    flux_rule = is_flux(modules)
    if flux_rule:
        return "flux", {"rule": flux_rule, **blocks_touched(modules)}
    zimage_rule = zimage_keys.is_zimage(modules)
    if zimage_rule:
        return "zimage", {"rule": zimage_rule, **zimage_keys.blocks_touched(modules)}
    dims = sorted({m["in_features"] for n, m in modules.items() if _ATTN2_KV.match(n) and m["in_features"]})
    has_te2 = any(n.startswith("text_encoder_2.") for n in modules)
    has_db0_attn = any(n.startswith("unet.down_blocks.0.attentions.") for n in modules)
    indices = [int(m[1]) for n in modules if (m := _TRANSFORMER_INDEX.match(n))]
    evidence = {
        "cross_attention_dims": dims,
        "has_text_encoder_2": has_te2,
        "has_down_blocks_0_attentions": has_db0_attn,
        "max_transformer_block_index": max(indices) if indices else None,
    }
    if dims:
        if dims == [2048]:
            arch = "sdxl"
        elif dims == [768]:
            arch = "sd15"
        else:
            arch = "other"
        evidence["rule"] = f"cross-attention dim {'/'.join(map(str, dims))} (attn2 to_k/to_v in-features)"
    elif has_te2:
        arch, evidence["rule"] = "sdxl", "text_encoder_2 modules present"
    elif has_db0_attn:
        arch, evidence["rule"] = "sd15", "unet down_blocks.0 has attentions"
    elif indices and max(indices) >= 1:
        arch, evidence["rule"] = "sdxl", "more than one transformer block per attention"
    else:
        arch, evidence["rule"] = "other", "no distinguishing modules"
    return arch, evidence


# --------------------------------------------------------------------------------------------
# Metadata (self-reported)
# --------------------------------------------------------------------------------------------


def claimed_base_model_hash(metadata: dict) -> dict | None:
    """The base-model hash the file claims, or None.

    ``ss_new_sd_model_hash`` (kohya: sha256 of the whole base checkpoint) is preferred;
    ``ss_sd_model_hash`` is the legacy A1111 hash of a 64 KiB window, flagged
    ``legacy: True`` because it cannot be compared with a sha256. Returns
    ``{"value", "source", "legacy"}``.
    """
    for key, legacy in (("ss_new_sd_model_hash", False), ("ss_sd_model_hash", True)):
        value = (metadata.get(key) or "").strip()
        if value:
            return {"value": value, "source": key, "legacy": legacy}
    return None


def _normalise_hex(value: str) -> str:
    value = value.strip().lower()
    return value[2:] if value.startswith("0x") else value


def compare_base_hash(claimed: str | None, base_sha256: str | None) -> str:
    """``"absent"`` if nothing is claimed, else ``"match"`` or ``"mismatch"``.

    A claim shorter than 64 hex digits (e.g. a 10-digit AutoV2) matches if it is a prefix of
    ``base_sha256`` and at least 10 digits long.
    """
    if not claimed or not claimed.strip():
        return "absent"
    if not base_sha256:
        raise ValueError("base_sha256 is required to compare a claimed hash")
    c, b = _normalise_hex(claimed), _normalise_hex(base_sha256)
    if c == b or (10 <= len(c) < 64 and b.startswith(c)):
        return "match"
    return "mismatch"


#: the one vocabulary of the claimed base-model hash check (inspect_lora, run/load.py, the report)
BASE_HASH_CHECKS = ("match", "mismatch", "absent", "not_comparable", "not_checked")


def base_hash_check(claim: dict | None, base_sha256: str | None, base_identity: str | None = None) -> dict:
    """The LoRA's self-reported base-model hash (``claimed_base_model_hash``) against a base model:
    {"base_model_hash_check": one of BASE_HASH_CHECKS, "base_model_hash_check_detail": in words}.
    ``match`` / ``mismatch`` when the base is a single checkpoint file (its sha256 is what kohya's
    ``ss_new_sd_model_hash`` claims), ``absent`` without a claim, ``not_checked`` without a base
    model, ``not_comparable`` for a legacy 64 KiB A1111 hash or a folder (``base_identity`` not
    ``file:...``: its tree hash is not a file hash)."""
    def result(check: str, detail: str) -> dict:
        return {"base_model_hash_check": check, "base_model_hash_check_detail": detail}

    if base_sha256 is None:
        return result("not_checked", "no base model given to compare the claim with")
    if not claim:
        return result("absent", "the LoRA file claims no base-model hash")
    if claim.get("legacy"):
        return result("not_comparable", f"cannot compare: {claim['source']} is the legacy A1111 hash of a 64 KiB window, not a sha256")
    if base_identity is not None and not base_identity.startswith("file:"):
        return result("not_comparable", f"cannot compare: the base model {base_identity} is a folder (its tree hash is not a checkpoint-file sha256)")
    check = compare_base_hash(claim["value"], base_sha256)
    word = "matches" if check == "match" else "differs from"
    what = base_identity[5:] if base_identity else "the base model"
    return result(check, f"the claimed {claim['source']} {word} the sha256 of {what}")


def trigger_word_hints(metadata: dict, top: int = 10) -> list[dict]:
    """Candidate trigger words from self-reported metadata.

    From ``modelspec.trigger_phrase``, kohya dataset folder names (``"10_sks dog"`` -> ``sks
    dog``, the kohya "<repeats>_<instance> <class>" convention) and the ``top`` most frequent
    caption tags in ``ss_tag_frequency``. Malformed JSON is ignored. Each hint is
    ``{"text", "source"}`` plus ``"count"`` for tags.
    """
    hints = []
    phrase = (metadata.get("modelspec.trigger_phrase") or "").strip()
    if phrase:
        hints.append({"text": phrase, "source": "modelspec.trigger_phrase"})
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        frequency = {}
    if not isinstance(frequency, dict):
        frequency = {}
    counts: Counter = Counter()
    folders = []
    for folder, tags in frequency.items():
        m = re.match(r"^\d+_(.+)$", str(folder))
        if m and m[1].strip():
            folders.append(m[1].strip())
        if isinstance(tags, dict):
            for tag, count in tags.items():
                if isinstance(count, int) and not isinstance(count, bool) and str(tag).strip():
                    counts[str(tag).strip()] += count
    for folder in sorted(set(folders)):
        hints.append({"text": folder, "source": "ss_tag_frequency dataset folder"})
    for tag, count in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))[:top]:
        hints.append({"text": tag, "source": "ss_tag_frequency", "count": count})
    return hints


# --------------------------------------------------------------------------------------------
# The intake report
# --------------------------------------------------------------------------------------------


def _fro(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(x * x)))


def _summary(values: list) -> dict:
    present = [v for v in values if v is not None]
    counts = Counter(present)
    return {
        "min": min(present) if present else None,
        "max": max(present) if present else None,
        "distinct": sorted(counts),
        "counts": {str(k): counts[k] for k in sorted(counts)},
        "absent": len(values) - len(present),
    }


def _pickle_report(source: LoraFile, base_model_sha256: str | None) -> dict:
    digest = source.sha256
    return {
        "path": str(source.path),
        "file_name": source.path.name,
        "size": source.size,
        "sha256": digest,
        "autov2": digest[:10],
        "payload_sha256": None,
        "format": "pickle",
        "architecture": "other",
        "architecture_evidence": {"rule": "pickle file not opened (it is never unpickled here)"},
        "module_count": 0,
        "parameter_count": 0,
        "modules": [],
        "families": {},
        "rank_summary": _summary([]),
        "alpha_summary": _summary([]),
        "weight_norm_total": None,
        "metadata": {},
        "claimed_base_model_hash": None,
        "base_model_hash_check": "not_checked" if base_model_sha256 is None else "absent",
        "trigger_word_hints": [],
        "unrecognised_tensors": [],
    }


def inspect_lora(path: str | Path | LoraFile, *, allow_unsafe_pickle: bool = False,
                 base_model_sha256: str | None = None) -> dict:
    """Validate, hash and describe a LoRA file; a JSON-serialisable dict.

    Keys: ``path``, ``file_name``, ``size``, ``sha256``, ``autov2``, ``payload_sha256``,
    ``format`` (see ``detect_format``), ``families`` (see ``families_apply.family_summary``), ``architecture`` and ``architecture_evidence`` (see
    ``detect_architecture``), ``module_count``, ``parameter_count``, ``modules`` (list, sorted by
    name, of ``name, kind, rank, alpha, alpha_source, scale, in_features, out_features,
    kernel_size, parameter_count, down_norm, up_norm, delta_norm, tensors, weight_decompose,
    family_parameters, parameter_norm``), ``rank_summary``, ``alpha_summary`` (low-rank families
    only), ``weight_norm_total`` (Frobenius norm of all module dW together; None if
    no module could be computed), ``metadata`` (``__metadata__`` verbatim, SELF-REPORTED),
    ``claimed_base_model_hash`` (see ``claimed_base_model_hash``), ``base_model_hash_check``
    (``base_hash_check``: ``match | mismatch | absent``; ``not_comparable`` for a legacy-only
    claim; ``not_checked`` without ``base_model_sha256``), ``trigger_word_hints``,
    ``unrecognised_tensors``.

    A pickle file allowed with ``allow_unsafe_pickle`` is hashed but not opened: format
    ``pickle`` and no modules. ``path`` may be the ``LoraFile`` intake read (nothing is then
    read again to hash or parse it); a path is read once here.
    """
    source = path if isinstance(path, LoraFile) else LoraFile(path, allow_unsafe_pickle)
    if source.is_pickle:
        return _pickle_report(source, base_model_sha256)
    path = source.path
    header, payload_start, size = source.header()
    metadata = dict(header.get("__metadata__") or {})
    _, _, unrecognised = group_modules(header, str(path))
    modules = read_modules(path, header, payload_start)
    refuse_empty_modules(path, header, modules)
    architecture, evidence = detect_architecture(modules)
    if architecture == "zimage":  # Turbo or Base, as the file's metadata names it (SELF-REPORTED)
        evidence.update(zimage_keys.declared_variant(metadata))
    rows, weight_norm_total = _module_rows(path, header, payload_start, modules)
    claim = claimed_base_model_hash(metadata)
    return {
        "path": str(path),
        "file_name": path.name,
        "size": size,
        "sha256": source.sha256,
        "autov2": source.sha256[:10],
        "payload_sha256": source.payload_sha256(),
        "format": detect_format(header),
        "layout": {"flux": layout, "zimage": zimage_keys.layout}.get(architecture, lambda h: None)(header),
        "architecture": architecture,
        "architecture_evidence": evidence,
        "module_count": len(rows),
        "parameter_count": sum(r["parameter_count"] for r in rows),
        "modules": rows,
        "families": family_summary(rows),
        "rank_summary": _summary([r["rank"] for r in rows if r["kind"] in LOW_RANK]),
        "alpha_summary": _summary([r["alpha"] for r in rows if r["kind"] in LOW_RANK]),
        "weight_norm_total": weight_norm_total,
        "metadata": metadata,
        "claimed_base_model_hash": claim,
        "base_model_hash_check": base_hash_check(claim, base_model_sha256)["base_model_hash_check"],
        "trigger_word_hints": trigger_word_hints(metadata),
        "unrecognised_tensors": unrecognised,
    }


def _module_rows(path: Path, header: dict, payload_start: int, modules: dict) -> tuple[list[dict], float | None]:
    """The report's row of every module, and the Frobenius norm of all their dW together (None
    when no module's dW could be computed)."""
    rows, total_sq, any_delta = [], 0.0, False
    with TensorReader(path, header, payload_start) as reader:
        for name, m in modules.items():
            row = _module_row(reader, name, m)
            if row["delta_norm"] is not None:
                total_sq += row["delta_norm"] ** 2
                any_delta = True
            rows.append(row)
    return rows, (math.sqrt(total_sq) if any_delta else None)


def _module_row(reader: TensorReader, name: str, m: dict) -> dict:
    down_norm = up_norm = delta_norm = None
    delta = module_delta(reader, m)
    if m["kind"] == "lora":  # the factors are the stored tensors, flattened
        down_norm, up_norm = _fro(delta["down"]), _fro(delta["up"])
    elif m["kind"] in ("lora_tucker", "dora"):
        down_norm = _fro(reader.get(m["keys"]["down"]))
        up_norm = _fro(reader.get(m["keys"]["up"]))
    parameter_norm = math.sqrt(sum(_fro(reader.get(k)) ** 2 for role, k in m["keys"].items()
                                   if role not in ("alpha", "on_input")))
    if "unsupported" not in delta:
        delta_norm = math.sqrt(max(delta_inner(delta, delta), 0.0))
    return {"name": name, "kind": m["kind"], "rank": m["rank"], "alpha": m["alpha"], "alpha_source": m["alpha_source"],
            "scale": m["scale"], "in_features": m["in_features"], "out_features": m["out_features"],
            "kernel_size": m["kernel_size"], "parameter_count": m["parameter_count"], "down_norm": down_norm,
            "up_norm": up_norm, "delta_norm": delta_norm, "tensors": sorted(m["keys"].values()),
            "weight_decompose": m["weight_decompose"], "family_parameters": m["family_parameters"],
            "parameter_norm": parameter_norm}


# --------------------------------------------------------------------------------------------
# Weights that are no trained weights
# --------------------------------------------------------------------------------------------

#: A stored weight of magnitude above this is implausible: the weights of the base models
#: (SD 1.5, SDXL, FLUX.1) and the factors trainers produce (Kaiming-initialised down factors,
#: zero-initialised up factors, a few thousand steps) lie well within |w| < 100, and one product
#: of two factors above it (1e8) already overflows float16 (largest value 65504), the dtype most
#: LoRAs are applied in. The file is then no trained LoRA (or a crafted one), and its measured
#: effect would be overflow, not behaviour.
MAX_PLAUSIBLE_WEIGHT = 1e4
#: safetensors dtypes that hold no fractional values: a "weight" stored so is a count or a mask
#: read as a number (the readers convert it silently).
INTEGER_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})
NOT_WEIGHTS = ("alpha", "on_input")  # tensor roles that are settings, not weights


def refuse_empty_modules(path: Path, header: dict, modules: dict) -> None:
    """AuditError (one line) for a module with a tensor of zero size (a rank-0 LoRA: its factors
    are empty, it changes no weight, and the libraries that apply it fail on it)."""
    for name, m in modules.items():
        for role, key in m["keys"].items():
            shape = header[key]["shape"]
            if role not in NOT_WEIGHTS and 0 in shape:
                what = "rank 0" if m.get("rank") == 0 else "an empty tensor"
                raise AuditError(f"{path}: {what} in module {name} (tensor {key} has shape {shape}): "
                                 "it changes no weight; not a LoRA that can be examined")


def weight_faults(source: LoraFile) -> list[str]:
    """What makes a LoRA file's weights no trained weights, one sentence each (empty: none):
    a non-finite value, a magnitude above MAX_PLAUSIBLE_WEIGHT, an integer dtype where weights
    are stored, a negative or NaN alpha. ``inspect`` prints them as warnings; ``check`` and
    intake refuse a file that has any, before generation (``weight_refusal``)."""
    if source.is_pickle:
        return []
    header, payload_start, _ = source.header()
    modules = read_modules(source.path, header, payload_start)
    refuse_empty_modules(source.path, header, modules)
    faults = []
    with TensorReader(source.path, header, payload_start) as reader:
        for name, m in modules.items():
            alpha = m["alpha"]
            if alpha is not None and not alpha >= 0:
                faults.append(f"alpha {alpha!r} is {'negative' if alpha < 0 else 'not a number'}, in module {name}")
            for role, key in m["keys"].items():
                if role not in NOT_WEIGHTS:
                    faults += _tensor_faults(reader, key)
    return faults


def _tensor_faults(reader: TensorReader, key: str) -> list[str]:
    dtype = reader.header[key]["dtype"]
    if dtype in INTEGER_DTYPES:
        return [f"integer dtype {dtype} where weights are stored, in tensor {key} (read as numbers, not weights)"]
    x = reader.get(key)
    if not np.isfinite(x).all():
        return [f"{int(np.size(x) - np.isfinite(x).sum())} non-finite value(s) (NaN or Inf) in tensor {key}"]
    top = float(np.abs(x).max()) if x.size else 0.0
    if top > MAX_PLAUSIBLE_WEIGHT:
        return [f"a weight of magnitude {top:.3g} (above the plausible {MAX_PLAUSIBLE_WEIGHT:g}) in tensor {key}"]
    return []


def weight_refusal(faults: list[str]) -> str:
    """The one line that refuses a file with ``weight_faults``: the first, and how many more."""
    more = f" (and {len(faults) - 1} more; `carlos-audit inspect` lists them)" if len(faults) > 1 else ""
    return f"{faults[0]}{more}; refused: these are no trained LoRA weights"


def refuse_weight_faults(source: LoraFile, role: str = "lora") -> None:
    """AuditError in one line when ``weight_faults`` finds anything: before any generation."""
    faults = weight_faults(source)
    if faults:
        raise AuditError(f"{role} {source.path}: {weight_refusal(faults)}")
