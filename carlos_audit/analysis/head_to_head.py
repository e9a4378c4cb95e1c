"""Head-to-head: a disputed (target) LoRA against specific comparison LoRAs.

Behaviour, from stored features of arms that share one base arm:
- direction cosine cos(D_target, D_comparison) with a 95% cluster bootstrap CI over prompts;
- per-pair diff cosines cos(d_target(p, s), d_comparison(p, s)) (same prompt and seed);
- per-category direction cosines; strength and consistency side by side;
- the pairs where the two agree most and least (for image triptychs).
Weights, generation-free: ``weights_compare.compare_weights`` and its reading.
"""

from __future__ import annotations

import numpy as np

from carlos_audit.analysis.indicators import prompt_resamples
from carlos_audit.analysis.metrics import consistency, percentile_ci, strength
from carlos_audit.vectors import cosine

N_TRIPTYCHS = 3


def behaviour(d_target: np.ndarray, d_cmp: np.ndarray, pairs: list[dict], n_resamples: int, seed: int) -> dict:
    prompt_ids = [p["prompt_id"] for p in pairs]
    cats = [p["category"] for p in pairs]
    boots = prompt_resamples(prompt_ids, n_resamples, seed)
    per_pair = [cosine(a, b) for a, b in zip(d_target, d_cmp)]
    valid = np.array([x for x in per_pair if x is not None])
    order = sorted((i for i, x in enumerate(per_pair) if x is not None), key=lambda i: (-per_pair[i], pairs[i]["pair_id"]))
    per_cat = {}
    arr = np.array(cats)
    for c in dict.fromkeys(cats):
        idx = arr == c
        per_cat[c] = cosine(d_target[idx].mean(axis=0), d_cmp[idx].mean(axis=0))
    return {
        "direction_cosine": cosine(d_target.mean(axis=0), d_cmp.mean(axis=0)),
        "direction_cosine_ci": percentile_ci(cosine(d_target[b].mean(axis=0), d_cmp[b].mean(axis=0)) for b in boots),
        "per_pair_cosine": {
            "mean": float(valid.mean()) if valid.size else None,
            "quantiles": dict(zip(("p05", "p25", "p50", "p75", "p95"),
                                  [float(q) for q in np.percentile(valid, [5, 25, 50, 75, 95])])) if valid.size else None,
            "values": {pairs[i]["pair_id"]: per_pair[i] for i in range(len(pairs))},
        },
        "per_category_cosine": per_cat,
        "strength": {"target": strength(d_target), "comparison": strength(d_cmp)},
        "consistency": {"target": consistency(d_target), "comparison": consistency(d_cmp)},
        "agree_most": [pairs[i]["pair_id"] for i in order[:N_TRIPTYCHS]],
        "agree_least": [pairs[i]["pair_id"] for i in order[::-1][:N_TRIPTYCHS]],
        "definition": "cosines of raw-feature diffs against one shared base arm; CI: 95% cluster bootstrap over prompts",
    }


def weights(path_target, path_cmp) -> dict:
    from carlos_audit.lora.weights import class_error_rates, compare_weights, weights_class, weights_reading

    r = compare_weights(path_target, path_cmp)
    keep = {k: r[k] for k in ("cosine", "norm_ratio", "payload_identical", "modules_compared",
                              "modules_only_in_a", "modules_only_in_b", "format_a", "format_b") if k in r}
    keep["reading"] = weights_reading(r)
    keep["class"] = weights_class(r)
    keep["class_error_rates"] = class_error_rates(keep["class"])  # measured on generated pairs
    keep["per_module"] = r.get("per_module", [])
    return keep
