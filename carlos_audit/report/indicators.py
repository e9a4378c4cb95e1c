"""The further indicators' context (metrics.json ``indicators``: beyond the CARLoS paper)."""

from __future__ import annotations

from carlos_audit.report.text import clip, num_or_none, pair_ci

N_LABELS_SHOWN = 10       # effect labels listed (all are in metrics.json)


def indicators(metrics: dict) -> dict:
    """The indicators beyond the paper (metrics.json ``indicators``), each None when absent."""
    ind = metrics.get("indicators")
    out = {"present": False, "dose": None, "trigger": None, "override": None, "scope": None, "labels": None}
    if not isinstance(ind, dict):
        return out

    dr = ind.get("dose_response")
    if isinstance(dr, dict) and dr.get("points"):
        s1 = num_or_none(dr.get("strength_at_scale_1"))
        points = []
        for p in sorted(dr["points"], key=lambda p: float(p["scale"])):
            s = num_or_none(p.get("strength"))
            points.append({"scale": float(p["scale"]), "strength": s, "strength_ci": pair_ci(p.get("strength_ci")),
                           "consistency": num_or_none(p.get("consistency")),
                           "consistency_ci": pair_ci(p.get("consistency_ci")),
                           "share": (s / s1 * 100.0) if (s is not None and s1) else None})
        out["dose"] = {"points": points, "strength_at_scale_1": s1,
                       "half_strength_scale": num_or_none(dr.get("half_strength_scale")),
                       "increasing": bool(dr.get("strength_strictly_increasing")),
                       "definition": str(dr.get("definition", ""))}

    td = ind.get("trigger_dependence")
    if isinstance(td, dict):
        words = [clip(w, 60)[0] for w in (td.get("trigger_words") or [])][:20]
        out["trigger"] = {"ratio": num_or_none(td.get("ratio")), "ratio_ci": pair_ci(td.get("ratio_ci")),
                          "strength_with": num_or_none(td.get("strength_with")),
                          "strength_without": num_or_none(td.get("strength_without")),
                          "words": words, "note": td.get("note"), "definition": str(td.get("definition", ""))}

    po = ind.get("prompt_override")
    if isinstance(po, dict) and num_or_none(po.get("mean")) is not None:
        vals = [float(v) for v in po.get("per_pair") or [] if num_or_none(v) is not None]
        ci = pair_ci(po.get("ci"))
        out["override"] = {"mean": float(po["mean"]), "ci": ci, "n": len(vals),
                           "n_negative": sum(v < 0 for v in vals),
                           "min": min(vals) if vals else None, "max": max(vals) if vals else None,
                           "ci_excludes_zero": bool(ci and (ci[1] < 0 or ci[0] > 0)),
                           "definition": str(po.get("definition", ""))}

    sc = ind.get("scope")
    if isinstance(sc, dict):
        per = sc.get("per_category_strength") or {}
        total = sum(float(v) for v in per.values() if num_or_none(v) is not None)
        rows = [{"name": clip(k, 60)[0], "strength": num_or_none(v),
                 "share": (float(v) / total * 100.0) if (total > 0 and num_or_none(v) is not None) else None}
                for k, v in sorted(per.items(), key=lambda kv: str(kv[0]))]
        out["scope"] = {"concentration": num_or_none(sc.get("concentration")), "ci": pair_ci(sc.get("ci")),
                        "rows": rows, "note": sc.get("note"), "definition": str(sc.get("definition", ""))}

    el = ind.get("effect_labels")
    if isinstance(el, dict):
        top = [{"label": clip(r.get("label", ""), 60)[0], "group": clip(r.get("group", ""), 40)[0],
                "score": num_or_none(r.get("score"))} for r in (el.get("top") or [])[:N_LABELS_SHOWN] if isinstance(r, dict)]
        out["labels"] = {"top": top, "n_top": len(el.get("top") or []), "vocabulary_size": el.get("vocabulary_size"),
                         "note": el.get("note"), "definition": str(el.get("definition", ""))}

    out["present"] = any(out[k] is not None for k in ("dose", "trigger", "override", "scope", "labels"))
    return out
