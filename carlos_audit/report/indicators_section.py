"""The further indicators' context (metrics.json ``indicators``: beyond the CARLoS paper)."""

from __future__ import annotations

from carlos_audit.records import Metrics
from carlos_audit.result_sections import DoseResponse, Scope
from carlos_audit.report.text import clip, num_or_none, pair_ci

N_LABELS_SHOWN = 10       # effect labels listed (all are in metrics.json)


def indicators(metrics: Metrics) -> dict:
    """The indicators beyond the paper (metrics.json ``indicators``), each None when absent."""
    ind = metrics.indicators
    out = {"present": False, "dose": None, "trigger": None, "override": None, "scope": None, "labels": None}
    dr, td, po = ind.dose_response, ind.trigger_dependence, ind.prompt_override
    if dr is not None and dr.points:
        out["dose"] = dose(dr)
    if td is not None:
        words = [clip(w, 60)[0] for w in (td.trigger_words or [])][:20]
        out["trigger"] = {"ratio": num_or_none(td.ratio), "ratio_ci": pair_ci(td.ratio_ci),
                          "strength_with": num_or_none(td.strength_with),
                          "strength_without": num_or_none(td.strength_without),
                          "words": words, "note": td.note, "definition": str(text(td.definition))}
    if po is not None and num_or_none(po.mean) is not None:
        vals = [float(v) for v in po.per_pair or [] if num_or_none(v) is not None]
        ci = pair_ci(po.ci)
        out["override"] = {"mean": float(po.mean), "ci": ci, "n": len(vals),
                           "n_negative": sum(v < 0 for v in vals),
                           "min": min(vals) if vals else None, "max": max(vals) if vals else None,
                           "ci_excludes_zero": bool(ci and (ci[1] < 0 or ci[0] > 0)),
                           "definition": str(text(po.definition))}
    if ind.scope is not None:
        out["scope"] = scope(ind.scope)
    el = ind.effect_labels
    if el is not None:
        top = [{"label": clip(text(r.label), 60)[0], "group": clip(text(r.group), 40)[0], "score": num_or_none(r.score)}
               for r in (el.top or [])[:N_LABELS_SHOWN]]
        out["labels"] = {"top": top, "n_top": len(el.top or []), "vocabulary_size": el.vocabulary_size,
                         "note": el.note, "definition": str(text(el.definition))}
    out["present"] = any(out[k] is not None for k in ("dose", "trigger", "override", "scope", "labels"))
    return out


def text(value) -> str:
    """A text field of an indicator, "" when the file lacks it."""
    return "" if value is None else value


def dose(dr: DoseResponse) -> dict:
    s1 = num_or_none(dr.strength_at_scale_1)
    points = []
    for p in sorted(dr.points, key=lambda p: float(p.scale)):
        s = num_or_none(p.strength)
        points.append({"scale": float(p.scale), "strength": s, "strength_ci": pair_ci(p.strength_ci),
                       "consistency": num_or_none(p.consistency), "consistency_ci": pair_ci(p.consistency_ci),
                       "share": (s / s1 * 100.0) if (s is not None and s1) else None})
    return {"points": points, "strength_at_scale_1": s1, "half_strength_scale": num_or_none(dr.half_strength_scale),
            "increasing": bool(dr.strength_strictly_increasing), "definition": str(text(dr.definition))}


def scope(sc: Scope) -> dict:
    per = sc.per_category_strength or {}
    total = sum(float(v) for v in per.values() if num_or_none(v) is not None)
    rows = [{"name": clip(k, 60)[0], "strength": num_or_none(v),
             "share": (float(v) / total * 100.0) if (total > 0 and num_or_none(v) is not None) else None}
            for k, v in sorted(per.items(), key=lambda kv: str(kv[0]))]
    return {"concentration": num_or_none(sc.concentration), "ci": pair_ci(sc.ci),
            "rows": rows, "note": sc.note, "definition": str(text(sc.definition))}
