"""The method chapter's account of a sequential case: the pre-registered rule, every look
evaluated, where the case stopped and the images that saved (manifest ``sequential``,
metrics.json ``sequential``, comparison.json ``target.sequential``)."""

from __future__ import annotations

from carlos_audit.result_sections import Band, Estimate, SequentialStop

TARGET_LABELS = {
    "strength_half_width": "strength interval half-width at most",
    "consistency_half_width": "consistency interval half-width at most",
    "percentile_half_width": "percentile band half-width at most (percentage points)",
    "neighbour_stability": "top-k neighbours kept under the resamples, at least (share)",
}


SHORT = {"strength_half_width": "strength ±", "consistency_half_width": "consistency ±",
         "percentile_half_width": "percentile band ±", "neighbour_stability": "neighbours kept"}


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _interval(entry: Estimate | dict | None) -> str:
    entry = Estimate.coerce(entry) if entry else None  # a look of the manifest: a dict
    if not entry or entry.interval is None:
        return "n/a"
    lo, hi = entry.interval
    return f"{entry.estimate:.4g} [{lo:.4g}, {hi:.4g}]"


def _band(entry: Band | None) -> str:
    if not entry or entry.band is None:
        return "n/a"
    lo, hi = entry.band
    return f"{lo:.1f}–{hi:.1f}"


def sequential_context(inp, copy: str) -> dict:
    seq = inp.manifest.sequential
    if not seq:
        return {"sequential": None}
    rule = seq["rule"]
    targets = [{"label": TARGET_LABELS[k], "value": rule[k]} for k in TARGET_LABELS if rule.get(k) is not None]
    if rule.get("neighbour_stability") is not None:
        targets[-1]["label"] = targets[-1]["label"].replace("top-k", f"top-{rule['neighbour_k']}")
    looks = []
    for ev in seq["looks"]:
        t = ev.get("targets", {})
        na = ev.get("normal_approximation") or {}
        looks.append({
            "look": ev["look"], "n_prompts": ev["n_prompts"], "images": ev["images"],
            "level": 1 - ev["alpha_look"],  # a look that spends ~nothing has no interval (n/a)
            "strength": _interval(ev["strength"]), "consistency": _interval(ev["consistency"]),
            "targets": [f"{SHORT[k]} {_num(v['value'])} (target {_num(v['target'])}): {'met' if v['met'] else 'not met'}"
                        for k, v in t.items()],
            "normal": "n/a" if not na else f"{'met' if na['met'] else 'not met'} (g1 {na['skewness']:.2f}, needs > {na['min_prompts']:.0f})",
            "met": ev["met"],
        })
    stopped = inp.metrics.sequential or SequentialStop()
    target = inp.comparison.target if inp.comparison is not None else None
    placed = target.sequential if target is not None else None
    return {"sequential": {
        "rule": rule, "targets": targets, "construction": seq["construction"], "looks": looks,
        "planned": seq["planned_looks"], "stopped_at_look": seq["stopped_at_look"], "n_looks": seq["n_looks"],
        "stopped_early": seq["stopped_early"], "full_protocol": seq["full_protocol"], "reason": seq["reason"],
        "n_prompts_run": seq["n_prompts_run"], "n_prompts_protocol": seq["n_prompts_protocol"],
        "n_seeds": seq["n_seeds"], "images_run": seq["images_run"], "images_full": seq["images_full_protocol"],
        "images_saved": seq["images_saved"], "share": seq["share_of_protocol"],
        "strength": _interval(stopped.strength), "consistency": _interval(stopped.consistency),
        "level": 1 - stopped.alpha_look if inp.metrics.sequential else None,
        "decision_reproduced": stopped.decision_reproduced,
        "strength_band": _band(placed.strength_percentile) if placed else None,
        "consistency_band": _band(placed.consistency_percentile) if placed else None,
        "neighbours": placed.neighbours if placed else None,
    }}
