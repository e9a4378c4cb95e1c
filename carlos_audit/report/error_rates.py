"""Report context of the "Known error rates" supplement to the corpus chapter (templates/sections/error_rates.html.j2).

Built from what the case folder records alone: comparison.json (``corpus.error_rates``, each
neighbour's ``false_match``, each head-to-head ``direction_cosine_false_match`` and weights
``class_error_rates``) and metrics.json (the number of prompts, for the interval warning).
"""

from __future__ import annotations

from carlos_audit.records import Comparison, Metrics
from carlos_audit.result_sections import (
    ClassErrorRates,
    CorpusRef,
    ErrorRates,
    FalseMatchEnd,
    HeadToHead,
    HeldOutRecall,
    MeanSd,
    Target,
    Weights,
)


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


def sentence(fm: FalseMatchEnd | None, corpus_name: str, kind: str = "similarity") -> str | None:
    """'a similarity of 0.72 or more occurs between 0.4% of unrelated LoRA pairs in the corpus
    "X" (823 of 267,464 pairs) and 41% of pairs of versions of the same model (34 of 82)'."""
    if not fm or fm.similarity is None:
        return None
    s = f"a {kind} of {fm.similarity:.3f} or more occurs between {_share(fm.unrelated_share)} of "
    if (fm.basis if "basis" in fm else "").startswith("all pairs"):
        s += f"all pairs of LoRAs in the corpus “{corpus_name}” ({fm.unrelated_at_least:,} of {fm.unrelated_pairs:,}; " \
             "the corpus records no model ids, so related pairs cannot be told apart and are counted too)"
        return s
    s += f"unrelated LoRA pairs in the corpus “{corpus_name}” ({fm.unrelated_at_least:,} of {fm.unrelated_pairs:,} pairs)"
    if fm.related_pairs:
        s += f" and {_share(fm.related_share)} of pairs of versions of the same model " \
             f"({fm.related_at_least} of {fm.related_pairs})"
    return s


def _recall_rows(er: ErrorRates) -> list[dict]:
    rows = []
    split = (er.split_evaluation.measures if er.split_evaluation is not None else None) or {}
    for m, r in (er.measures or {}).items():
        if not r:
            continue
        held = (split[m] if m in split else None) or HeldOutRecall.from_json({})
        ends = [getattr(held, f"k{k}") or MeanSd.from_json({}) for k in (1, 5, 10)]
        rows.append({"measure": m, "description": r.description if "description" in r else m, "queries": r.recall.queries,
                     "k": [(k, getattr(r.recall, f"k{k}")) for k in (1, 5, 10)],
                     "held": [(k, e.mean, e.sd) for k, e in zip((1, 5, 10), ends)]})
    return rows


def error_rates_context(comparison: Comparison | None, metrics: Metrics) -> dict:
    """Everything the section shows; ``present`` False when the case has nothing to calibrate."""
    from carlos_audit.analysis.coverage import interval_warning

    corpus = (comparison.corpus if comparison is not None else None) or CorpusRef()
    target = (comparison.target if comparison is not None else None) or Target()
    er = corpus.error_rates or ErrorRates.from_json({})
    name = str(corpus.name or "(unnamed)")[:120]
    neighbours = []
    for i, nb in enumerate(target.neighbours or [], start=1):
        w = nb.whitened
        neighbours.append({"rank": i, "id": str(nb.id if "id" in nb else "")[:80], "cosine": sentence(nb.false_match, name),
                           "whitened": sentence(w.false_match if w is not None else None, name, "whitened similarity")})
    h2h = [head_to_head_rates(i, h, name) for i, h in
           enumerate((comparison.head_to_head if comparison is not None else None) or [], start=1)]
    warning = interval_warning({"n_prompts": metrics.n_prompts})
    return {
        "present": bool(er or h2h or warning),
        "corpus_name": name,
        "has_corpus": bool(er),
        "basis": er.basis,
        "rows_used": er.rows_used, "rows_total": er.rows_total,
        "groups": er.model_id_groups,
        "recall": _recall_rows(er),
        "n_splits": er.split_evaluation.n_splits if er.split_evaluation is not None else None,
        "neighbours": neighbours,
        "head_to_head": h2h,
        "interval_warning": warning,
    }


def head_to_head_rates(i: int, h: HeadToHead, name: str) -> dict:
    """The known error rates of one head-to-head comparison's readings."""
    fm = h.behaviour.direction_cosine_false_match if h.behaviour is not None else None
    w = h.weights or Weights()
    rates = w.class_error_rates or ClassErrorRates.from_json({})
    return {"index": i, "file_name": str((h.lora.file_name if h.lora is not None else None) or f"comparison LoRA {i}")[:120],
            "cosine": sentence(fm, name, "direction cosine"),
            "comparable": bool(fm.comparable if fm is not None and "comparable" in fm else True),
            "ci": [sentence(fm.ci_low if fm is not None else None, name, "direction cosine"),
                   sentence(fm.ci_high if fm is not None else None, name, "direction cosine")],
            "weights_class": w.reading_class, "weights_reading": str(w.reading or "")[:200],
            "weights_rates": [f"{f['family']}: {f['given']} of {f['n']}" for f in rates.families or []],
            "weights_reps": rates.reps}
