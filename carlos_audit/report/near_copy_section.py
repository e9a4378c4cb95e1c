"""Report context of the near-copy chapter (templates/sections/near_copies.html.j2), from
metrics.json ``near_copies`` (analysis/near_copies.py) and the manifest's ``near_copies``
(run/near_copy_arms.py) and ``claimed_works``: the thresholds with their false-near-copy rates,
the share of works reproduced by the LoRA arm beside the control's, the exhibit grid (work,
nearest LoRA image, its base counterpart, both measures, pass or fail at the threshold), the
exploratory weight indicator. Every image is hash-checked and shown as a thumbnail no larger than
the copy's image size (``[report] filing_image_px`` in the filing copy), like the claimed-works
chapter's (report/claimed_section.py).
"""

from __future__ import annotations

from carlos_audit.report.claimed_section import MAX_EXHIBITS
from carlos_audit.report.figures import DISPLAY_MAX_PX
from carlos_audit.report.image_evidence import case_file, display_src
from carlos_audit.report.text import ellipsis, short
from carlos_audit.hashing import sha256_bytes

MEASURE_NAMES = {"pixel": "pixel (tiled, shift-tolerant)", "embedding": "embedding (1 − cosine)",
                 "both": "both measures on one image"}
N_BLOCKS = 12


def _image(case_dir, rel: str, recorded: str | None, px: int, copy_rel: str, mismatches: list[str]) -> dict:
    data = case_file(case_dir, rel).read_bytes()
    if recorded and sha256_bytes(data) != recorded:
        mismatches.append(rel)
    return {"src": display_src(case_dir, data, rel, px, copy_rel), "hash": short(recorded)}


def exhibits(inp, copy: str, nc, rec) -> tuple[list[dict], list[str]]:
    """One card per claimed work (up to MAX_EXHIBITS[copy]): the work, the LoRA image nearest to
    it under the pixel measure, the base image of the same prompt and seed, both measures."""
    px = DISPLAY_MAX_PX if copy == "archive" else min(DISPLAY_MAX_PX, inp.report.filing_image_px)
    works = {w.id: w for w in inp.manifest.claimed_works.works or []}
    rows = {r["pair_id"]: r for r in rec["pairs"]}
    prompts = {p["id"]: p["text"] for p in rec["prompts"]}
    cards, mismatches = [], []
    for k, hit in enumerate((nc.works or [])[:MAX_EXHIBITS[copy]]):
        w, row = works.get(hit["work"]), rows.get(hit["pair_id"])
        if w is None or row is None:
            continue
        base, lora = row["arms"][rec["arms"]["base"]], row["arms"][rec["arms"]["lora"]]
        stem = f"figures/display/nearcopy/{px}/{k:03d}"
        cards.append({
            "work_id": w.id, "file_name": ellipsis(w.file_name or "", 60), "pair_id": row["pair_id"],
            "seed": row["seed"], "prompt": ellipsis(prompts.get(row["prompt_id"], ""), 90), "kept": hit["kept"],
            "work": _image(inp.case_dir, w.thumbnail, w.thumbnail_sha256, px, f"{stem}_work.png", mismatches),
            "base": _image(inp.case_dir, base["image"], base["image_sha256"], px, f"{stem}_base.png", mismatches),
            "lora": _image(inp.case_dir, lora["image"], lora["image_sha256"], px, f"{stem}_lora.png", mismatches),
            "pixel": hit["pixel"], "embedding": hit["embedding"], "reproduced": hit["reproduced"],
        })
    return cards, mismatches


def near_copy_context(inp, copy: str) -> dict:
    """The ``near`` entry of the report context: {"present": False} without [near_copies]."""
    nc, rec = inp.metrics.near_copies, inp.manifest.near_copies
    if not nc or not rec or not inp.manifest.claimed_works:
        return {"near": {"present": False}}
    cards, mismatches = exhibits(inp, copy, nc, rec)
    shares = nc.shares or {}
    wi = nc.weight_indicator or {"blocks": []}
    blocks = sorted(wi["blocks"], key=lambda b: -(b["energy"] or 0.0))
    return {"near": {
        "present": True, "definition": nc.definition or {}, "alpha": nc.alpha, "n_works": nc.n_works,
        "n_kept": nc.n_kept, "warnings": [ellipsis(w, 200) for w in nc.warnings or []],
        "prompts": [{"id": p["id"], "text": ellipsis(p["text"], 120)} for p in nc.prompts or []],
        "seeds": nc.seeds or [], "samples_per_prompt": nc.samples_per_prompt, "n_images": nc.n_images_per_arm,
        "calibration": [{"measure": MEASURE_NAMES[m], **nc.calibration[m]} for m in ("pixel", "embedding")],
        "n_calibration_images": nc.calibration["n_images"], "calibration_sources": nc.calibration["sources"],
        "shares": [{"measure": MEASURE_NAMES[m], "lora": shares[m]["lora"], "base": shares[m]["base"]}
                   for m in ("pixel", "embedding", "both") if m in shares],
        "corpus": nc.corpus["refused"] if nc.corpus else None,
        "weights": {**wi, "blocks": blocks[:N_BLOCKS], "blocks_capped": len(blocks) > N_BLOCKS},
        "exhibits": cards, "exhibits_capped": len(nc.works or []) > len(cards), "mismatches": mismatches,
    }}
