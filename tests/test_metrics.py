"""CARLoS metrics on known vectors: definitions, the O(n) consistency, zero effects, bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from carlos_audit.analysis.metrics import (
    bootstrap,
    bootstrap_consistency,
    compute_metrics,
    consistency,
    consistency_explicit,
    direction,
    strength,
)


def _pairs(n_prompts, n_seeds, cats=("a", "b")):
    return [{"pair_id": f"p{i}_s{s}", "prompt_id": f"p{i}", "category": cats[i % len(cats)], "seed": s}
            for i in range(n_prompts) for s in range(n_seeds)]


def test_consistency_equals_explicit_upper_triangle():
    rng = np.random.default_rng(1)
    for n, d in ((2, 3), (17, 8), (400, 64)):
        x = rng.normal(size=(n, d)) + rng.normal(size=d)
        assert consistency(x) == pytest.approx(consistency_explicit(x), abs=1e-12)


def test_consistency_scales_to_thousands_of_pairs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4480, 512)) + 0.2
    c = consistency(x)  # no 4480 x 4480 matrix is built
    sub = x[:1500]
    assert consistency(sub) == pytest.approx(consistency_explicit(sub), abs=1e-12)
    assert 0 < c < 1


def test_definitions_on_known_vectors():
    d = np.array([[3.0, 4.0], [3.0, 4.0], [-3.0, -4.0]])
    assert strength(d) == 5.0
    assert np.allclose(direction(d), [1.0, 4.0 / 3.0])
    assert consistency(d) == pytest.approx((1 - 1 - 1) / 3)


def test_zero_effect_gives_exact_zero_and_null_consistency():
    base = np.random.default_rng(3).normal(size=(8, 16)).astype(np.float32)
    m = compute_metrics(base.copy(), base, _pairs(4, 2), n_resamples=100)
    assert m["strength"] == 0.0
    assert m["consistency"] is None
    assert "zero" in m["consistency_note"]
    assert m["ci"]["consistency"] is None
    assert m["ci"]["strength"] == [0.0, 0.0]


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(4)
    lora, base = rng.normal(size=(40, 8)) + 1.0, rng.normal(size=(40, 8))
    pairs = _pairs(10, 4)
    m1 = compute_metrics(lora, base, pairs, n_resamples=500, seed=7)
    m2 = compute_metrics(lora, base, pairs, n_resamples=500, seed=7)
    assert m1 == m2
    lo, hi = m1["ci"]["strength"]
    assert lo <= m1["strength"] <= hi
    lo, hi = m1["ci"]["consistency"]
    assert lo <= m1["consistency"] <= hi
    assert set(m1["per_category"]) == {"a", "b"}
    assert sum(c["n_pairs"] for c in m1["per_category"].values()) == 40


def _resampled_consistency_brute_force(d, groups, row):
    """C* of one resample by enumerating pairs: rows of the drawn prompts, each drawn copy a slot;
    a pair counts within one slot, or across slots holding different prompts (never two copies of
    one prompt); within and between means are weighted by the original protocol's pair counts."""
    u = d / np.linalg.norm(d, axis=1, keepdims=True)
    items = [(slot, g, i) for slot, g in enumerate(row) for i in np.where(groups == g)[0]]
    within, between = [], []
    for a in range(len(items)):
        for b in range(a + 1, len(items)):
            (sa, ga, ia), (sb, gb, ib) = items[a], items[b]
            if sa == sb:
                within.append(u[ia] @ u[ib])
            elif ga != gb:
                between.append(u[ia] @ u[ib])
    cnt = np.bincount(groups)
    n_w, n_b = (cnt * (cnt - 1) / 2).sum(), (cnt.sum() ** 2 - (cnt ** 2).sum()) / 2
    return (n_w * np.mean(within) + n_b * np.mean(between)) / (n_w + n_b)


def test_cluster_bootstrap_matches_a_direct_resampling():
    """The sufficient-statistics bootstrap equals recomputing the metrics on resampled prompts
    (strength: the plain statistic; consistency: the pair enumeration the method defines)."""
    rng = np.random.default_rng(5)
    d = rng.normal(size=(30, 6)) + 0.5
    groups = np.repeat(np.arange(10), 3)
    fast = bootstrap(d, groups, 50, seed=3)
    r = np.random.default_rng(3)
    picks = r.integers(0, 10, size=(50, 10))
    s_vals, c_vals = [], []
    for row in picks:
        idx = np.concatenate([np.where(groups == g)[0] for g in row])
        s_vals.append(strength(d[idx]))
        c_vals.append(_resampled_consistency_brute_force(d, groups, row))
    assert fast["strength"] == pytest.approx(list(np.percentile(s_vals, [2.5, 97.5])), abs=1e-12)
    assert fast["consistency"] == pytest.approx(list(np.percentile(c_vals, [2.5, 97.5])), abs=1e-12)
    # the index-array form (dose-response) gives the same values for the same resamples
    boots = [np.concatenate([np.where(groups == g)[0] for g in row]) for row in picks]
    assert bootstrap_consistency(d, groups, boots) == pytest.approx(c_vals, abs=1e-12)


def test_unresampled_consistency_is_the_statistic():
    """Every prompt drawn once: C* equals the case's Consistency (same pairs, same weights)."""
    rng = np.random.default_rng(6)
    d = rng.normal(size=(24, 5)) + 0.3
    d[3] = 0.0  # a zero diff counts as a pair with cosine 0, as in consistency()
    groups = np.repeat(np.arange(8), 3)
    boots = [np.arange(24), np.arange(24)[::-1].copy()]
    assert bootstrap_consistency(d, groups, boots) == pytest.approx([consistency(d)] * 2, abs=1e-12)
