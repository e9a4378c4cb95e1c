"""Toward whose work? The LoRA's effect against the works a claimant points to (metrics.json
``claimed_works``). numpy only: it reads the stored features of the pairs and of the claimed
works (run/embed_works.py), never a model.

With raw image features: W the claimed works (m x dim), B and L the base and LoRA images of the
main profile (pairs x dim), D = mean(L - B) the CARLoS Direction.

alignment        cos(D, u),  u = mean(W) - mean(B): the direction from the base model's images
                 under the protocol to the claimed works. 1: the effect points straight at them.
approach         per pair, on normalised features (cosine similarity s):
                   centroid  s(L_i, c) - s(B_i, c),  c = mean(W)
                   nearest   max_j s(L_i, W_j) - max_j s(B_i, W_j)
                 positive: the LoRA image is closer than its base image. Reported: the share of
                 pairs that move closer and the mean change, overall and per prompt category.
nearest examples for each claimed work, the LoRA images most similar to it, with their base
                 images: s(work, base), s(work, LoRA), s(base, LoRA).

Intervals: 95% cluster bootstrap over prompts with the draws every indicator uses
(indicators.prompt_resamples, the protocol's resamples and seed; stratified by category for the
per-category rows). The works are the supplier's fixed selection in these intervals; how much the
result depends on which works were supplied is the sensitivity table (leave one work out, and
the works resampled with the same draws over works), computed with the calibration against the
corpus (analysis/claimed_calibration.py).
"""

from __future__ import annotations

import numpy as np

from carlos_audit.analysis.indicators import prompt_resamples
from carlos_audit.vectors import cosine
from carlos_audit.analysis.metrics import percentile_ci
from carlos_audit.casefolder import CaseFolder
from carlos_audit.errors import AuditError

DEFINITION = {
    "alignment": "cos(Direction, u), u = mean(claimed-work features) - mean(base-arm features), raw image features",
    "approach": "per pair, cosine similarity of the LoRA image minus that of its base image, to the claimed works' "
                "centroid (mean of their raw features) and to the nearest claimed work; normalised features",
    "nearest": "per claimed work, the LoRA images most similar to it (cosine) and their base images",
    "reading": "an indicator of direction toward the supplied images under this embedder; not a finding of copying "
               "or of substantial similarity in law",
}


def unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x, dtype=np.float64), where=n > 0)


def claimed_direction(works: np.ndarray, base: np.ndarray) -> np.ndarray:
    return works.mean(axis=0) - base.mean(axis=0)


def alignment(works: np.ndarray, base: np.ndarray, lora: np.ndarray, boots: list[np.ndarray]) -> dict:
    d = lora - base
    u = claimed_direction(works, base)
    w_mean = works.mean(axis=0)
    resampled = [cosine(d[b].mean(axis=0), w_mean - base[b].mean(axis=0)) for b in boots]
    return {"value": cosine(d.mean(axis=0), u), "ci": percentile_ci(resampled), "u_norm": float(np.linalg.norm(u)),
            "direction_norm": float(np.linalg.norm(d.mean(axis=0)))}


def pair_changes(works: np.ndarray, base: np.ndarray, lora: np.ndarray) -> dict[str, np.ndarray]:
    """Per pair, the change in similarity to the centroid and to the nearest claimed work."""
    wn, bn, ln = unit_rows(works), unit_rows(base), unit_rows(lora)
    c = unit_rows(works.mean(axis=0, keepdims=True))[0]
    return {"centroid": ln @ c - bn @ c, "nearest": (ln @ wn.T).max(axis=1) - (bn @ wn.T).max(axis=1)}


def _summary(x: np.ndarray, boots: list[np.ndarray], idx: np.ndarray | None = None) -> dict:
    """Share closer and mean change of the pairs ``idx`` (all when None) of ``x``; ``boots`` index ``x``."""
    closer = (x if idx is None else x[idx]) > 0
    x_point = x if idx is None else x[idx]
    return {"n_pairs": int(closer.size), "n_closer": int(closer.sum()), "share_closer": float(closer.mean()),
            "share_closer_ci": percentile_ci(float((x[b] > 0).mean()) for b in boots),
            "mean_change": float(x_point.mean()), "mean_change_ci": percentile_ci(float(x[b].mean()) for b in boots)}


def approach(changes: dict[str, np.ndarray], categories: list[str], prompt_ids: list[str], boots: list[np.ndarray],
             strat_boots: list[np.ndarray]) -> dict:
    cats, prompts = np.array(categories), np.array(prompt_ids)
    out = {}
    for target, x in changes.items():
        per_cat = {}
        for c in dict.fromkeys(categories):
            idx = np.flatnonzero(cats == c)
            sub = [b[cats[b] == c] for b in strat_boots]
            per_cat[c] = {**_summary(x, sub, idx), "n_prompts": int(len(set(prompts[idx].tolist())))}
        out[target] = {**_summary(x, boots), "per_category": per_cat}
    return out


def nearest_examples(works: np.ndarray, base: np.ndarray, lora: np.ndarray, rows: list[dict], ids: list[str],
                     k: int) -> list[dict]:
    wn, bn, ln = unit_rows(works), unit_rows(base), unit_rows(lora)
    s_lora, s_base = wn @ ln.T, wn @ bn.T          # works x pairs
    s_pair = np.einsum("ij,ij->i", bn, ln)
    out = []
    for j, wid in enumerate(ids):
        order = np.lexsort((np.arange(len(rows)), -s_lora[j]))[:k]  # most similar first, ties by pair order
        out.append({"work": wid, "pairs": [
            {"pair_id": rows[i]["pair_id"], "prompt_id": rows[i]["prompt_id"], "seed": rows[i]["seed"],
             "work_lora": float(s_lora[j, i]), "work_base": float(s_base[j, i]), "base_lora": float(s_pair[i])}
            for i in order]})
    return out


def claimed_works_metrics(store, manifest, case, corpus=None) -> dict:
    """metrics.json ``claimed_works`` of a case whose manifest records claimed works; ``corpus``:
    the case's reference corpus when the caller opened it (else it is opened here)."""
    from carlos_audit.analysis.claimed_calibration import calibration, open_rater, sensitivity
    from carlos_audit.case.casefile import reference_corpus
    from carlos_audit.run.embed_works import claimed_features

    rec = manifest.claimed_works
    p, rows = manifest.protocol, manifest.pairs
    n, seed = p["bootstrap_resamples"], p["bootstrap_seed"]
    ids = [r["pair_id"] for r in rows]
    prompt_ids, cats = [r["prompt_id"] for r in rows], [r["category"] for r in rows]
    b_arm, l_arm = p["profiles"]["main"]
    base = store.features(b_arm, ids).astype(np.float64)
    lora = store.features(l_arm, ids).astype(np.float64)
    works = claimed_features(store, rec)
    work_ids = [w["id"] for w in rec["works"]]
    boots = prompt_resamples(prompt_ids, n, seed)
    align = alignment(works, base, lora, boots)
    changes = pair_changes(works, base, lora)
    rater, head = open_rater(corpus if corpus is not None else reference_corpus(case), manifest, case.reference.replicate_id)
    calib = calibration(rater, head, claimed_direction(works, base), align)
    return {
        "definition": DEFINITION,
        "label": rec["label"], "supplier": rec["supplier"], "source": rec.get("source"), "selection": rec["selection"],
        "n_works": len(work_ids), "n_pairs": len(ids), "embedder": manifest.embedder.get("identity"),
        "ci": {"level": 0.95, "method": "cluster bootstrap over prompts (indicators.prompt_resamples); per category "
               "stratified by category; the claimed works held fixed", "n_resamples": n, "seed": seed},
        "alignment": align,
        "approach": approach(changes, cats, prompt_ids, boots, prompt_resamples(prompt_ids, n, seed, strata=cats)),
        "per_pair": [{"pair_id": i, "centroid": float(a), "nearest": float(b)}
                     for i, a, b in zip(ids, changes["centroid"], changes["nearest"])],
        "nearest": nearest_examples(works, base, lora, rows, work_ids, int(rec.get("nearest") or 3)),
        "calibration": calib,
        "sensitivity": sensitivity(works, base, lora, work_ids, rater, n, seed),
    }


def claimed_checks(folder: CaseFolder) -> list[tuple[str, bool, str]]:
    """``verify``'s checks of the claimed works of a case folder: every
    stored feature and thumbnail against its recorded sha256, and the alignment recomputed from
    the stored features. None without works."""
    from carlos_audit.run.embed_works import claimed_features

    manifest = folder.manifest
    rec = manifest.claimed_works
    if not rec:
        return []
    bad = [w[k] for w in rec["works"] for k in ("embedding", "thumbnail")
           if not folder.has(w[k]) or folder.digest(w[k]) != w[f"{k}_sha256"]]
    out = [("claimed works: stored features and thumbnails", not bad,
            f"modified or missing: {', '.join(bad[:6])}" if bad else f"{2 * len(rec['works'])} files match their recorded sha256")]
    if bad:
        return out
    store, rows = folder.units, manifest.pairs
    ids = [r["pair_id"] for r in rows]
    b_arm, l_arm = folder.main_profile()
    base = store.features(b_arm, ids).astype(np.float64)
    d = store.features(l_arm, ids).astype(np.float64) - base
    again = cosine(d.mean(axis=0), claimed_direction(claimed_features(store, rec), base))
    try:
        stored = ((folder.metrics.claimed_works or {}).get("alignment") or {}).get("value")
    except AuditError:
        stored = None  # no readable metrics.json: verify's metrics check says so
    ok = again is not None and stored is not None and abs(again - stored) <= 1e-9
    out.append(("claimed works: alignment recomputed", ok, f"alignment {again:.6g} reproduced" if ok
                else f"metrics.json records {stored}, the stored features give {again}"))
    return out
