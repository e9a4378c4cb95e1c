"""The one cosine of the package (a bottom module: numpy only).

The rule, stated once: the cosine of two vectors is computed in float64 as a.b / (|a| |b|),
clipped to [-1, 1]; two identical non-zero vectors give exactly 1.0; and it is **undefined
(None) when either vector is the zero vector**. A caller that must show a number for the zero
case (a score list, a percentile, a tolerance check) says so where it calls, explicitly.

``cosine_from_products`` is the same rule for callers that hold the inner product and the
squared norms instead of the vectors (the weight-space comparison of two LoRAs, lora/weights.py).
"""

from __future__ import annotations

import math

import numpy as np


def cosine(a, b) -> float | None:
    """The cosine of vectors ``a`` and ``b`` (float64); None when either is zero (module doc)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if np.array_equal(a, b) and np.any(a):
        return 1.0  # identical vectors: exactly 1, not 1 +- rounding
    den = np.linalg.norm(a) * np.linalg.norm(b)
    if den == 0:
        return None
    return float(np.clip(a @ b / den, -1.0, 1.0))


def cosine_from_products(inner: float, sq_a: float, sq_b: float) -> float | None:
    """The cosine from <a, b>, |a|^2 and |b|^2; None when either squared norm is not positive."""
    if sq_a <= 0 or sq_b <= 0:
        return None
    return max(-1.0, min(1.0, inner / math.sqrt(sq_a * sq_b)))
