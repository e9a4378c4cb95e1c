"""Do the 95% intervals of metrics.json cover the truth 95% of the time? A simulation.

Synthetic diffs with a known truth, clustered by prompt like a case's (docs/VALIDATION.md):

    d(p, s) = m + r_p * a_p + q_ps * e_ps           (prompt p, seed s)

``m`` a fixed effect direction; ``a_p`` a per-prompt offset and ``e_ps`` a per-image residual,
Gaussian with covariance ``B B^T + I`` scaled (``B`` of rank ``lowrank``: anisotropic features,
as CLIP's are); ``r_p``, ``q_ps`` are Student-t scale factors with ``dof`` degrees of freedom
(heavy tails: a few prompts and images move far more than the rest; ``dof`` None: Gaussian).

The truth, for a protocol of P prompts and S seeds:

- strength  E||d||                     (the expectation of the case's Strength);
- consistency  E[C], the expectation of the case's Consistency: a pair-count-weighted mean of
  c_w = E[cos(d(p,s), d(p,s'))] (same prompt) and c_b = ||E[d/||d||]||^2 (different prompts),
  both measured once by Monte Carlo with ``TRUTH_DRAWS`` draws (split-half unbiased for c_b).

Each replicate draws a case, runs ``metrics.bootstrap`` (the function a case's metrics.json
comes from, with the case's default number of resamples) and records whether each interval
holds the truth. No torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from carlos_audit.analysis.metrics import bootstrap, consistency, strength

TRUTH_DRAWS = 400_000
N_RESAMPLES = 1000  # the case default (casefile ``bootstrap_resamples``)


@dataclass(frozen=True)
class Shape:
    """One kind of LoRA effect. ``effect``: ||m||^2 as a share of the total residual variance;
    ``prompt_share``: share of the residual variance that is per prompt (the clustering)."""
    name: str
    effect: float
    prompt_share: float
    dof: float | None
    lowrank: int
    dim: int = 512
    scale: float = 5.0


SHAPES = (
    Shape("gaussian, typical", effect=0.12, prompt_share=0.4, dof=None, lowrank=0),
    Shape("heavy-tailed, typical", effect=0.12, prompt_share=0.4, dof=3.0, lowrank=8),
    Shape("heavy-tailed, near-zero consistency", effect=0.012, prompt_share=0.4, dof=3.0, lowrank=8),
    Shape("anisotropic, strong", effect=0.8, prompt_share=0.6, dof=5.0, lowrank=4),
)


class Generator:
    """Draws diffs of one shape (its fixed vectors come from ``seed``)."""

    def __init__(self, shape: Shape, seed: int = 0):
        self.shape = shape
        rng = np.random.default_rng(seed)
        p = shape.dim
        self.basis = rng.standard_normal((p, shape.lowrank)) * (2.0 / math.sqrt(max(shape.lowrank, 1)))
        resid = p + float((self.basis ** 2).sum())  # trace of B B^T + I
        m = rng.standard_normal(p)
        self.m = m / np.linalg.norm(m) * math.sqrt(shape.effect * resid)
        self.k = shape.scale / math.sqrt(resid * (1 + shape.effect))
        self.sd_prompt = math.sqrt(shape.prompt_share)
        self.sd_image = math.sqrt(1 - shape.prompt_share)

    def _noise(self, rng, n: int) -> np.ndarray:
        z = rng.standard_normal((n, self.shape.dim))
        if self.shape.lowrank:
            z += rng.standard_normal((n, self.shape.lowrank)) @ self.basis.T
        if self.shape.dof is not None:
            nu = self.shape.dof
            z *= np.sqrt((nu - 2) / rng.chisquare(nu, size=(n, 1)))  # unit variance, heavy tails
        return z

    def draw(self, rng, n_prompts: int, n_seeds: int) -> np.ndarray:
        """(n_prompts * n_seeds, dim) diffs, prompt-major (rows p*S .. p*S + S-1 share prompt p)."""
        a = self._noise(rng, n_prompts) * self.sd_prompt
        e = self._noise(rng, n_prompts * n_seeds) * self.sd_image
        return self.k * (self.m + np.repeat(a, n_seeds, axis=0) + e)

    def truth_parts(self, draws: int = TRUTH_DRAWS, seed: int = 12345) -> dict:
        """Monte Carlo E||d||, c_w and c_b (chunks of 5,000 prompts with two seeds each)."""
        rng = np.random.default_rng(seed)
        chunk = 5_000
        n_chunks = max(2, 2 * (draws // (4 * chunk)))  # even: two equal halves for c_b
        norm_sum, cw_sum, count = 0.0, 0.0, 0
        u_sums = [np.zeros(self.shape.dim), np.zeros(self.shape.dim)]
        for i in range(n_chunks):
            d = self.draw(rng, chunk, 2)
            norms = np.linalg.norm(d, axis=1)
            u = d / norms[:, None]
            norm_sum += float(norms.sum())
            cw_sum += float(np.einsum("ij,ij->i", u[0::2], u[1::2]).sum())
            u_sums[i % 2] += u[0::2].sum(axis=0)  # one seed per prompt: independent prompts
            count += chunk
        half = chunk * (n_chunks // 2)
        return {"strength": norm_sum / (2 * count), "c_within": cw_sum / count,
                "c_between": float((u_sums[0] / half) @ (u_sums[1] / half)), "draws": 2 * count}


def true_consistency(parts: dict, n_prompts: int, n_seeds: int) -> float:
    """E[C] for P prompts x S seeds: the pair-count-weighted mean of c_w and c_b."""
    within = n_prompts * n_seeds * (n_seeds - 1) / 2
    between = n_prompts * (n_prompts - 1) / 2 * n_seeds ** 2
    return (within * parts["c_within"] + between * parts["c_between"]) / (within + between)


def coverage(shape: Shape, n_prompts: int, n_seeds: int, reps: int, *, seed: int = 0,
             n_resamples: int = N_RESAMPLES, parts: dict | None = None) -> dict:
    """Coverage of the 95% strength and consistency intervals over ``reps`` simulated cases."""
    gen = Generator(shape, seed)
    parts = parts or gen.truth_parts()
    truth = {"strength": parts["strength"], "consistency": true_consistency(parts, n_prompts, n_seeds)}
    rng = np.random.default_rng([seed, n_prompts, n_seeds])
    groups = np.repeat(np.arange(n_prompts), n_seeds)
    hits = {"strength": 0, "consistency": 0}
    miss_low = {"strength": 0, "consistency": 0}
    widths = {"strength": [], "consistency": []}
    estimates = {"strength": [], "consistency": []}
    for r in range(reps):
        d = gen.draw(rng, n_prompts, n_seeds)
        ci = bootstrap(d, groups, n_resamples, seed + r)
        est = {"strength": strength(d), "consistency": consistency(d)}
        for key in hits:
            lo, hi = ci[key]
            hits[key] += lo <= truth[key] <= hi
            miss_low[key] += truth[key] < lo  # the interval lies above the truth
            widths[key].append(hi - lo)
            estimates[key].append(est[key])
    out = {"shape": shape.name, "n_prompts": n_prompts, "n_seeds": n_seeds, "reps": reps,
           "n_resamples": n_resamples, "truth_draws": parts["draws"]}
    for key in hits:
        out[key] = {"truth": truth[key], "coverage": hits[key] / reps, "above_truth": miss_low[key] / reps,
                    "mean_estimate": float(np.mean(estimates[key])), "mean_width": float(np.mean(widths[key]))}
    return out


#: Measured coverage of the 95% strength interval (lowest and highest over the shapes of
#: ``SHAPES``) by number of prompts, 16 seeds, 300 replicates: bench/bench_coverage.py,
#: docs/VALIDATION.md. Below ``MIN_PROMPTS_NOMINAL`` prompts some shape fell under 0.90.
STRENGTH_COVERAGE = {8: (0.76, 0.91), 20: (0.83, 0.91), 56: (0.88, 0.93)}
MIN_PROMPTS_NOMINAL = 280


def interval_warning(metrics: dict) -> str | None:
    """A warning for a case whose intervals fall in the zone where simulation found them too narrow."""
    n = metrics.get("n_prompts")
    if not isinstance(n, int) or n >= MIN_PROMPTS_NOMINAL:
        return None
    near = max([p for p in STRENGTH_COVERAGE if p <= n] or [min(STRENGTH_COVERAGE)])
    lo, hi = STRENGTH_COVERAGE[near]
    return (f"This case used {n} prompts. In simulations with a known truth (docs/VALIDATION.md), 95% strength "
            f"intervals from {near} prompts covered the true strength in only {lo:.0%} to {hi:.0%} of cases (the "
            f"lower figure when the effect varies from prompt to prompt with heavy tails): read the strength interval "
            f"as too narrow. With {MIN_PROMPTS_NOMINAL} prompts coverage was 93% or more.")
