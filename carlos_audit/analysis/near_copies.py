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

PIXEL_SIZE = 64
TILES = 4
MAX_SHIFT = 2
ALPHA = 0.01
#: a work whose resized pixels have a standard deviation under this is blank (no content to copy)
BLANK_STD = 2.0 / 255.0
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


def pixels(image, size: int = PIXEL_SIZE) -> np.ndarray:
    """A PIL image as (size, size, 3) float64 RGB in [0, 1], resized with Lanczos."""
    from PIL import Image

    im = image.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float64) / 255.0


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
    blank = [ids[i] for i in range(len(ids)) if float(work_px[i].std()) < BLANK_STD]
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

WEIGHT_K = 8
WEIGHT_DEFINITION = (f"per module, the share of the weight change's energy ||dW||_F^2 (dW = scale * up @ down) "
                     f"outside the span of the top-{WEIGHT_K} left singular vectors of the base weight W0: "
                     "1 - ||U_k^T dW||_F^2 / ||dW||_F^2; per block, the energy-weighted mean of its modules. "
                     "In the spirit of BAF (arXiv 2605.10439). EXPLORATORY: not validated against known memorisation")


def off_subspace_energy(w0: np.ndarray, up: np.ndarray, down: np.ndarray, scale: float, k: int = WEIGHT_K) -> tuple[float, float]:
    """(energy of dW, energy of dW outside the top-k left singular subspace of w0) of one module;
    w0 (out, in), up (out, r), down (r, in); dW = scale * up @ down is never formed."""
    w0 = np.asarray(w0, np.float64).reshape(w0.shape[0], -1)
    up, down = np.asarray(up, np.float64) * float(scale), np.asarray(down, np.float64)
    u = np.linalg.svd(w0, full_matrices=False)[0][:, :min(k, min(w0.shape))]
    gram = down @ down.T                        # r x r
    total = float(np.einsum("ij,jk,ik->", up, gram, up))   # tr(up gram up^T) = ||up @ down||^2
    proj = u.T @ up                              # k x r
    inside = float(np.einsum("ij,jk,ik->", proj, gram, proj))
    return total, max(0.0, total - inside)


def block_of(module: str) -> str:
    """The block a module belongs to: its name up to the block index (``unet.down_blocks.1``),
    else its first two parts."""
    parts = module.split(".")
    for n, p in enumerate(parts):
        if p.endswith("blocks") and n + 1 < len(parts) and parts[n + 1].isdigit():
            return ".".join(parts[:n + 2])
    return ".".join(parts[:2])


def weight_indicator(energies: dict[str, tuple[float, float]], k: int = WEIGHT_K) -> dict:
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
