"""Report context of the "Claimed works" chapter (templates/sections/claimed_works.html.j2), from
metrics.json ``claimed_works`` (analysis/alignment.py) and the manifest's ``claimed_works``
(run/embed_works.py): the measures with their intervals, the calibration against the corpus, the
sensitivity to the supplier's choice of works, and the exhibit grid (claimed work, base image,
LoRA image and their three similarities), every image hash-checked and shown as a thumbnail no
larger than the copy's image size (``[report] filing_image_px`` in the filing copy).

Also here: the claimed works' rows of "Materials considered" (``claimed_materials``).
"""

from __future__ import annotations

from carlos_audit.hashing import sha256_bytes
from carlos_audit.records import Manifest
from carlos_audit.record_sections import ClaimedWorks
from carlos_audit.result_sections import Approaches, Calibration, ClaimedMeasures, Sensitivity
from carlos_audit.report.image_evidence import case_file, display_src
from carlos_audit.report.figures import DISPLAY_MAX_PX
from carlos_audit.report.text import ellipsis, short

#: claimed works shown in the exhibit grid, per copy (all are in metrics.json)
MAX_EXHIBITS = {"archive": 24, "filing": 12}
N_INFLUENTIAL = 5


def claimed_materials(manifest: Manifest, rows: list[dict]) -> None:
    """Give the claimed works' rows of "Materials considered" their role and source as stated."""
    rec = manifest.claimed_works
    if not rec:
        return
    by_role = {f"claimed_work_{w.id[1:]}": w for w in rec.works or []}
    supplier = ellipsis(rec.supplier or "", 200)
    stated = ellipsis(rec.source or "", 300)
    for r in rows:
        w = by_role.get(r["role"])
        if w is not None:
            r["role"] = f"claimed work {w.id} ({ellipsis(rec.label or '', 120)})"
            r["source"] = (f"{r['source']}; supplied by {supplier}" + (f"; {stated}" if stated else "") + " (as stated)")
        elif r["role"] == "claimed_works_list":
            r["role"] = "claimed works: sha256 list pinning them"


def _image(case_dir, rel: str, recorded: str | None, px: int, copy_rel: str, mismatches: list[str]) -> dict:
    data = case_file(case_dir, rel).read_bytes()
    if recorded and sha256_bytes(data) != recorded:
        mismatches.append(rel)
    return {"src": display_src(case_dir, data, rel, px, copy_rel), "hash": short(recorded)}


def exhibits(inp, copy: str, cw: ClaimedMeasures, rec: ClaimedWorks) -> tuple[list[dict], list[str]]:
    """One card per claimed work (up to MAX_EXHIBITS[copy]): the work, and the LoRA image nearest
    to it with its base image and the three cosine similarities."""
    px = DISPLAY_MAX_PX if copy == "archive" else min(DISPLAY_MAX_PX, inp.report.filing_image_px)
    works = {w.id: w for w in rec.works or []}
    rows = {r.pair_id: r for r in inp.manifest.pairs}
    prompt_text = {p.id: p.text for p in inp.manifest.prompts}
    cards, mismatches = [], []
    for k, near in enumerate((cw.nearest or [])[:MAX_EXHIBITS[copy]]):
        w, hits = works.get(near.work), near.pairs or []
        if w is None or not hits or hits[0].pair_id not in rows:
            continue
        hit, row = hits[0], rows[hits[0].pair_id]
        base, lora = row.arms["base"], row.arms["lora"]
        stem = f"figures/display/claimed/{px}/{k:03d}"
        cards.append({
            "work_id": w.id, "file_name": ellipsis(w.file_name or "", 60), "pair_id": row.pair_id,
            "prompt_id": row.prompt_id, "seed": row.seed, "prompt": ellipsis(prompt_text.get(row.prompt_id, ""), 90),
            "work": _image(inp.case_dir, w.thumbnail, w.thumbnail_sha256, px, f"{stem}_work.png", mismatches),
            "base": _image(inp.case_dir, base.image, base.image_sha256, px, f"{stem}_base.png", mismatches),
            "lora": _image(inp.case_dir, lora.image, lora.image_sha256, px, f"{stem}_lora.png", mismatches),
            "work_sha256": short(w.sha256),
            "work_base": hit.work_base, "work_lora": hit.work_lora, "base_lora": hit.base_lora,
        })
    return cards, mismatches


def claimed_works_context(inp, copy: str) -> dict:
    """The ``claimed`` entry of the report context: {"present": False} without claimed works."""
    cw, rec = inp.metrics.claimed_works, inp.manifest.claimed_works
    if not cw or not rec:
        return {"claimed": {"present": False}}
    cards, mismatches = exhibits(inp, copy, cw, rec)
    approach = cw.approach or Approaches()
    categories = sorted(set((approach.centroid.per_category if approach.centroid is not None else None) or {}))
    return {"claimed": {
        "present": True,
        "label": ellipsis(cw.label or "", 300), "supplier": ellipsis(cw.supplier or "", 200),
        "source": ellipsis(cw.source or "", 300), "selection": cw.selection,
        "n_works": cw.n_works, "n_pairs": cw.n_pairs, "embedder": ellipsis(cw.embedder or "", 120),
        "decoder": rec.decoder, "ci": cw.ci or {}, "definition": cw.definition or {},
        "alignment": cw.alignment or {},
        "approach": [{"target": t, "name": name, **(approach[t] if t in approach and approach[t] else {})}
                     for t, name in (("centroid", "the claimed works' centroid"), ("nearest", "the nearest claimed work"))],
        "per_category": [{"name": ellipsis(c, 60), "centroid": approach.centroid.per_category[c],
                          "nearest": approach.nearest.per_category[c]} for c in categories],
        "single_prompt_categories": any(approach.centroid.per_category[c]["n_prompts"] == 1 for c in categories),
        "calibration": calibration(cw.calibration or Calibration.from_json({})),
        "sensitivity": sensitivity(cw.sensitivity or Sensitivity.from_json({}), rec),
        "works": [{"id": w.id, "file_name": ellipsis(w.file_name or "", 60), "sha256": w.sha256,
                   "format": w.format, "mode": w.mode, "size_px": f"{w.width} x {w.height}",
                   "notes": [ellipsis(n, 120) for n in w.notes or []]} for w in rec.works or []],
        "exhibits": cards, "exhibits_capped": len(cw.nearest or []) > len(cards),
        "mismatches": mismatches,
    }}


def calibration(cal: Calibration) -> dict:
    """The false-alignment rate against the corpus (analysis/claimed_calibration.py), the corpus
    rows' names (the corpus's text, read defensively) clipped."""
    corpus = cal.corpus or {}
    return {**cal, "corpus_name": ellipsis(corpus.get("name") or "(unnamed)", 120),
            "excluded": [{**e, "name": ellipsis(e.get("name") or "", 80), "id": ellipsis(str(e.get("id")), 60)}
                         for e in cal.excluded or []],
            "most_aligned": [{**e, "name": ellipsis(e.get("name") or "", 80)} for e in cal.most_aligned or []]}


def sensitivity(sens: Sensitivity, rec: ClaimedWorks) -> dict:
    """Leave one work out, works resampled: the most influential works named."""
    names = {w.id: w.file_name for w in rec.works or []}
    loo = [{**r, "file_name": ellipsis(names.get(r["work"]) or "", 60)} for r in (sens.leave_one_out or [])[:N_INFLUENTIAL]]
    return {**sens, "influential": loo}
