"""The one cosine (carlos_audit/vectors.py) and its one zero-vector rule: undefined (None)."""

from __future__ import annotations

import numpy as np

from carlos_audit.vectors import cosine, cosine_from_products


def test_cosine_is_none_for_a_zero_vector_and_exact_for_identical_vectors():
    a = np.array([3.0, 4.0, 0.0])
    assert cosine(a, np.zeros(3)) is None and cosine(np.zeros(3), np.zeros(3)) is None
    assert cosine(a, a) == 1.0 and cosine(a, -a) == -1.0
    assert cosine(a, np.array([4.0, -3.0, 0.0])) == 0.0
    assert cosine(np.array([1, 0], dtype=np.float32), np.array([1, 1], dtype=np.float32)) == float(1 / np.sqrt(2.0))
    assert -1.0 <= cosine(np.array([1e-300, 1.0]), np.array([1e-300, 1.0 + 1e-16])) <= 1.0


def test_cosine_from_products_follows_the_same_rule():
    a, b = np.array([1.0, 2.0, 2.0]), np.array([2.0, 0.0, 1.0])
    assert cosine_from_products(float(a @ b), float(a @ a), float(b @ b)) == cosine(a, b)
    assert cosine_from_products(1.0, 0.0, 4.0) is None and cosine_from_products(0.0, 1.0, -1e-30) is None
    assert cosine_from_products(2.0 + 1e-12, 1.0, 4.0) == 1.0  # rounding beyond 1 is clipped


def test_callers_that_show_a_number_for_the_zero_case_say_which():
    from carlos_audit.analysis.indicators import effect_labels

    out = effect_labels(np.zeros(3), [("g", "b"), ("g", "a")], np.eye(3)[:2], top=2)
    assert [(r["label"], r["score"]) for r in out["top"]] == [("a", 0.0), ("b", 0.0)]
