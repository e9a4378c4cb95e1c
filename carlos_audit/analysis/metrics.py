"""The CARLoS representation of a LoRA, and its uncertainty.

For pairs i = 1..n with raw CLIP image features, d_i = f(LoRA image_i) - f(base image_i):

    Direction   D = (1/n) sum_i d_i
    Strength    S = (1/n) sum_i ||d_i||_2
    Consistency C = mean over i<j of cos(d_i, d_j)

C is computed without the n x n matrix: with u_i = d_i/||d_i|| (u_i = 0 when d_i = 0, the
convention of sklearn's cosine_similarity that the CARLoS reference code uses),

    sum_{i<j} u_i.u_j = (||sum_i u_i||^2 - sum_i ||u_i||^2) / 2,   C = that / (n(n-1)/2).

When every d_i is zero (e.g. LoRA scale 0) the directions are undefined: C is null, with the
reason, never NaN. Confidence intervals: cluster bootstrap over prompts (prompts are resampled
with replacement, each bringing all its seeds), percentile 95% interval, recorded seed; the
resampled Consistency keeps the protocol's mix of same-prompt and different-prompt pairs (see
``bootstrap``; coverage measured in docs/VALIDATION.md).
"""

from __future__ import annotations

import numpy as np

CI_METHOD = ("cluster bootstrap over prompts, percentile interval; consistency resampled with the protocol's "
             "mix of same-prompt and different-prompt pairs, no pair of copies of one prompt")


def diffs(lora: np.ndarray, base: np.ndarray) -> np.ndarray:
    return lora.astype(np.float64) - base.astype(np.float64)


def _unit(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(d, axis=1)
    u = np.zeros_like(d)
    nz = norms > 0
    u[nz] = d[nz] / norms[nz, None]
    return u, norms


def consistency(d: np.ndarray) -> float | None:
    n = d.shape[0]
    u, norms = _unit(d)
    if n < 2 or not (norms > 0).any():
        return None
    s = u.sum(axis=0)
    total = (float(s @ s) - float((norms > 0).sum())) / 2.0
    return total / (n * (n - 1) / 2.0)


def consistency_explicit(d: np.ndarray) -> float:
    """The explicit upper-triangle mean (O(n^2) memory): for tests and small checks only."""
    u, _ = _unit(d)
    m = u @ u.T
    iu = np.triu_indices(d.shape[0], k=1)
    return float(m[iu].mean())


def strength(d: np.ndarray) -> float:
    return float(np.linalg.norm(d, axis=1).mean())


def direction(d: np.ndarray) -> np.ndarray:
    return d.mean(axis=0)


def _consistency_note(d: np.ndarray) -> str | None:
    if d.shape[0] < 2:
        return "fewer than two pairs: no pairwise cosine exists"
    if not (np.linalg.norm(d, axis=1) > 0).any():
        return "every diff is exactly zero (no measurable effect), so directions and their cosines are undefined"
    return None


def _group_sums(d: np.ndarray, groups):
    """Per group (prompt): the sum of unit diffs, the number of diffs and of non-zero diffs."""
    u, norms = _unit(d)
    labels, inv = np.unique(np.asarray(groups), return_inverse=True)
    g = len(labels)
    S = np.zeros((g, d.shape[1]))
    np.add.at(S, inv, u)
    cnt = np.bincount(inv, minlength=g).astype(float)
    nz = np.bincount(inv, weights=(norms > 0).astype(float), minlength=g)
    return norms, inv, S, cnt, nz


def draw_groups(n_groups: int, n_resamples: int, seed: int) -> np.ndarray:
    """The one draw layout of every cluster bootstrap: (resamples x groups) indices of the groups
    (prompts, in sorted order of their ids) drawn with replacement from ``default_rng(seed)``.
    ``bootstrap`` and ``indicators.prompt_resamples`` both draw through it, so an indicator
    resampled with the case's seed sees the same resamples as the main intervals."""
    return np.random.default_rng(seed).integers(0, n_groups, size=(n_resamples, n_groups))


def bootstrap(d: np.ndarray, groups: np.ndarray, n_resamples: int, seed: int) -> dict:
    """Cluster bootstrap over groups (prompts). Uses per-group sufficient statistics, so each
    resample costs O(groups x dim), whatever the number of pairs.

    Consistency in a resample is the statistic of the protocol it mimics (docs/VALIDATION.md):
    the mean cosine of pairs within one drawn prompt (c_w*) and of pairs from two different
    drawn prompts (c_b*), weighted by the pair counts of the real protocol,
    ``C* = (N_w c_w* + N_b c_b*) / (N_w + N_b)``. Pairs between two copies of one prompt drawn
    twice are left out: a protocol never holds one prompt twice, and counting them (a diff
    paired with its own copy has cosine 1) put the interval above the truth in most simulated
    cases. With no resampling (every weight 1) ``C*`` is the case's Consistency exactly."""
    norms, inv, S, cnt, nz = _group_sums(d, groups)
    g = len(cnt)
    nsum = np.bincount(inv, weights=norms, minlength=g)
    W = np.zeros((n_resamples, g))
    picks = draw_groups(g, n_resamples, seed)
    for r in range(n_resamples):
        W[r] = np.bincount(picks[r], minlength=g)
    n = W @ cnt
    strengths = (W @ nsum) / n
    out = {"strength": percentile_ci(strengths)}
    if (norms > 0).any() and d.shape[0] >= 2:
        out["consistency"] = percentile_ci(_resampled_consistency(W, S, cnt, nz))
    else:
        out["consistency"] = None
    return out


def bootstrap_consistency(d: np.ndarray, groups, boots: list[np.ndarray],
                          pair_counts: tuple[float, float] | None = None) -> list[float | None]:
    """C* (see ``bootstrap``) of resamples given as index arrays of rows (whole prompts drawn,
    as ``indicators.prompt_resamples`` makes them); None for each when C is undefined.
    ``pair_counts``: the (same-prompt, different-prompt) ordered pair counts of the protocol
    whose Consistency is estimated (default: the one ``d`` comes from; analysis/sequential_intervals.py
    passes the full protocol's for a case that ran part of it)."""
    norms, inv, S, cnt, nz = _group_sums(d, groups)
    if not (norms > 0).any() or d.shape[0] < 2:
        return [None] * len(boots)
    g = len(cnt)
    W = np.stack([np.bincount(inv[b], minlength=g) for b in boots]) / cnt if boots else np.zeros((0, g))
    return [float(x) for x in _resampled_consistency(W, S, cnt, nz, pair_counts)]


def _resampled_consistency(W: np.ndarray, S: np.ndarray, cnt: np.ndarray, nz: np.ndarray,
                           pair_counts: tuple[float, float] | None = None) -> np.ndarray:
    """C* per resample (see ``bootstrap``). Per group: ``S`` the sum of unit diffs, ``cnt`` the
    pairs, ``nz`` the non-zero diffs; ``W`` (resamples x groups) how often each group is drawn."""
    Q = np.einsum("ij,ij->i", S, S)                     # ordered pairs within a group, self pairs included
    w_sum, w_pairs = W @ (Q - nz), W @ (cnt * (cnt - 1))  # ordered within-prompt pairs
    tot = W @ S
    W2 = W * W
    b_sum = np.einsum("ij,ij->i", tot, tot) - W2 @ Q     # ordered pairs of two different prompts
    b_pairs = (W @ cnt) ** 2 - W2 @ (cnt * cnt)
    n_w, n_b = pair_counts or (float((cnt * (cnt - 1)).sum()), float(cnt.sum() ** 2 - (cnt * cnt).sum()))
    with np.errstate(invalid="ignore", divide="ignore"):
        c_w = np.where(w_pairs > 0, w_sum / np.where(w_pairs > 0, w_pairs, 1), 0.0)
        c_b = np.where(b_pairs > 0, b_sum / np.where(b_pairs > 0, b_pairs, 1), c_w)  # one prompt drawn P times
    if n_w + n_b == 0:
        return c_w
    return (n_w * c_w + n_b * c_b) / (n_w + n_b)


def percentile_ci(values) -> list[float] | None:
    """The 95% percentile interval [2.5th, 97.5th percentile] of the finite values; None when
    there are none. The one CI helper of the metrics and the indicators."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(lo), float(hi)]


def compute_metrics(lora: np.ndarray, base: np.ndarray, pairs: list[dict], *, n_resamples: int = 1000,
                    seed: int = 0) -> dict:
    """Metrics for one LoRA from stored features. ``pairs`` rows carry pair_id, prompt_id,
    category and seed, in the same order as the feature rows."""
    d = diffs(lora, base)
    prompts = np.array([p["prompt_id"] for p in pairs])
    cats = [p["category"] for p in pairs]
    norms = np.linalg.norm(d, axis=1)
    cons = consistency(d)
    ci = bootstrap(d, prompts, n_resamples, seed)
    per_category = {}
    for cat in dict.fromkeys(cats):
        idx = np.array([i for i, c in enumerate(cats) if c == cat])
        dc = d[idx]
        per_category[cat] = {
            "n_pairs": int(len(idx)),
            "n_prompts": int(len(set(prompts[idx]))),
            "strength": strength(dc),
            "consistency": consistency(dc),
        }
    per_prompt = {}
    for pid in dict.fromkeys(prompts.tolist()):
        idx = prompts == pid
        per_prompt[pid] = {"strength": float(norms[idx].mean()), "consistency": consistency(d[idx])}
    result = {
        "n_pairs": int(d.shape[0]),
        "n_prompts": int(len(set(prompts.tolist()))),
        "n_seeds": int(len({p["seed"] for p in pairs})),
        "feature_dim": int(d.shape[1]),
        "direction": [float(x) for x in direction(d)],
        "strength": strength(d),
        "consistency": cons,
        "consistency_note": _consistency_note(d),
        "ci": {
            "level": 0.95,
            "method": CI_METHOD,
            "n_resamples": int(n_resamples),
            "seed": int(seed),
            "strength": ci["strength"],
            "consistency": ci["consistency"],
        },
        "per_category": per_category,
        "per_prompt": per_prompt,
        "per_pair": [
            {"pair_id": p["pair_id"], "prompt_id": p["prompt_id"], "category": p["category"],
             "seed": p["seed"], "diff_norm": float(norms[i])}
            for i, p in enumerate(pairs)
        ],
    }
    return result
