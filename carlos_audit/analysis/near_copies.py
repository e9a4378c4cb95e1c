"""Does the LoRA reproduce the works? The near-copy search (metrics.json ``near_copies``), the
measures and their thresholds as pure functions on arrays; numpy only (the case folder's PNGs are
decoded by Pillow, the one image library the tool uses).

Two independent measures of how close a generated image x is to a claimed work w, both distances
(lower = closer):

pixel        the tiled, shift-tolerant distance of the extraction literature (Carlini et al.,
             "Extracting Training Data from Diffusion Models", USENIX Security 2023, section 4.1:
             images split into tiles, the L2 distance of each pair of corresponding tiles, the
             maximum over tiles). Here: both images resized to PIXEL_SIZE x PIXEL_SIZE (Lanczos,
             which absorbs a rescaled copy), RGB in [0, 1]; the per-tile distance is the root mean
             square difference of the tile's samples (so 0..1 whatever the tile size), TILES x
             TILES tiles; small shifts searched: every offset of up to MAX_SHIFT pixels in each
             direction, the tiles laid over the overlapping part, the smallest maximum kept.
embedding    1 - cosine of the case embedder's raw image features (the features the run stored).

A work is a near-copy candidate in an arm when the arm's nearest image to it is closer than the
measure's threshold. The thresholds come from known non-copies, never chosen by eye: the distances
between the works and the main protocol's base-arm images (unrelated prompts, no LoRA) and between
the works themselves (distinct works); the threshold is their ALPHA quantile (a distance must be
strictly below it), and the false-near-copy rate at the threshold is the share of those non-copies
below it, with its Wilson 95% interval. The control is the base arm of the extraction protocol: the
same prompts and seeds without the LoRA.

What this does not measure: a legal finding of reproduction or of substantial similarity. It says
how close generated images come to the supplied works under two stated measures, with the base
model as control.
"""

from __future__ import annotations

import math

import numpy as np

from carlos_audit.errors import AuditError
from carlos_audit.record_sections import plain
from carlos_audit.case.near_copies import BLANK_STD, PIXEL_SIZE, is_blank, pixels  # noqa: F401  (pixels: re-exported)

TILES = 4
MAX_SHIFT = 2
ALPHA = 0.01
#: two works closer than this (pixel measure) are the same picture
IDENTICAL = 1e-3
#: at most this many main-protocol base images serve as non-copies (evenly spaced over the pairs)
MAX_CALIBRATION_IMAGES = 1024
MEASURES = ("pixel", "embedding")

DEFINITION = {
    "pixel": f"tiled shift-tolerant distance (Carlini et al. 2023): both images resized to {PIXEL_SIZE} x {PIXEL_SIZE} "
             f"(Lanczos), RGB in [0, 1], {TILES} x {TILES} tiles, per tile the root mean square difference, the maximum "
             f"over tiles; offsets of up to {MAX_SHIFT} pixels searched, the smallest kept",
    "embedding": "1 - cosine of the case embedder's raw image features",
    "threshold": f"the {ALPHA:g} quantile of the distances of known non-copies (the works against the main protocol's "
                 "base-arm images, and the works against each other); a near-copy candidate is strictly below it",
    "control": "the base model (no LoRA) under the same prompts and seeds as the LoRA arm",
    "reading": "similarity under two stated measures, with the base model as control; not a legal finding of "
               "reproduction or of substantial similarity",
}


def tile_bounds(length: int, tiles: int) -> list[tuple[int, int]]:
    """``tiles`` consecutive ranges covering 0..length (sizes differ by at most one)."""
    cuts = [round(length * k / tiles) for k in range(tiles + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _tile_rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, n) root mean square difference of flattened tiles a (m, p) and b (n, p)."""
    p = a.shape[1]
    sq = (a * a).mean(axis=1)[:, None] + (b * b).mean(axis=1)[None, :] - 2.0 * (a @ b.T) / p
    return np.sqrt(np.clip(sq, 0.0, None))


def tiled_distance(a: np.ndarray, b: np.ndarray, tiles: int = TILES, max_shift: int = MAX_SHIFT) -> np.ndarray:
    """(m, n) pixel measure between images a (m, S, S, 3) and b (n, S, S, 3) (``pixels``): for
    each offset (dy, dx) with |dy|, |dx| <= max_shift, the overlap of a and b shifted by it cut
    into tiles x tiles tiles, the maximum of the per-tile RMS difference; the minimum over offsets."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    s = a.shape[1]
    if a.shape[1:] != b.shape[1:] or a.shape[1] != a.shape[2] or s <= 2 * max_shift + tiles:
        raise ValueError(f"images must share one square size larger than {2 * max_shift + tiles} pixels")
    best = np.full((a.shape[0], b.shape[0]), np.inf)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            h, w = s - abs(dy), s - abs(dx)
            ca = a[:, max(dy, 0):max(dy, 0) + h, max(dx, 0):max(dx, 0) + w]
            cb = b[:, max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w]
            worst = np.zeros_like(best)
            for y0, y1 in tile_bounds(h, tiles):
                for x0, x1 in tile_bounds(w, tiles):
                    ta = ca[:, y0:y1, x0:x1].reshape(len(ca), -1)
                    tb = cb[:, y0:y1, x0:x1].reshape(len(cb), -1)
                    worst = np.maximum(worst, _tile_rms(ta, tb))
            best = np.minimum(best, worst)
    return best


def embedding_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, n) 1 - cosine of raw feature rows a (m, dim) and b (n, dim); a zero row is at distance 1."""
    from carlos_audit.analysis.alignment import unit_rows

    return 1.0 - np.clip(unit_rows(np.asarray(a, np.float64)) @ unit_rows(np.asarray(b, np.float64)).T, -1.0, 1.0)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> list[float] | None:
    """The Wilson score 95% interval of a proportion k / n; None when n is 0."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def calibrate(noncopy: np.ndarray, alpha: float = ALPHA) -> dict:
    """The threshold of one measure from the distances of known non-copies: their ``alpha``
    quantile (the order statistic at ceil(alpha * n), so that at most alpha of them fall strictly
    below it), and the false-near-copy rate there with its Wilson interval."""
    d = np.sort(np.asarray(noncopy, dtype=np.float64).ravel())
    n = int(d.size)
    if n == 0:
        return {"threshold": None, "alpha": alpha, "n_noncopies": 0, "n_below": 0, "rate": None, "rate_ci": None,
                "resolved": False}
    t = float(d[max(0, math.ceil(alpha * n) - 1)])
    k = int((d < t).sum())
    return {"threshold": t, "alpha": alpha, "n_noncopies": n, "n_below": k, "rate": k / n, "rate_ci": wilson(k, n),
            "resolved": n >= math.ceil(1 / alpha),
            "min_noncopy": float(d[0]), "median_noncopy": float(np.median(d))}


def work_warnings(work_px: np.ndarray, ids: list[str]) -> tuple[list[str], list[tuple[int, int]], list[str]]:
    """(blank work ids, pairs (i, j) of works that are the same picture, warnings as sentences)."""
    blank = [ids[i] for i in range(len(ids)) if is_blank(work_px[i])]
    d = tiled_distance(work_px, work_px)
    same = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids)) if d[i, j] < IDENTICAL]
    notes = [f"work {w} is blank (pixel standard deviation under {BLANK_STD:.4f}): left out of the search"
             for w in blank]
    notes += [f"works {ids[i]} and {ids[j]} are the same picture under the pixel measure (distance "
              f"{d[i, j]:.2g}): their pair is left out of the non-copies, and each counts as a work" for i, j in same]
    return blank, same, notes


def noncopy_distances(d_cal: np.ndarray, d_works: np.ndarray, keep: np.ndarray, same: list[tuple[int, int]]) -> np.ndarray:
    """The non-copy distances of one measure: the kept works against the calibration images
    (d_cal, works x images) and against each other (d_works, works x works, upper triangle, pairs
    that are the same picture left out)."""
    idx = np.flatnonzero(keep)
    pairs = [(i, j) for a, i in enumerate(idx) for j in idx[a + 1:] if (i, j) not in set(same)]
    between = np.array([d_works[i, j] for i, j in pairs], dtype=np.float64)
    return np.concatenate([d_cal[idx].ravel(), between])


def arm_nearest(d: np.ndarray, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Per work (row of d, works x images): the index of the nearest image (ties: the first) and
    whether it is below ``threshold``."""
    best = np.argmin(d, axis=1)
    dist = d[np.arange(len(d)), best]
    return best, (dist < threshold) if threshold is not None else np.zeros(len(d), dtype=bool)


def shares(passed: dict, keep: np.ndarray) -> dict:
    """{measure: {arm: {n, k, share, ci}}} of works that pass, over the kept works."""
    n = int(keep.sum())
    out = {}
    for measure, by_arm in passed.items():
        out[measure] = {}
        for arm, flags in by_arm.items():
            k = int(np.asarray(flags)[keep].sum())
            out[measure][arm] = {"n_works": n, "n_reproduced": k, "share": k / n if n else None, "ci": wilson(k, n)}
    return out


def search(d: dict, thresholds: dict, keep: np.ndarray) -> tuple[list[dict], dict]:
    """The per-work rows and the shares. ``d[measure][arm]``: works x images distances of the
    extraction arms ("lora", "base", same pairs in the same order)."""
    nearest = {m: {a: arm_nearest(d[m][a], thresholds[m]) for a in ("lora", "base")} for m in MEASURES}
    both = {a: np.array([bool(((d["pixel"][a][j] < thresholds["pixel"]) & (d["embedding"][a][j] < thresholds["embedding"])).any())
                         if thresholds["pixel"] is not None and thresholds["embedding"] is not None else False
                         for j in range(len(keep))]) for a in ("lora", "base")}
    passed = {m: {a: nearest[m][a][1] for a in ("lora", "base")} for m in MEASURES}
    passed["both"] = both
    rows = []
    for j in range(len(keep)):
        i = int(nearest["pixel"]["lora"][0][j])
        row = {"index": i, "kept": bool(keep[j])}
        for m in MEASURES:
            t = thresholds[m]
            row[m] = {"lora": float(d[m]["lora"][j, i]), "base": float(d[m]["base"][j, i]),
                      "lora_pass": t is not None and bool(d[m]["lora"][j, i] < t),
                      "base_pass": t is not None and bool(d[m]["base"][j, i] < t),
                      "nearest_lora": float(d[m]["lora"][j].min()), "nearest_base": float(d[m]["base"][j].min()),
                      "nearest_base_index": int(nearest[m]["base"][0][j])}
        row["reproduced"] = {m: {a: bool(passed[m][a][j]) for a in ("lora", "base")} for m in (*MEASURES, "both")}
        rows.append(row)
    return rows, shares(passed, keep)


# ----------------------------------------------------------------------------- the weight indicator

WEIGHT_DEFINITION = ("per module, the share of the weight change's energy ||dW||_F^2 (dW = scale * up @ down) "
                     "outside the span of the top-k left singular vectors of the base weight W0: "
                     "1 - ||U_k^T dW||_F^2 / ||dW||_F^2; per block, the energy-weighted mean of its modules. "
                     "In the spirit of BAF (arXiv 2605.10439). EXPLORATORY: not validated against known memorisation")


def block_of(module: str) -> str:
    """The block a module belongs to: its name up to the block index (``unet.down_blocks.1``) or
    ``mid_block``, else its first two parts."""
    parts = module.split(".")
    for n, p in enumerate(parts):
        if p == "mid_block":
            return ".".join(parts[:n + 1])
        if p.endswith("blocks") and n + 1 < len(parts) and parts[n + 1].isdigit():
            return ".".join(parts[:n + 2])
    return ".".join(parts[:2])


def weight_indicator(energies: dict[str, tuple[float, float]], k: int) -> dict:
    """Per block and overall, the share of weight-change energy off the base weights' principal
    subspace, from {module: (energy, off-subspace energy)}."""
    blocks: dict[str, list[float]] = {}
    for name, (total, off) in sorted(energies.items()):
        acc = blocks.setdefault(block_of(name), [0.0, 0.0, 0])
        acc[0], acc[1], acc[2] = acc[0] + total, acc[1] + off, acc[2] + 1
    total = sum(v[0] for v in blocks.values())
    off = sum(v[1] for v in blocks.values())
    return {"k": k, "definition": WEIGHT_DEFINITION, "exploratory": True, "n_modules": len(energies),
            "share": off / total if total > 0 else None,
            "blocks": [{"block": b, "n_modules": int(v[2]), "energy": v[0], "share": v[1] / v[0] if v[0] > 0 else None}
                       for b, v in blocks.items()]}


# ----------------------------------------------------------------------------- the case folder

CORPUS_REFUSAL = ("not computed: a reference corpus holds one profile (Direction and the other measures) per LoRA, "
                  "not its images, so the rate of corpus LoRAs under these prompts would have to be generated; it "
                  "is refused rather than approximated from their profiles")


def read_pixels(store, rels: list[str]) -> np.ndarray:
    """(n, PIXEL_SIZE, PIXEL_SIZE, 3) pixel readings of the case folder's PNGs ``rels``."""
    from PIL import Image

    out = []
    for rel in rels:
        with Image.open(store.path(rel)) as im:
            out.append(pixels(im))
    return np.stack(out) if out else np.zeros((0, PIXEL_SIZE, PIXEL_SIZE, 3))


def calibration_rows(manifest) -> list[dict]:
    """The main protocol's pairs whose base-arm images serve as non-copies (evenly spaced, at
    most MAX_CALIBRATION_IMAGES)."""
    rows = list(manifest.pairs)
    if len(rows) <= MAX_CALIBRATION_IMAGES:
        return rows
    return [rows[i] for i in np.linspace(0, len(rows) - 1, MAX_CALIBRATION_IMAGES).round().astype(int)]


def distances(store, manifest) -> tuple[dict, list[str], list[dict]]:
    """Both measures between the works and: each other, the calibration images, the two
    extraction arms; the work ids and the extraction pair rows."""
    from carlos_audit.run.embed_works import claimed_features

    rec, works = manifest.near_copies, manifest.claimed_works
    ids = [w["id"] for w in works["works"]]
    rows, cal = rec["pairs"], calibration_rows(manifest)
    b_arm = manifest.protocol["profiles"]["main"][0]
    arm = {"lora": rec["arms"]["lora"], "base": rec["arms"]["base"]}
    w_px, w_emb = read_pixels(store, [w["thumbnail"] for w in works["works"]]), claimed_features(store, works)
    sets = {"works": (w_px, w_emb),
            "calibration": (read_pixels(store, [r["arms"][b_arm]["image"] for r in cal]),
                            store.features(b_arm, [r["pair_id"] for r in cal]).astype(np.float64))}
    for k, name in arm.items():
        sets[k] = (read_pixels(store, [r["arms"][name]["image"] for r in rows]),
                   store.features(name, [r["pair_id"] for r in rows]).astype(np.float64))
    d = {"pixel": {k: tiled_distance(w_px, px) for k, (px, _) in sets.items()},
         "embedding": {k: embedding_distance(w_emb, f) for k, (_, f) in sets.items()}}
    return d, ids, rows


def near_copy_metrics(store, manifest) -> dict:
    """metrics.json ``near_copies`` of a case whose manifest records the extraction arms."""
    rec = manifest.near_copies
    alpha = float(rec["alpha"])
    d, ids, rows = distances(store, manifest)
    w_px = read_pixels(store, [w["thumbnail"] for w in manifest.claimed_works["works"]])
    blank, same, warnings = work_warnings(w_px, ids)
    keep = np.array([i not in blank for i in ids])
    calib = {m: calibrate(noncopy_distances(d[m]["calibration"], d[m]["works"], keep, same), alpha) for m in MEASURES}
    found, share = search(d, {m: calib[m]["threshold"] for m in MEASURES}, keep)
    works = []
    for wid, row in zip(ids, found):
        pair = rows[row.pop("index")]
        for m in MEASURES:
            row[m]["nearest_base_pair"] = rows[row[m].pop("nearest_base_index")]["pair_id"]
        works.append({"work": wid, "pair_id": pair["pair_id"], "prompt_id": pair["prompt_id"], "seed": pair["seed"], **row})
    weights = rec["weights"]
    indicator = weight_indicator({n: tuple(e) for n, e in weights["modules"].items()}, weights["k"])
    indicator["modules_left_out"] = len(weights["modules_left_out"])
    indicator["corpus"] = "not available: a reference corpus holds no LoRA weights, so no distribution to compare with"
    return {
        "definition": DEFINITION, "alpha": alpha, "n_works": len(ids), "n_kept": int(keep.sum()),
        "warnings": warnings, "prompts": rec["prompts"], "seeds": rec["seeds"],
        "samples_per_prompt": rec["samples_per_prompt"], "n_images_per_arm": len(rows), "arms": rec["arms"],
        "calibration": {**calib, "n_images": len(calibration_rows(manifest)),
                        "sources": "the works against the main protocol's base-arm images and against each other"},
        "works": works, "shares": share, "corpus": {"available": False, "refused": CORPUS_REFUSAL},
        "weight_indicator": indicator,
    }


def near_copy_checks(folder) -> list[tuple[str, bool, str]]:
    """``verify``'s checks of the extraction arms: every image and feature against its recorded
    sha256, and the near-copy measures recomputed from them. None without [near_copies]."""
    from carlos_audit.fileio import json_dumps

    manifest = folder.manifest
    rec = manifest.near_copies
    if not rec:
        return []
    files = [(e[k], e[f"{k}_sha256"]) for r in rec["pairs"] for e in r["arms"].values() for k in ("image", "embedding")]
    bad = [rel for rel, sha in files if not folder.has(rel) or folder.digest(rel) != sha]
    out = [("near copies: extraction-arm images and features", not bad,
            f"modified or missing: {', '.join(bad[:6])}" if bad else f"{len(files)} files match their recorded sha256")]
    if bad:
        return out
    again = json_dumps(near_copy_metrics(folder.units, manifest))
    try:
        stored = folder.metrics.near_copies
    except AuditError:
        stored = None
    ok = stored is not None and json_dumps(plain(stored)) == again
    out.append(("near copies: measures recomputed", ok, "thresholds, distances and shares reproduced" if ok
                else "metrics.json's near_copies differs from the measures recomputed from the stored images"))
    return out
