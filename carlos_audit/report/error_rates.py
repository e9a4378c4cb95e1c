"""Report context of section 5B "Known error rates" (templates/sections/error_rates.html.j2).

Built from what the case folder records alone: comparison.json (``corpus.error_rates``, each
neighbour's ``false_match``, each head-to-head ``direction_cosine_false_match`` and weights
``class_error_rates``) and metrics.json (the number of prompts, for the interval warning).
"""

from __future__ import annotations


def _share(x) -> str:
    """A share in plain words: 0.004 -> '0.4%', 0 -> '0%'."""
    if x is None:
        return "n/a"
    v = 100 * float(x)
    if v == 0:
        return "0%"
    if v >= 10:
        return f"{v:.0f}%"
    if v >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".") + "%"
    return f"{v:.2g}%"


def sentence(fm: dict | None, corpus_name: str, kind: str = "similarity") -> str | None:
    """'a similarity of 0.72 or more occurs between 0.4% of unrelated LoRA pairs in the corpus
    "X" (823 of 267,464 pairs) and 41% of pairs of versions of the same model (34 of 82)'."""
    if not fm or fm.get("similarity") is None:
        return None
    s = f"a {kind} of {fm['similarity']:.3f} or more occurs between {_share(fm['unrelated_share'])} of "
    if fm.get("basis", "").startswith("all pairs"):
        s += f"all pairs of LoRAs in the corpus “{corpus_name}” ({fm['unrelated_at_least']:,} of {fm['unrelated_pairs']:,}; " \
             "the corpus records no model ids, so related pairs cannot be told apart and are counted too)"
        return s
    s += f"unrelated LoRA pairs in the corpus “{corpus_name}” ({fm['unrelated_at_least']:,} of {fm['unrelated_pairs']:,} pairs)"
    if fm.get("related_pairs"):
        s += f" and {_share(fm['related_share'])} of pairs of versions of the same model " \
             f"({fm['related_at_least']} of {fm['related_pairs']})"
    return s


def _recall_rows(er: dict) -> list[dict]:
    rows = []
    split = (er.get("split_evaluation") or {}).get("measures") or {}
    for m, r in (er.get("measures") or {}).items():
        if not r:
            continue
        held = split.get(m) or {}
        rows.append({"measure": m, "description": r.get("description", m), "queries": r["recall"].get("queries"),
                     "k": [(k, r["recall"].get(f"k{k}")) for k in (1, 5, 10)],
                     "held": [(k, (held.get(f"k{k}") or {}).get("mean"), (held.get(f"k{k}") or {}).get("sd")) for k in (1, 5, 10)]})
    return rows


def _weights_rows(w: dict) -> list[str]:
    rates = (w or {}).get("class_error_rates") or {}
    return [f"{f['family']}: {f['given']} of {f['n']}" for f in rates.get("families", [])]


def error_rates_context(comparison: dict | None, metrics: dict) -> dict:
    """Everything section 5B shows; ``present`` False when the case has nothing to calibrate."""
    from carlos_audit.analysis.coverage import interval_warning

    comparison = comparison or {}
    corpus = comparison.get("corpus") or {}
    er = corpus.get("error_rates") or {}
    name = str(corpus.get("name") or "(unnamed)")[:120]
    neighbours = []
    for i, nb in enumerate((comparison.get("target") or {}).get("neighbours") or [], start=1):
        w = nb.get("whitened") or {}
        neighbours.append({"rank": i, "id": str(nb.get("id", ""))[:80], "cosine": sentence(nb.get("false_match"), name),
                           "whitened": sentence(w.get("false_match"), name, "whitened similarity")})
    h2h = []
    for i, h in enumerate(comparison.get("head_to_head") or [], start=1):
        if not isinstance(h, dict):
            continue
        fm = (h.get("behaviour") or {}).get("direction_cosine_false_match")
        w = h.get("weights") or {}
        h2h.append({"index": i, "file_name": str((h.get("lora") or {}).get("file_name") or f"comparison LoRA {i}")[:120],
                    "cosine": sentence(fm, name, "direction cosine"),
                    "comparable": bool((fm or {}).get("comparable", True)),
                    "ci": [sentence((fm or {}).get(k), name, "direction cosine") for k in ("ci_low", "ci_high")],
                    "weights_class": w.get("class"), "weights_reading": str(w.get("reading") or "")[:200],
                    "weights_rates": _weights_rows(w),
                    "weights_reps": ((w.get("class_error_rates") or {}).get("reps"))})
    warning = interval_warning(metrics)
    return {
        "present": bool(er or h2h or warning),
        "corpus_name": name,
        "has_corpus": bool(er),
        "basis": er.get("basis"),
        "rows_used": er.get("rows_used"), "rows_total": er.get("rows_total"),
        "groups": er.get("model_id_groups"),
        "recall": _recall_rows(er),
        "n_splits": (er.get("split_evaluation") or {}).get("n_splits"),
        "neighbours": neighbours,
        "head_to_head": h2h,
        "interval_warning": warning,
    }
