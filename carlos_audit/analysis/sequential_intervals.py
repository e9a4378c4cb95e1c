"""Intervals for the full-protocol value that stay valid whatever look a sequential case stops at.

The quantity a case compares with its corpus is the **full-protocol value**: Strength,
Consistency and Direction over all N prompts x S seeds of the protocol. A sequential case
(case/sequential_plan.py) runs the first n prompts of a random, subcategory-stratified order: a
sample drawn without replacement from the protocol's own prompts. At each look k:

* the estimate: Strength and Direction of the pairs run (unbiased for the full-protocol values,
  every prompt having S seeds); Consistency as the full protocol weighs it: the within-prompt
  and between-prompt mean cosines of the pairs run, weighted by the full protocol's pair counts
  (``metrics.bootstrap_consistency`` with ``pair_counts``);
* its standard error: the spread of the case's own cluster bootstrap over prompts
  (``indicators.prompt_resamples``, seeds nested in their prompt; ``bootstrap_resamples`` and
  ``bootstrap_seed`` of the case), times sqrt(n / (n - 1)) (with-replacement resampling
  understates the sample variance by (n - 1) / n) and by the **finite-population correction**
  sqrt(1 - n / N): the interval shrinks to zero when the look holds the whole protocol;
* the level: the overall error ``alpha`` is spent over the K planned looks by a Lan-DeMets
  spending function (Pocock- or O'Brien-Fleming-type) of the information fraction
  t_k = n_k / n_K; look k's interval is the normal interval at level 1 - a_k, a_k the increment
  spent at look k. The a_k sum to ``alpha``, so by Bonferroni's inequality every look's interval
  holds its full-protocol value at once with probability >= 1 - alpha (repeated confidence
  intervals, Jennison & Turnbull 1989): the interval at the look where the case stopped is
  valid whatever made it stop.

With a reference corpus, a look also gives the percentile band (the corpus percentiles of the
interval's ends) and the stability of the top-k neighbour set: the mean share of the estimate's
top-k found again by the resampled directions, their deviations scaled like the interval (by the
two factors above and by z_k / z_0.975). numpy only; measured in docs/VALIDATION.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from carlos_audit.case.sequential_plan import SequentialSpec

CONSTRUCTION = ("repeated confidence intervals (Jennison & Turnbull 1989) for the full-protocol value: "
                "cluster bootstrap standard error over prompts with the finite-population correction "
                "sqrt(1 - n/N), normal interval at the level left by a Lan-DeMets {spending}-type alpha-spending "
                "function over {looks} planned looks, Bonferroni over looks (overall error {alpha:g})")
Z975 = NormalDist().inv_cdf(0.975)


def spent(t: float, alpha: float, kind: str) -> float:
    """Lan & DeMets (1983) spending functions: the error spent up to information fraction t."""
    t = min(max(t, 0.0), 1.0)
    if t == 0:
        return 0.0
    if kind == "pocock":
        return alpha * math.log(1 + (math.e - 1) * t)
    if kind == "obrien-fleming":
        return 2 - 2 * NormalDist().cdf(NormalDist().inv_cdf(1 - alpha / 2) / math.sqrt(t))
    raise ValueError(kind)


def look_alphas(fractions: list[float], alpha: float, kind: str) -> list[float]:
    """The error each look may spend (increments of the spending function; they sum to alpha)."""
    out, before = [], 0.0
    for t in fractions:
        now = spent(t, alpha, kind)
        out.append(now - before)
        before = now
    return out


def full_protocol_pair_counts(n_protocol: int, n_seeds: int) -> tuple[float, float]:
    """Ordered (same-prompt, different-prompt) pairs of N prompts x S seeds."""
    rows = n_protocol * n_seeds
    return float(n_protocol * n_seeds * (n_seeds - 1)), float(rows * rows - n_protocol * n_seeds * n_seeds)


def estimates(d: np.ndarray, prompt_ids: list[str], n_protocol: int, n_seeds: int, n_resamples: int,
              seed: int) -> dict:
    """Point estimates of the full-protocol Strength, Consistency and Direction from the pairs
    run, and the same for each bootstrap resample (the case's own resamples)."""
    from carlos_audit.analysis.indicators import prompt_resamples
    from carlos_audit.analysis.metrics import bootstrap_consistency

    boots = prompt_resamples(prompt_ids, n_resamples, seed)
    counts = full_protocol_pair_counts(n_protocol, n_seeds)
    norms = np.linalg.norm(d, axis=1)
    labels, inv = np.unique(np.asarray(prompt_ids), return_inverse=True)
    sums = np.zeros((len(labels), d.shape[1]))
    np.add.at(sums, inv, d)
    W = np.stack([np.bincount(inv[b], minlength=len(labels)) for b in boots]).astype(float)
    rows = W @ np.bincount(inv, minlength=len(labels))
    return {
        "n_prompts": len(labels),
        "strength": float(norms.mean()), "strength_r": np.array([norms[b].mean() for b in boots]),
        "consistency": bootstrap_consistency(d, prompt_ids, [np.arange(len(d))], counts)[0],
        "consistency_r": np.array([np.nan if c is None else c
                                   for c in bootstrap_consistency(d, prompt_ids, boots, counts)]),
        "direction": d.mean(axis=0), "direction_r": (W @ sums) / rows[:, None],
    }


def scale(n: int, n_protocol: int) -> float:
    """sqrt(n / (n - 1)) x sqrt(1 - n / N): resample spread -> standard error of the full-protocol value."""
    if n >= n_protocol:
        return 0.0
    return math.sqrt(n / (n - 1)) * math.sqrt(1 - n / n_protocol)


def interval(est: float | None, replicates: np.ndarray, factor: float, z: float | None) -> list[float] | None:
    if est is None or z is None or not np.isfinite(replicates).any():
        return None
    se = float(np.nanstd(replicates, ddof=1)) * factor
    return [est - z * se, est + z * se]


@dataclass(frozen=True)
class LookSetting:
    """What every look of one sequential case is judged by: the rule (``[protocol.sequential]``),
    the information fraction of each planned look, the protocol's size, the case's bootstrap, and
    the corpus (a corpus.store.Corpus, or None) for the percentile and neighbour targets, with
    the case's own row left out."""

    rule: SequentialSpec
    fractions: list[float]
    n_protocol: int
    n_seeds: int
    n_resamples: int
    seed: int
    corpus: object = None
    exclude_row: int | None = None


def evaluate_look(d: np.ndarray, prompt_ids: list[str], look: int, setting: LookSetting) -> dict:
    """Look ``look`` (1-based) of a sequential case whose pairs run so far give diffs ``d``:
    intervals for the full-protocol values, and whether each stopping target of the rule is met."""
    rule, n_protocol, corpus = setting.rule, setting.n_protocol, setting.corpus
    alphas = look_alphas(setting.fractions, rule.alpha, rule.spending)
    a = alphas[look - 1]
    z = NormalDist().inv_cdf(1 - a / 2) if a > 1e-15 else None  # O'Brien-Fleming spends ~nothing very early
    e = estimates(d, prompt_ids, n_protocol, setting.n_seeds, setting.n_resamples, setting.seed)
    n = e["n_prompts"]
    f = scale(n, n_protocol)
    out = {"look": look, "n_prompts": n, "n_protocol": n_protocol, "alpha_look": a, "z": z,
           "construction": CONSTRUCTION.format(spending=rule.spending, looks=len(setting.fractions), alpha=rule.alpha),
           "fpc": math.sqrt(max(0.0, 1 - n / n_protocol)), "targets": {}}
    for key in ("strength", "consistency"):
        ci = [e[key], e[key]] if f == 0 and e[key] is not None else interval(e[key], e[f"{key}_r"], f, z)
        out[key] = {"estimate": e[key], "interval": ci, "half_width": None if ci is None else (ci[1] - ci[0]) / 2}
        _target(out, f"{key}_half_width", rule, out[key]["half_width"], below=True)
    if corpus is not None:
        for key in ("strength", "consistency"):
            ci = out[key]["interval"]
            band = None if ci is None else [corpus.percentile(key, v, setting.exclude_row) for v in ci]
            band = None if band is None or None in band else band
            out[f"{key}_percentile"] = {"band": band, "half_width": None if band is None else (band[1] - band[0]) / 2}
        worst = [out[f"{k}_percentile"]["half_width"] for k in ("strength", "consistency")]
        _target(out, "percentile_half_width", rule, None if None in worst else max(worst), below=True)
        out["neighbours"] = (neighbour_stability(corpus, e, rule.neighbour_k, f * z / Z975, setting.exclude_row)
                             if z is not None else {"top_k": [], "stability": None})
        _target(out, "neighbour_stability", rule, out["neighbours"]["stability"], below=False)
    out["normal_approximation"] = normal_approximation(d, prompt_ids, whole=f == 0)
    out["met"] = (out["normal_approximation"]["met"] or not rule.normal_check) and all(
        t["met"] for t in out["targets"].values())
    return out


def normal_approximation(d: np.ndarray, prompt_ids: list[str], whole: bool = False) -> dict:
    """Cochran's rule for the normal approximation of a mean sampled without replacement, in the
    form of Sugden, Smith & Jones (2000): n > 28 + 25 g1^2, g1 the skewness of the per-prompt
    values (here the per-prompt mean diff norms, whose mean is the Strength). A look that fails it
    may not stop: with heavy-tailed effects a few prompts far out move the full-protocol value.
    ``whole``: the look holds the whole protocol (no approximation left: met)."""
    labels, inv = np.unique(np.asarray(prompt_ids), return_inverse=True)
    x = np.bincount(inv, weights=np.linalg.norm(d, axis=1)) / np.bincount(inv)
    sd = float(x.std())
    g1 = float(((x - x.mean()) ** 3).mean() / sd ** 3) if sd > 0 else 0.0
    need = 28 + 25 * g1 * g1
    return {"skewness": g1, "min_prompts": need, "met": bool(whole or len(labels) > need)}


def _target(out: dict, name: str, rule: SequentialSpec, value, below: bool) -> None:
    goal = getattr(rule, name)
    if goal is None:
        return
    met = value is not None and (value <= goal if below else value >= goal)
    out["targets"][name] = {"target": goal, "value": value, "met": bool(met)}


def neighbour_stability(corpus, e: dict, k: int, factor: float, exclude_row: int | None) -> dict:
    """The estimate's top-k neighbours and the mean share of them each scaled resample keeps."""
    from carlos_audit.corpus.search import nearest

    ex = -1 if exclude_row is None else exclude_row
    top = [r for r, _ in nearest(corpus, e["direction"][None, :], k, exclude_rows=[ex])[0]]
    if not top:
        return {"top_k": [], "stability": None}
    q = e["direction"] + factor * (e["direction_r"] - e["direction"])
    hits = nearest(corpus, q, k, exclude_rows=np.full(len(q), ex))
    shared = [len(set(top) & {r for r, _ in h}) / len(top) for h in hits]
    return {"top_k": [corpus.ids[r] for r in top], "stability": float(np.mean(shared))}


def stopped_look(d: np.ndarray, prompt_ids: list[str], sequential: dict, protocol: dict, corpus=None,
                 exclude_row: int | None = None) -> dict:
    """The evaluation of the look a sequential case stopped at (manifest ``sequential``), again
    from the stored features: what metrics.json (and, with a corpus, comparison.json) record."""
    looks = [r["n_prompts"] for r in sequential["planned_looks"]]
    setting = LookSetting(SequentialSpec.from_dict(sequential["rule"]), [n / looks[-1] for n in looks],
                          sequential["n_prompts_protocol"], sequential["n_seeds"], protocol["bootstrap_resamples"],
                          protocol["bootstrap_seed"], corpus, exclude_row)
    ev = evaluate_look(d, prompt_ids, sequential["stopped_at_look"], setting)
    recorded = sequential["looks"][-1]
    ev["decision_reproduced"] = ev["met"] == recorded["met"] and ev["n_prompts"] == recorded["n_prompts"]
    return ev


def metrics_record(ev: dict, sequential: dict) -> dict:
    """metrics.json ``sequential``: the full-protocol estimates and intervals at the stopping look."""
    keep = ("look", "n_prompts", "n_protocol", "alpha_look", "z", "fpc", "construction", "strength", "consistency",
            "normal_approximation", "decision_reproduced")
    return {**{k: ev[k] for k in keep}, "n_looks": sequential["n_looks"], "alpha": sequential["rule"]["alpha"],
            "spending": sequential["rule"]["spending"], "stopped_early": sequential["stopped_early"],
            "full_protocol": sequential["full_protocol"]}


def comparison_record(ev: dict) -> dict:
    """comparison.json ``target.sequential``: the percentile bands of the full-protocol intervals
    and the stability of the top-k neighbours at the stopping look."""
    return {k: ev[k] for k in ("look", "strength", "consistency", "strength_percentile", "consistency_percentile",
                               "neighbours")}
