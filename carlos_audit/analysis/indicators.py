"""Indicators beyond the paper, each from stored features (no image is generated here).

Dose-response    strength and consistency of the LoRA at several scales, sharing one base arm;
                 ``half_strength_scale``: the scale at which strength reaches half of its value
                 at scale 1, by linear interpolation between measured scales and the point
                 (0, 0) (exact: adapter weight 0 reproduces the base images bit for bit).
Trigger          ratio = strength without trigger words (both arms) / strength with them.
dependence       Near 0: the effect appears only when the user types the trigger.
Prompt override  per pair  cos(t(p), f(LoRA image)) - cos(t(p), f(base image))  on normalised
                 CLIP features, t(p) the text features of the prompt the user asked for.
                 Negative: the LoRA pulls images away from the request.
Scope            concentration of per-category strength: 1 - H(s)/log K with s_c the category's
                 share of the summed per-category strengths and K the number of categories.
                 0 = the same effect in every category, 1 = all of it in one category.
Effect labels    cosine between the Direction and text signatures of concept words (the retrieval
                 construction: mean over retrieval prompts of t(p + " " + word) - t(p); the
                 vocabulary and the signatures: case/labels.py).

Every CI is a 95% cluster bootstrap over prompts (prompts resampled with replacement, all their
seeds with them; stratified by category for scope), percentile interval, recorded seed.
"""

from __future__ import annotations

import numpy as np

from carlos_audit.analysis.metrics import bootstrap_consistency, consistency, draw_groups, percentile_ci, strength
from carlos_audit.vectors import cosine


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x, dtype=np.float64), where=n > 0)


def prompt_resamples(prompt_ids: list[str], n: int, seed: int, strata: list[str] | None = None) -> list[np.ndarray]:
    """Index arrays of pairs for each bootstrap resample (prompts drawn with replacement): the
    draws of ``metrics.draw_groups``, the layout of the main intervals; stratified (``strata``:
    each prompt drawn within its stratum, as scope needs) otherwise."""
    ids = np.array(prompt_ids)
    if strata is None:
        labels = np.unique(ids)  # the group order of metrics.bootstrap
        members = [np.flatnonzero(ids == u) for u in labels]
        return [np.concatenate([members[j] for j in row]) for row in draw_groups(len(labels), n, seed)]
    rng = np.random.default_rng(seed)
    uniq = list(dict.fromkeys(prompt_ids))
    members = {u: np.flatnonzero(ids == u) for u in uniq}
    groups = [[u for u in uniq if strata[members[u][0]] == s] for s in dict.fromkeys(strata)]
    out = []
    for _ in range(n):
        picked = []
        for g in groups:
            for j in rng.integers(0, len(g), size=len(g)):
                picked.append(members[g[j]])
        out.append(np.concatenate(picked))
    return out


def dose_response(diffs_by_scale: dict[float, np.ndarray], prompt_ids, n_resamples: int, seed: int,
                  main: tuple[float, dict] | None = None) -> dict:
    """Strength and consistency per LoRA scale, with intervals from the same resamples as the
    main ones; ``main``: (the case's scale, metrics ``ci``), whose point takes the main intervals
    themselves (the same draws; the one interval of that profile, whichever section cites it)."""
    rows = []
    boots = prompt_resamples(prompt_ids, n_resamples, seed)
    for scale in sorted(diffs_by_scale):
        d = diffs_by_scale[scale]
        if main is not None and scale == main[0]:
            cis = (main[1]["strength"], main[1]["consistency"])
        else:
            cis = (percentile_ci(strength(d[b]) for b in boots),
                   percentile_ci(bootstrap_consistency(d, prompt_ids, boots)))
        rows.append({"scale": scale, "strength": strength(d), "consistency": consistency(d),
                     "strength_ci": cis[0], "consistency_ci": cis[1]})
    s1 = next((r["strength"] for r in rows if r["scale"] == 1.0), None)
    half = None
    if s1:
        pts = [(0.0, 0.0)] + [(r["scale"], r["strength"]) for r in rows if r["scale"] > 0]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if y0 <= s1 / 2 <= y1 and y1 > y0:
                half = x0 + (s1 / 2 - y0) * (x1 - x0) / (y1 - y0)
                break
    monotone = all(a["strength"] < b["strength"] for a, b in zip(rows, rows[1:]))
    return {"definition": "strength and consistency per LoRA scale, one shared base arm",
            "points": rows, "strength_at_scale_1": s1, "half_strength_scale": half,
            "strength_strictly_increasing": monotone}


def trigger_dependence(d_with: np.ndarray, d_without: np.ndarray, trigger_words: list[str], prompt_ids,
                       n_resamples: int, seed: int, shared: bool) -> dict:
    sw, so = strength(d_with), strength(d_without)
    boots = prompt_resamples(prompt_ids, n_resamples, seed)
    ratio = so / sw if sw > 0 else None
    ci = percentile_ci((strength(d_without[b]) / strength(d_with[b])) if strength(d_with[b]) > 0 else None for b in boots)
    return {"definition": "strength with no trigger words in either arm / strength with the trigger words",
            "trigger_words": trigger_words, "strength_with": sw, "strength_without": so,
            "ratio": ratio, "ratio_ci": ci,
            "note": "no trigger words: both variants are the same arms" if shared else None}


def prompt_override(text: np.ndarray, base: np.ndarray, lora: np.ndarray, prompt_ids, n_resamples: int, seed: int) -> dict:
    t, b, l = _unit_rows(text.astype(np.float64)), _unit_rows(base.astype(np.float64)), _unit_rows(lora.astype(np.float64))
    per_pair = np.einsum("ij,ij->i", t, l) - np.einsum("ij,ij->i", t, b)
    boots = prompt_resamples(prompt_ids, n_resamples, seed)
    return {"definition": "mean over pairs of cos(text(p), LoRA image) - cos(text(p), base image), normalised CLIP features",
            "mean": float(per_pair.mean()), "ci": percentile_ci(per_pair[bi].mean() for bi in boots),
            "per_pair": [float(x) for x in per_pair]}


def concentration(per_cat_strength: list[float]) -> float | None:
    s = np.array(per_cat_strength, dtype=float)
    k = len(s)
    if k < 2 or s.sum() <= 0:
        return None
    p = s / s.sum()
    h = -np.sum(p[p > 0] * np.log(p[p > 0]))
    return float(1.0 - h / np.log(k))


def scope(d: np.ndarray, categories: list[str], prompt_ids, n_resamples: int, seed: int) -> dict:
    cats = list(dict.fromkeys(categories))
    arr = np.array(categories)

    def per_cat(idx):
        sub = arr[idx]
        norms = np.linalg.norm(d[idx], axis=1)
        return [float(norms[sub == c].mean()) for c in cats]

    all_idx = np.arange(len(categories))
    boots = prompt_resamples(prompt_ids, n_resamples, seed, strata=categories)
    value = concentration(per_cat(all_idx))
    per_cat_prompts = {c: len({prompt_ids[i] for i in range(len(categories)) if categories[i] == c}) for c in cats}
    thin = sorted(c for c, k in per_cat_prompts.items() if k < 2)
    note = (f"categories with a single prompt ({', '.join(thin)}) cannot vary under the stratified bootstrap, "
            "so the interval understates the uncertainty") if thin else None
    return {"note": note,"definition": "1 - H(s)/log K over the categories' shares s of summed per-category strength (0 = even, 1 = one category)",
            "concentration": value, "ci": percentile_ci(concentration(per_cat(b)) for b in boots),
            "per_category_strength": dict(zip(cats, per_cat(all_idx)))}


def effect_labels(direction: np.ndarray, words: list[tuple[str, str]], signatures: np.ndarray, top: int) -> dict:
    """Score every vocabulary word by the cosine of its text signature with the Direction."""
    d = np.asarray(direction, dtype=np.float64)
    scored = []
    for (group, w), sig in zip(words, signatures, strict=True):
        score = cosine(sig, d)  # a zero signature or Direction scores 0.0: every word is then ranked by name
        scored.append({"label": w, "group": group, "score": 0.0 if score is None else score})
    scored.sort(key=lambda r: (-r["score"], r["label"]))
    return {"definition": "cosine of the Direction with each concept word's text signature over the retrieval prompts",
            "vocabulary_size": len(words), "top": scored[:top],
            "note": "descriptive aids chosen from a fixed vocabulary, not findings"}
