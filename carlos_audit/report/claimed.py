"""Report context of the "Claimed works" chapter (templates/sections/claimed_works.html.j2), from
metrics.json ``claimed_works`` (analysis/claimed.py) and the manifest's ``claimed_works``
(run/claimed.py): the measures with their intervals, the calibration against the corpus, the
sensitivity to the supplier's choice of works, and the exhibit grid (claimed work, base image,
LoRA image and their three similarities), every image hash-checked and shown as a thumbnail no
larger than the copy's image size (``[report] filing_image_px`` in the filing copy).

Also here: the claimed works' rows of "Materials considered" (``claimed_materials``).
"""

from __future__ import annotations

from carlos_audit.hashing import sha256_bytes
from carlos_audit.report.evidence import case_file, display_src
from carlos_audit.report.figures import DISPLAY_MAX_PX
from carlos_audit.report.text import ellipsis, short

#: claimed works shown in the exhibit grid, per copy (all are in metrics.json)
MAX_EXHIBITS = {"archive": 24, "filing": 12}
N_INFLUENTIAL = 5


def claimed_materials(manifest: dict, rows: list[dict]) -> None:
    """Give the claimed works' rows of "Materials considered" their role and source as stated."""
    rec = manifest.get("claimed_works") or {}
    if not rec:
        return
    by_role = {f"claimed_work_{w['id'][1:]}": w for w in rec.get("works", [])}
    supplier = ellipsis(rec.get("supplier") or "", 200)
    stated = ellipsis(rec.get("source") or "", 300)
    for r in rows:
        w = by_role.get(r["role"])
        if w is not None:
            r["role"] = f"claimed work {w['id']} ({ellipsis(rec.get('label') or '', 120)})"
            r["source"] = (f"{r['source']}; supplied by {supplier}" + (f"; {stated}" if stated else "") + " (as stated)")
        elif r["role"] == "claimed_works_list":
            r["role"] = "claimed works: sha256 list pinning them"


def _image(case_dir, rel: str, recorded: str | None, px: int, copy_rel: str, mismatches: list[str]) -> dict:
    data = case_file(case_dir, rel).read_bytes()
    if recorded and sha256_bytes(data) != recorded:
        mismatches.append(rel)
    return {"src": display_src(case_dir, data, rel, px, copy_rel), "hash": short(recorded)}


def exhibits(inp, copy: str, cw: dict, rec: dict) -> tuple[list[dict], list[str]]:
    """One card per claimed work (up to MAX_EXHIBITS[copy]): the work, and the LoRA image nearest
    to it with its base image and the three cosine similarities."""
    px = DISPLAY_MAX_PX if copy == "archive" else min(DISPLAY_MAX_PX, inp.report["filing_image_px"])
    works = {w["id"]: w for w in rec.get("works", [])}
    rows = {r["pair_id"]: r for r in inp.manifest["pairs"]}
    prompt_text = {p["id"]: p["text"] for p in inp.manifest.get("prompts", [])}
    cards, mismatches = [], []
    for k, near in enumerate((cw.get("nearest") or [])[:MAX_EXHIBITS[copy]]):
        w, hits = works.get(near["work"]), near.get("pairs") or []
        if w is None or not hits or hits[0]["pair_id"] not in rows:
            continue
        hit, row = hits[0], rows[hits[0]["pair_id"]]
        stem = f"figures/display/claimed/{px}/{k:03d}"
        cards.append({
            "work_id": w["id"], "file_name": ellipsis(w.get("file_name") or "", 60), "pair_id": row["pair_id"],
            "prompt_id": row["prompt_id"], "seed": row["seed"], "prompt": ellipsis(prompt_text.get(row["prompt_id"], ""), 90),
            "work": _image(inp.case_dir, w["thumbnail"], w.get("thumbnail_sha256"), px, f"{stem}_work.png", mismatches),
            "base": _image(inp.case_dir, row["arms"]["base"]["image"], row["arms"]["base"]["image_sha256"], px,
                           f"{stem}_base.png", mismatches),
            "lora": _image(inp.case_dir, row["arms"]["lora"]["image"], row["arms"]["lora"]["image_sha256"], px,
                           f"{stem}_lora.png", mismatches),
            "work_sha256": short(w.get("sha256")),
            "work_base": hit["work_base"], "work_lora": hit["work_lora"], "base_lora": hit["base_lora"],
        })
    return cards, mismatches


def claimed_works_context(inp, copy: str) -> dict:
    """The ``claimed`` entry of the report context: {"present": False} without claimed works."""
    cw = (inp.metrics or {}).get("claimed_works")
    rec = inp.manifest.get("claimed_works")
    if not cw or not rec:
        return {"claimed": {"present": False}}
    cards, mismatches = exhibits(inp, copy, cw, rec)
    works = {w["id"]: w for w in rec.get("works", [])}
    cal = cw.get("calibration") or {}
    sens = cw.get("sensitivity") or {}
    loo = [{**r, "file_name": ellipsis((works.get(r["work"]) or {}).get("file_name") or "", 60)}
           for r in (sens.get("leave_one_out") or [])[:N_INFLUENTIAL]]
    corpus = cal.get("corpus") or {}
    approach = cw.get("approach") or {}
    categories = sorted(set((approach.get("centroid") or {}).get("per_category") or {}))
    return {"claimed": {
        "present": True,
        "label": ellipsis(cw.get("label") or "", 300), "supplier": ellipsis(cw.get("supplier") or "", 200),
        "source": ellipsis(cw.get("source") or "", 300), "selection": cw.get("selection"),
        "n_works": cw.get("n_works"), "n_pairs": cw.get("n_pairs"), "embedder": ellipsis(cw.get("embedder") or "", 120),
        "decoder": rec.get("decoder"), "ci": cw.get("ci") or {}, "definition": cw.get("definition") or {},
        "alignment": cw.get("alignment") or {},
        "approach": [{"target": t, "name": name, **(approach.get(t) or {})}
                     for t, name in (("centroid", "the claimed works' centroid"), ("nearest", "the nearest claimed work"))],
        "per_category": [{"name": ellipsis(c, 60), "centroid": approach["centroid"]["per_category"][c],
                          "nearest": approach["nearest"]["per_category"][c]} for c in categories],
        "single_prompt_categories": any(approach["centroid"]["per_category"][c].get("n_prompts") == 1 for c in categories),
        "calibration": {**cal, "corpus_name": ellipsis(corpus.get("name") or "(unnamed)", 120),
                        "excluded": [{**e, "name": ellipsis(e.get("name") or "", 80), "id": ellipsis(str(e.get("id")), 60)}
                                     for e in cal.get("excluded") or []],
                        "most_aligned": [{**e, "name": ellipsis(e.get("name") or "", 80)} for e in cal.get("most_aligned") or []]},
        "sensitivity": {**sens, "influential": loo},
        "works": [{"id": w["id"], "file_name": ellipsis(w.get("file_name") or "", 60), "sha256": w.get("sha256"),
                   "format": w.get("format"), "mode": w.get("mode"), "size_px": f"{w.get('width')} x {w.get('height')}",
                   "notes": [ellipsis(n, 120) for n in w.get("notes") or []]} for w in rec.get("works", [])],
        "exhibits": cards, "exhibits_capped": len(cw.get("nearest") or []) > len(cards),
        "mismatches": mismatches,
    }}
