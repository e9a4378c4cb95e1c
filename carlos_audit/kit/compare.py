"""Compare a reproduction with the original case: images, features, diffs, metrics, conclusions.

Both sides are case folders of the same layout (``images/<arm>/<pair>.png``,
``embeddings/<arm>/<pair>.npy``); the original is the kit's ``results/`` folder. Nothing here
generates anything or imports torch.

    images      identical bytes, or the pixel difference (max, mean absolute, 0..255) and PSNR (dB)
    features    cosine of each image's raw CLIP features, original vs reproduction
    diffs       per pair and profile: cosine of the (LoRA - base) feature differences, and the
                relative change of their norm
    metrics     per profile, from the compared pairs on each side (same bootstrap resamples and
                seed): strength and consistency, numerically close (METRIC_TOLERANCE) or not, each
                original value inside the reproduction's 95% interval and the reverse; the cosine
                of the two directions
    conclusions with every pair: the percentiles against the reference corpus (and, given the
                corpus, the nearest neighbours) recomputed from the reproduction's metrics
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from carlos_audit.hashing import sha256_bytes, sha256_file
from carlos_audit.records import Comparison

#: a reproduced image's CLIP features must have at least this cosine with the original's
#: (the value `verify` uses for a different platform)
FEATURE_COSINE_TOLERANCE = 0.999
#: a metric agrees when it is numerically equal within this tolerance (strength: relative;
#: consistency, a mean cosine: absolute), or else when each side lies in the other's 95% interval.
#: Needed because a bootstrap interval over few prompts is narrow or degenerate (one prompt: a
#: single point) and often ends exactly at the point estimate, so last-bit noise (a different
#: thread count: <= 6e-5 relative, docs/REPRODUCIBILITY.md) would fall "outside" it.
METRIC_TOLERANCE = 1e-3


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """vectors.cosine; where it is undefined, a zero vector reproduced as zero agrees (1.0) and
    a zero vector against a non-zero one does not (0.0)."""
    from carlos_audit.vectors import cosine

    c = cosine(a, b)
    if c is None:
        return 1.0 if not np.any(a) and not np.any(b) else 0.0
    return c


def image_difference(a_png: bytes, b_png: bytes) -> dict:
    """Pixel difference of two PNGs (RGB, 0..255): max and mean absolute, PSNR in dB (None when equal)."""
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(a_png)).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(io.BytesIO(b_png)).convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        return {"same_size": False, "max_abs": None, "mean_abs": None, "psnr_db": None}
    d = np.abs(a - b)
    mse = float((d ** 2).mean())
    return {"same_size": True, "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "psnr_db": None if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)}


def compare_images(orig: Path, repro: Path, rows: list[dict], arms: list[str], recorded: dict) -> list[dict]:
    """One row per (pair, arm): identical bytes, else the pixel difference (when the original
    image is in the kit) — and the feature cosine. ``recorded`` maps (pair, arm) to the image
    sha256 of the original manifest."""
    out = []
    for r in rows:
        for arm in arms:
            img, emb = f"images/{arm}/{r['pair_id']}.png", f"embeddings/{arm}/{r['pair_id']}.npy"
            new = (repro / img).read_bytes()
            identical = sha256_bytes(new) == recorded[(r["pair_id"], arm)]
            row = {"pair_id": r["pair_id"], "category": r["category"], "arm": arm, "image_identical": identical,
                   "pixels": None}
            if not identical and (orig / img).is_file():
                row["pixels"] = image_difference((orig / img).read_bytes(), new)
            a = np.load(orig / emb, allow_pickle=False)
            b = np.load(repro / emb, allow_pickle=False)
            row["features_identical"] = sha256_file(orig / emb) == sha256_file(repro / emb)
            row["feature_cosine"] = _cos(a, b)
            out.append(row)
    return out


def compare_diffs(orig: Path, repro: Path, rows: list[dict], profiles: dict) -> list[dict]:
    """Per pair and profile: cosine of the two (LoRA - base) differences and the relative change of its norm."""
    from carlos_audit.casefolder.unit_store import CaseStore

    out = []
    ids = [r["pair_id"] for r in rows]
    for name, (base, lora) in profiles.items():
        a = CaseStore(orig).features(lora, ids).astype(np.float64) - CaseStore(orig).features(base, ids)
        b = CaseStore(repro).features(lora, ids).astype(np.float64) - CaseStore(repro).features(base, ids)
        for pid, da, db in zip(ids, a, b):
            na, nb = float(np.linalg.norm(da)), float(np.linalg.norm(db))
            out.append({"profile": name, "pair_id": pid, "diff_cosine": _cos(da, db),
                        "norm_rel_change": None if na == 0 else (nb - na) / na})
    return out


def _inside(x, interval) -> bool | None:
    if x is None or not interval:
        return None
    return bool(interval[0] <= x <= interval[1])


def _close(key: str, a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    scale = 1.0 if key == "consistency" else abs(a)
    return abs(b - a) <= METRIC_TOLERANCE * scale


def compare_metrics(orig: Path, repro: Path, rows: list[dict], profiles: dict, n_resamples: int, seed: int) -> dict:
    """Per profile: the CARLoS metrics of the compared pairs on each side, and whether each
    side's value lies inside the other's 95% interval."""
    from carlos_audit.analysis.metrics import compute_metrics
    from carlos_audit.casefolder.unit_store import CaseStore

    ids = [r["pair_id"] for r in rows]
    out = {}
    for name, (base, lora) in profiles.items():
        m = {}
        for side, root in (("original", orig), ("reproduction", repro)):
            s = CaseStore(root)
            m[side] = compute_metrics(s.features(lora, ids), s.features(base, ids), rows,
                                      n_resamples=n_resamples, seed=seed)
        o, r = m["original"], m["reproduction"]
        entry = {"n_pairs": o["n_pairs"], "n_prompts": o["n_prompts"],
                 "direction_cosine": _cos(np.asarray(o["direction"]), np.asarray(r["direction"]))}
        for key in ("strength", "consistency"):
            a, b = o[key], r[key]
            entry[key] = {
                "original": a, "reproduction": b,
                "original_ci": o["ci"][key], "reproduction_ci": r["ci"][key],
                "abs_diff": None if a is None or b is None else abs(b - a),
                "rel_diff": None if a in (None, 0) or b is None else abs(b - a) / abs(a),
                "original_in_reproduction_ci": _inside(a, r["ci"][key]),
                "reproduction_in_original_ci": _inside(b, o["ci"][key]),
            }
            entry[key]["numerically_close"] = _close(key, a, b)
        entry["direction"] = r["direction"] if name == "main" else None
        out[name] = entry
    return out


def compare_conclusions(comparison: Comparison | None, main: dict, corpus_dir: Path | None) -> dict | None:
    """The case's position in its reference corpus, recomputed from the reproduction's main
    metrics: percentiles from the corpus points stored in comparison.json (or the corpus
    itself), nearest neighbours when the corpus folder is given (its hashes must match)."""
    from carlos_audit.corpus.search import neighbours_for_vector, percentile_rank
    from carlos_audit.errors import AuditError

    if comparison is None or comparison.target is None:
        return None
    target, corpus = comparison.target, comparison.corpus or {}
    strength, consistency = main["strength"]["reproduction"], main["consistency"]["reproduction"]
    out = {"original": {"strength_percentile": target.get("strength_percentile"),
                        "consistency_percentile": target.get("consistency_percentile"),
                        "neighbours": [n.get("id") for n in target.get("neighbours", [])]}}
    if corpus_dir is not None:
        from carlos_audit.corpus.store import load_corpus

        c = load_corpus(corpus_dir)
        got = {k: c.meta.get(k) for k in ("directions_sha256", "rows_sha256")}
        if got != corpus.get("corpus_sha256"):
            raise AuditError(f"corpus {corpus_dir.name}: its hashes differ from the corpus the case was compared with; refusing")
        r = neighbours_for_vector(c, main["direction"], strength, consistency, top_k=len(target.get("neighbours", [])) or 10,
                                  exclude_id=corpus.get("excluded_row"))
        out["reproduction"] = {"strength_percentile": r["strength_percentile"],
                               "consistency_percentile": r["consistency_percentile"],
                               "neighbours": [n.get("id") for n in r["neighbours"]]}
    else:
        pts = comparison.corpus_points or {}
        out["reproduction"] = {"strength_percentile": percentile_rank(pts.get("strength", []), strength),
                               "consistency_percentile": percentile_rank(pts.get("consistency", []), consistency),
                               "neighbours": None}
    o, r = out["original"], out["reproduction"]
    out["percentiles_unchanged"] = (o["strength_percentile"] == r["strength_percentile"]
                                    and o["consistency_percentile"] == r["consistency_percentile"])
    out["neighbours_unchanged"] = None if r["neighbours"] is None else o["neighbours"] == r["neighbours"]
    return out


def verdict(images: list[dict], metrics: dict, conclusions: dict | None) -> tuple[str, list[str]]:
    """``identical`` (every image and feature file byte-identical), ``within tolerance`` (every
    feature cosine >= FEATURE_COSINE_TOLERANCE, every metric numerically close or inside the other
    side's interval both ways, conclusions unchanged) or ``different``; with the reasons."""
    if images and all(r["image_identical"] and r["features_identical"] for r in images):
        return "identical", []
    reasons = []
    low = [r for r in images if r["feature_cosine"] < FEATURE_COSINE_TOLERANCE]
    if low:
        worst = min(low, key=lambda r: r["feature_cosine"])
        reasons.append(f"{len(low)} image(s) with feature cosine below {FEATURE_COSINE_TOLERANCE} "
                       f"(lowest {worst['feature_cosine']:.6f}, {worst['pair_id']} [{worst['arm']}])")
    for name, m in metrics.items():
        for key in ("strength", "consistency"):
            e = m[key]
            if not e["numerically_close"] and False in (e["original_in_reproduction_ci"], e["reproduction_in_original_ci"]):
                reasons.append(f"{name} {key}: {e['original']} vs {e['reproduction']}, beyond the numerical tolerance "
                               f"({METRIC_TOLERANCE}) and outside the other side's 95% interval")
    if conclusions:
        if not conclusions["percentiles_unchanged"]:
            reasons.append("the percentiles against the reference corpus changed")
        if conclusions["neighbours_unchanged"] is False:
            reasons.append("the nearest neighbours in the reference corpus changed")
    return ("different" if reasons else "within tolerance"), reasons
