"""The comparisons' context: placement against the reference corpus (comparison.json ``corpus``,
``target``) and head-to-head comparisons with named LoRA files (``head_to_head``, with
hash-checked triptychs of the comparison arms' images)."""

from __future__ import annotations

from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_bytes
from carlos_audit.report.evidence import case_file, display_src
from carlos_audit.report.figures import DISPLAY_MAX_PX
from carlos_audit.report.text import clip, flatten, num_or_none, pair_ci, short

N_MODULE_NAMES = 5        # module names listed when two LoRA files differ in their modules


def corpus_placement(comparison: dict | None) -> dict:
    if not comparison or not (comparison.get("corpus") or comparison.get("target")):
        return {"configured": False}  # no file, or only ``head_to_head`` (no reference corpus)
    corpus = comparison.get("corpus") or {}
    target = comparison.get("target") or {}
    neighbours = []
    for n in target.get("neighbours") or []:
        name, cut = clip(n.get("name", ""), 80)
        neighbours.append({"id": clip(n.get("id", ""), 80)[0], "name": name + ("…" if cut else ""),
                           "similarity": n.get("similarity"), "strength": n.get("strength"),
                           "consistency": n.get("consistency")})
    hashes = corpus.get("corpus_sha256") if isinstance(corpus.get("corpus_sha256"), dict) else {}
    return {
        "configured": True,
        "name": clip(corpus.get("name") or "(unnamed)", 120)[0],
        "n": corpus.get("n"),
        "excluded_row": corpus.get("excluded_row"),
        "unverifiable_fields": [str(f) for f in corpus.get("unverifiable_fields") or []],
        "allow_incompatible": bool(corpus.get("allow_incompatible")),
        "hash_rows": [(k, v) for k, v in sorted(hashes.items()) if v],
        "signature": corpus.get("signature"),
        "signature_rows": flatten(corpus.get("signature")) if isinstance(corpus.get("signature"), dict) else [],
        "compatible": corpus.get("compatible", True) is not False,
        "differing_fields": [str(f) for f in corpus.get("differing_fields") or []],
        "strength_percentile": target.get("strength_percentile"),
        "consistency_percentile": target.get("consistency_percentile"),
        "neighbours": neighbours,
        "has_points": bool((comparison.get("corpus_points") or {}).get("strength")),
    }



def _arm_image(case_dir: Path, row: dict, arm: str, rel_display: str, mismatches: list[dict]) -> dict | None:
    """One image of a pair for a triptych: checked against its recorded hash, a display copy when large."""
    rec = (row.get("arms") or {}).get(arm)
    if not isinstance(rec, dict) or not rec.get("image"):
        return None
    path = case_file(case_dir, rec["image"])
    if not path.is_file():
        raise AuditError(f"case folder {case_dir} lacks {rec['image']} (pair {row['pair_id']}, arm {arm}); the report needs every image it shows")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if arm not in ("base", "lora") and actual != rec.get("image_sha256"):  # base and LoRA: image_evidence
        mismatches.append({"pair_id": row["pair_id"], "arm": arm, "path": rec["image"],
                           "recorded": rec.get("image_sha256"), "actual": actual})
    return {"src": display_src(case_dir, data, rec["image"], DISPLAY_MAX_PX, rel_display), "hash": short(rec.get("image_sha256"))}


def head_to_head(case_dir: Path, manifest: dict, comparison: dict | None, figs: dict, prompt_text: dict,
                  mismatches: list[dict]) -> list[dict]:
    """comparison.json ``head_to_head``: one entry per comparison LoRA, with its triptychs."""
    h2h = (comparison or {}).get("head_to_head")
    if not isinstance(h2h, list):
        return []
    rows_by_id = {r["pair_id"]: r for r in manifest["pairs"]}
    out = []
    for i, h in enumerate(h2h, start=1):
        if not isinstance(h, dict):
            continue
        arm = str(h.get("arm", ""))
        lora = h.get("lora") or {}
        b = h.get("behaviour") or {}
        w = h.get("weights") or {}
        ppc = b.get("per_pair_cosine") or {}
        values = ppc.get("values") or {}
        q = ppc.get("quantiles") or {}

        def triptychs(ids, group):
            cards = []
            for k, pid in enumerate(ids or []):
                row = rows_by_id.get(pid)
                if row is None:
                    continue
                imgs = {role: _arm_image(case_dir, row, a, f"figures/display/h2h{i:02d}_{group}{k:02d}_{role}.png", mismatches)
                        for role, a in (("base", "base"), ("target", "lora"), ("cmp", arm))}
                if any(v is None for v in imgs.values()):
                    continue
                text, cut = clip(prompt_text.get(row["prompt_id"], ""), 110)
                cards.append({"pair_id": row["pair_id"], "prompt_id": row["prompt_id"], "seed": row["seed"],
                              "prompt": text + ("…" if cut else ""), "cosine": num_or_none(values.get(pid)), **imgs})
            return cards

        def names(key):
            v = w.get(key) or []
            return {"n": len(v), "first": [clip(x, 100)[0] for x in v[:N_MODULE_NAMES]]}

        st, co = b.get("strength") or {}, b.get("consistency") or {}
        name, cut = clip(lora.get("file_name") or f"comparison LoRA {i}", 120)
        out.append({
            "index": i, "arm": arm, "file_name": name + ("…" if cut else ""), "sha256": str(lora.get("sha256") or ""),
            "direction_cosine": num_or_none(b.get("direction_cosine")), "direction_cosine_ci": pair_ci(b.get("direction_cosine_ci")),
            "per_pair_mean": num_or_none(ppc.get("mean")),
            "quantiles": [(k, num_or_none(q.get(k))) for k in ("p05", "p25", "p50", "p75", "p95") if k in q],
            "n_pairs": len(values),
            "per_category": [{"name": clip(c, 60)[0], "cosine": num_or_none(v)}
                             for c, v in sorted((b.get("per_category_cosine") or {}).items(), key=lambda kv: str(kv[0]))],
            "strength": {"target": num_or_none(st.get("target")), "comparison": num_or_none(st.get("comparison"))},
            "consistency": {"target": num_or_none(co.get("target")), "comparison": num_or_none(co.get("comparison"))},
            "weights": {"present": bool(w), "cosine": num_or_none(w.get("cosine")), "norm_ratio": num_or_none(w.get("norm_ratio")),
                        "payload_identical": w.get("payload_identical"), "modules_compared": w.get("modules_compared"),
                        "only_a": names("modules_only_in_a"), "only_b": names("modules_only_in_b"),
                        "format_a": w.get("format_a"), "format_b": w.get("format_b"),
                        "reading": clip(w.get("reading") or "", 200)[0]},
            "figure": figs.get(f"h2h_{i}"),
            "agree_most": triptychs(b.get("agree_most"), "m"),
            "agree_least": triptychs(b.get("agree_least"), "l"),
        })
    return out
