"""The comparisons' context: placement against the reference corpus (comparison.json ``corpus``,
``target``) and head-to-head comparisons with named LoRA files (``head_to_head``, with
hash-checked triptychs of the comparison arms' images)."""

from __future__ import annotations

from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_bytes
from carlos_audit.records import Comparison, Manifest, Pair
from carlos_audit.result_sections import (
    Behaviour,
    CorpusRef,
    LoraRef,
    PerPairCosine,
    Target,
    TargetVsComparison,
    Weights,
)
from carlos_audit.report.image_evidence import case_file, display_src
from carlos_audit.report.figures import DISPLAY_MAX_PX
from carlos_audit.report.text import clip, flatten, num_or_none, pair_ci, short

N_MODULE_NAMES = 5        # module names listed when two LoRA files differ in their modules


def corpus_placement(comparison: Comparison | None) -> dict:
    if comparison is None or not (comparison.corpus or comparison.target):
        return {"configured": False}  # no file, or only ``head_to_head`` (no reference corpus)
    corpus = comparison.corpus or CorpusRef()
    target = comparison.target or Target()
    neighbours = []
    for n in target.neighbours or []:
        name, cut = clip(n.name if "name" in n else "", 80)
        neighbours.append({"id": clip(n.id if "id" in n else "", 80)[0], "name": name + ("…" if cut else ""),
                           "similarity": n.similarity, "strength": n.strength, "consistency": n.consistency})
    hashes = corpus.corpus_sha256 if isinstance(corpus.corpus_sha256, dict) else {}
    signature = corpus.signature
    return {
        "configured": True,
        "name": clip(corpus.name or "(unnamed)", 120)[0],
        "n": corpus.n,
        "excluded_row": corpus.excluded_row,
        "unverifiable_fields": [str(f) for f in corpus.unverifiable_fields or []],
        "allow_incompatible": bool(corpus.allow_incompatible),
        "hash_rows": [(k, v) for k, v in sorted(hashes.items()) if v],
        "signature": signature,
        "signature_rows": flatten(signature) if isinstance(signature, dict) else [],
        "compatible": corpus.compatible is not False,
        "differing_fields": [str(f) for f in corpus.differing_fields or []],
        "strength_percentile": target.strength_percentile,
        "consistency_percentile": target.consistency_percentile,
        "neighbours": neighbours,
        "has_points": bool(comparison.corpus_points is not None and comparison.corpus_points.strength),
    }



def _arm_image(case_dir: Path, row: Pair, arm: str, rel_display: str, mismatches: list[dict]) -> dict | None:
    """One image of a pair for a triptych: checked against its recorded hash, a display copy when large."""
    arms = row.arms or {}
    rec = arms[arm] if arm in arms else None
    if rec is None or not rec.image:
        return None
    path = case_file(case_dir, rec.image)
    if not path.is_file():
        raise AuditError(f"case folder {case_dir} lacks {rec.image} (pair {row.pair_id}, arm {arm}); the report needs every image it shows")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if arm not in ("base", "lora") and actual != rec.image_sha256:  # base and LoRA: image_evidence
        mismatches.append({"pair_id": row.pair_id, "arm": arm, "path": rec.image,
                           "recorded": rec.image_sha256, "actual": actual})
    return {"src": display_src(case_dir, data, rec.image, DISPLAY_MAX_PX, rel_display), "hash": short(rec.image_sha256)}


def triptychs(case_dir: Path, h: dict, ids: list | None, group: str, mismatches: list[dict]) -> list[dict]:
    """The pairs ``ids`` of head-to-head ``h`` (its index, arm, rows by pair id, prompt texts,
    per-pair cosines) as triptychs: base, examined LoRA, comparison LoRA."""
    cards = []
    for k, pid in enumerate(ids or []):
        row = h["rows"].get(pid)
        if row is None:
            continue
        imgs = {role: _arm_image(case_dir, row, a, f"figures/display/h2h{h['index']:02d}_{group}{k:02d}_{role}.png", mismatches)
                for role, a in (("base", "base"), ("target", "lora"), ("cmp", h["arm"]))}
        if any(v is None for v in imgs.values()):
            continue
        text, cut = clip(h["prompt_text"].get(row.prompt_id, ""), 110)
        cards.append({"pair_id": row.pair_id, "prompt_id": row.prompt_id, "seed": row.seed,
                      "prompt": text + ("…" if cut else ""), "cosine": num_or_none(h["values"].get(pid)), **imgs})
    return cards


def weights_context(w: Weights | None) -> dict:
    w = w or Weights.from_json({})

    def names(v):
        return {"n": len(v or []), "first": [clip(x, 100)[0] for x in (v or [])[:N_MODULE_NAMES]]}

    return {"present": bool(w), "cosine": num_or_none(w.cosine), "norm_ratio": num_or_none(w.norm_ratio),
            "payload_identical": w.payload_identical, "modules_compared": w.modules_compared,
            "only_a": names(w.modules_only_in_a), "only_b": names(w.modules_only_in_b),
            "format_a": w.format_a, "format_b": w.format_b, "reading": clip(w.reading or "", 200)[0]}


def head_to_head(case_dir: Path, manifest: Manifest, comparison: Comparison | None, figs: dict, prompt_text: dict,
                 mismatches: list[dict]) -> list[dict]:
    """comparison.json ``head_to_head``: one entry per comparison LoRA, with its triptychs."""
    if comparison is None or comparison.head_to_head is None:
        return []
    rows_by_id = {r.pair_id: r for r in manifest.pairs}
    out = []
    for i, h in enumerate(comparison.head_to_head, start=1):
        arm = str(h.arm if "arm" in h else "")
        lora = h.lora or LoraRef.from_json({})
        b = h.behaviour or Behaviour.from_json({})
        ppc = b.per_pair_cosine or PerPairCosine.from_json({})
        values, q = ppc.values or {}, ppc.quantiles or {}
        st = b.strength or TargetVsComparison.from_json({})
        co = b.consistency or TargetVsComparison.from_json({})
        name, cut = clip(lora.file_name or f"comparison LoRA {i}", 120)
        trip = {"index": i, "arm": arm, "rows": rows_by_id, "prompt_text": prompt_text, "values": values}
        out.append({
            "index": i, "arm": arm, "file_name": name + ("…" if cut else ""), "sha256": str(lora.sha256 or ""),
            "direction_cosine": num_or_none(b.direction_cosine), "direction_cosine_ci": pair_ci(b.direction_cosine_ci),
            "per_pair_mean": num_or_none(ppc.mean),
            "quantiles": [(k, num_or_none(q[k])) for k in ("p05", "p25", "p50", "p75", "p95") if k in q],
            "n_pairs": len(values),
            "per_category": [{"name": clip(c, 60)[0], "cosine": num_or_none(v)}
                             for c, v in sorted((b.per_category_cosine or {}).items(), key=lambda kv: str(kv[0]))],
            "strength": {"target": num_or_none(st.target), "comparison": num_or_none(st.comparison)},
            "consistency": {"target": num_or_none(co.target), "comparison": num_or_none(co.comparison)},
            "weights": weights_context(h.weights),
            "figure": figs.get(f"h2h_{i}"),
            "agree_most": triptychs(case_dir, trip, b.agree_most, "m", mismatches),
            "agree_least": triptychs(case_dir, trip, b.agree_least, "l", mismatches),
        })
    return out
