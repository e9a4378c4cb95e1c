"""A case's analysis from its stored features: metrics.json (CARLoS representation and
indicators) and the head-to-head section of comparison.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carlos_audit.case.casefile import Case
from carlos_audit.case.protocol import (
    load_prompts,
)
from carlos_audit.run.arms import ArmPlan
from carlos_audit.run.store import CaseStore


def _diffs(store: CaseStore, plan: ArmPlan, profile: str, ids: list[str]) -> np.ndarray:
    from carlos_audit.analysis.metrics import diffs

    b, l = plan.profiles[profile]
    return diffs(store.features(l, ids), store.features(b, ids))


def analyse(case: Case, store: CaseStore, plan: ArmPlan, pairs, pair_rows, emb, text_records) -> dict:
    """metrics.json: the CARLoS representation of the main profile, then the indicators."""
    from carlos_audit.analysis import indicators as ind
    from carlos_audit.analysis.metrics import compute_metrics, diffs
    from carlos_audit.run.embed import text_features

    pc = case.protocol
    ids = [p.id for p in pairs]
    prompt_ids = [p.prompt.id for p in pairs]
    b, l = plan.profiles["main"]
    base_f, lora_f = store.features(b, ids), store.features(l, ids)
    metrics = compute_metrics(lora_f, base_f, pair_rows, n_resamples=pc["bootstrap_resamples"], seed=pc["bootstrap_seed"])
    n, seed = pc["bootstrap_resamples"], pc["bootstrap_seed"]
    d_main = diffs(lora_f, base_f)
    extra = {}
    if pc["scales"]:
        by_scale = {case.lora["scale"]: d_main}
        by_scale.update({s: _diffs(store, plan, f"scale:{s:g}", ids) for s in pc["scales"]})
        extra["dose_response"] = ind.dose_response(by_scale, prompt_ids, n, seed)
    if "trigger:without" in plan.profiles:
        shared = plan.profiles["trigger:with"] == plan.profiles["trigger:without"]
        extra["trigger_dependence"] = ind.trigger_dependence(
            _diffs(store, plan, "trigger:with", ids), _diffs(store, plan, "trigger:without", ids),
            list(case.lora["trigger_words"]), prompt_ids, n, seed, shared)
    if text_records is not None:
        text = np.stack([np.load(store.path(text_records[p.prompt.id]["path"])) for p in pairs])
        extra["prompt_override"] = ind.prompt_override(text, base_f, lora_f, prompt_ids, n, seed)
    extra["scope"] = ind.scope(d_main, [p.prompt.category for p in pairs], prompt_ids, n, seed)
    if case.indicators["effect_labels"]:
        retrieval, _ = load_prompts("builtin:retrieval")
        extra["effect_labels"] = ind.effect_labels(
            np.array(metrics["direction"]), lambda texts: text_features(emb, texts), [p.text for p in retrieval],
            list(case.indicators["labels"]), case.indicators["top_labels"])
    metrics["indicators"] = extra
    return metrics


def head_to_head(case: Case, store: CaseStore, plan: ArmPlan, pairs, pair_rows, paths: dict, comparisons: list[dict]) -> None:
    """comparison.json ``head_to_head``: behaviour (shared base arm) and weights, per comparison LoRA."""
    from carlos_audit.analysis.head_to_head import behaviour, weights
    from carlos_audit.fileio import update_json

    ids = [p.id for p in pairs]
    d_t = _diffs(store, plan, "main", ids)
    results = []
    for i, c in enumerate(comparisons, start=1):
        prof = f"comparison:{c['adapter']}"
        results.append({
            "lora": {"path": c["path"], "file_name": Path(c["path"]).name, "sha256": c["sha256"]},
            "arm": plan.profiles[prof][1],
            "behaviour": behaviour(d_t, _diffs(store, plan, prof, ids), pair_rows,
                                   case.protocol["bootstrap_resamples"], case.protocol["bootstrap_seed"]),
            "weights": weights(paths["lora"], paths[f"comparison_lora_{i}"]),
        })
    update_json(store.path("comparison.json"), "head_to_head", results)


