"""How often would an unrelated LoRA look as aligned? The false-alignment rate of the claimed-works
alignment (analysis/alignment.py), measured against the real LoRAs of the case's reference corpus.

    false-alignment rate = (corpus LoRAs k with cos(D_k, u) >= cos(D, u)) / (corpus LoRAs compared)

D_k the corpus LoRAs' directions (directions.npy), u the claimed-works direction of this case
(mean claimed-work features - mean base-arm features), D the examined LoRA's Direction. Left out:
the examined LoRA itself (its file sha256 in ``lora_sha256``, or ``[reference] replicate_id``)
and its versions (rows sharing its ``model_id``). The rate is **refused**, not approximated, when
the corpus was profiled differently (any differing signature field: base model, embedder,
prompts, seeds, ...), since its directions then live in another measurement space.

Sensitivity to the supplier's choice of works: the alignment and the rate with each work left out
(which works drive the result), and over the works resampled with replacement (the same draws
as every bootstrap, indicators.prompt_resamples, over work ids instead of prompt ids).
"""

from __future__ import annotations

import numpy as np

from carlos_audit.analysis.indicators import prompt_resamples
from carlos_audit.analysis.metrics import percentile_ci
from carlos_audit.vectors import cosine

CHUNK_ROWS = 8192
N_TOP = 5


class Rater:
    """The compared rows of a corpus, and the shares of them at least as aligned as a value."""

    def __init__(self, corpus, keep: np.ndarray):
        self.corpus, self.keep = corpus, keep
        self.n = int(keep.sum())

    def alignments(self, u: np.ndarray) -> np.ndarray:
        """cos(D_k, u) of every compared row (float64)."""
        return self._scan(u[None, :], None)[0]

    def rates(self, U: np.ndarray, values) -> list[float | None]:
        """Per row j of U: the share of compared rows with cos(D_k, U_j) >= values[j]."""
        a = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        counts = self._scan(U, a)
        return [None if np.isnan(v) or self.n == 0 else float(c / self.n) for c, v in zip(counts, a)]

    def _scan(self, U: np.ndarray, thresholds):
        U = np.asarray(U, dtype=np.float64)
        un = np.linalg.norm(U, axis=1)
        Un = np.divide(U, un[:, None], out=np.zeros_like(U), where=un[:, None] > 0)
        scores, counts = [], np.zeros(U.shape[0], dtype=np.int64)
        for s in range(0, self.corpus.n, CHUNK_ROWS):
            blk = np.asarray(self.corpus.directions[s:s + CHUNK_ROWS], dtype=np.float64)[self.keep[s:s + CHUNK_ROWS]]
            bn = np.linalg.norm(blk, axis=1)
            cosines = (blk @ Un.T) / np.where(bn > 0, bn, 1.0)[:, None]
            cosines[bn == 0] = np.nan
            if thresholds is None:
                scores.append(cosines.T)
            else:
                counts += (cosines >= thresholds[None, :]).sum(axis=0)
        if thresholds is None:
            return np.concatenate(scores, axis=1) if scores else np.zeros((U.shape[0], 0))
        return counts


def exclusions(corpus, manifest, replicate_id: str | None) -> tuple[np.ndarray, list[dict]]:
    """The rows compared (mask) and those left out: the examined LoRA and its versions."""
    keep = np.ones(corpus.n, dtype=bool)
    cols = corpus.rows.column_names
    own: dict[int, str] = {}
    if "lora_sha256" in cols:
        for i, s in enumerate(corpus.column("lora_sha256").to_pylist()):
            if s and s == manifest.lora["sha256"]:
                own[i] = "the examined LoRA (same file sha256)"
    if replicate_id:
        found = corpus.lookup([replicate_id])
        for i in found.values():
            own.setdefault(i, "the examined LoRA ([reference] replicate_id)")
    model_ids = corpus.column("model_id").to_pylist() if "model_id" in cols else [None] * corpus.n
    families = {model_ids[i] for i in own if model_ids[i] is not None}
    why = dict(own)
    for i, m in enumerate(model_ids):
        if m is not None and m in families and i not in why:
            why[i] = f"a version of the examined LoRA (same model_id {m})"
    out = []
    for i in sorted(why):
        keep[i] = False
        out.append({"id": corpus.ids[i], "name": corpus.row(i, ["name"])["name"], "why": why[i]})
    return keep, out


def open_rater(corpus, manifest, replicate_id: str | None = None) -> tuple[Rater | None, dict]:
    """(Rater, the record's corpus part) or (None, the refusal): no corpus, or one profiled
    differently, or of another feature dimension. ``corpus``: the opened Corpus, its path or None."""
    from carlos_audit.case.signature import check_compatible, unverifiable_fields
    from carlos_audit.corpus.store import as_corpus

    if corpus is None:
        return None, {"available": False, "refused": "the case names no reference corpus ([reference] corpus), "
                                                     "so no false-alignment rate can be measured"}
    corpus = as_corpus(corpus)
    # no path: metrics.json is copied into a kit byte for byte (comparison.json names the corpus's path)
    head = {"corpus": {"name": corpus.meta.get("name"), "n": corpus.n,
                       "corpus_sha256": {k: corpus.meta.get(k) for k in ("directions_sha256", "rows_sha256")}}}
    differing = check_compatible(corpus.signature, manifest.signature)
    if differing:
        return None, {**head, "available": False, "differing_fields": differing,
                      "refused": "the corpus was profiled differently from this case (" + ", ".join(differing)
                                 + "): its directions are not measured in this case's space, so no false-alignment "
                                   "rate is given (it is not approximated)"}
    if corpus.dim != _dim(manifest):
        return None, {**head, "available": False,
                      "refused": f"the corpus's directions have {corpus.dim} dimensions, the case's features {_dim(manifest)}"}
    keep, excluded = exclusions(corpus, manifest, replicate_id)
    head["corpus"]["unverifiable_fields"] = unverifiable_fields(corpus.signature, manifest.signature)
    return Rater(corpus, keep), {**head, "available": True, "excluded": excluded, "n_compared": int(keep.sum())}


def _dim(manifest) -> int:
    return int(manifest.embedder.get("feature_dim") or 0)


def calibration(rater: Rater | None, head: dict, u: np.ndarray, align: dict) -> dict:
    """metrics.json ``claimed_works.calibration``."""
    if rater is None:
        return head
    scores = rater.alignments(u)
    valid = scores[~np.isnan(scores)]
    a = align["value"]
    lo, hi = align["ci"] or (None, None)
    rate, at_ci_hi, at_ci_lo = rater.rates(np.stack([u, u, u]), [a, hi, lo])
    order = np.argsort(-np.nan_to_num(scores, nan=-9.0), kind="stable")[:N_TOP]
    kept = np.flatnonzero(rater.keep)
    top = [{"id": rater.corpus.ids[kept[i]], "name": rater.corpus.row(kept[i], ["name"])["name"],
            "alignment": float(scores[i])} for i in order if not np.isnan(scores[i])]
    q = {f"p{p:g}": float(np.percentile(valid, p)) if valid.size else None for p in (50, 90, 99)}
    return {**head, "alignment": a, "rate": rate,
            "n_at_least": None if rate is None else int(round(rate * rater.n)),
            "rate_over_alignment_ci": None if lo is None else [at_ci_hi, at_ci_lo],
            "corpus_alignment": {**q, "max": float(valid.max()) if valid.size else None}, "most_aligned": top,
            "definition": "share of the compared corpus LoRAs whose direction is at least as aligned with u "
                          "(this case's claimed-works direction) as the examined LoRA's Direction"}


def sensitivity(works: np.ndarray, base: np.ndarray, lora: np.ndarray, work_ids: list[str], rater: Rater | None,
                n_resamples: int, seed: int) -> dict:
    """Alignment (and false-alignment rate) with each work left out, and over the works resampled."""
    d = (lora - base).mean(axis=0)
    b_mean, m = base.mean(axis=0), works.shape[0]
    full = cosine(d, works.mean(axis=0) - b_mean)
    out: dict = {"n_resamples": n_resamples, "seed": seed, "leave_one_out": [], "note": None}
    if m >= 2:
        total = works.sum(axis=0)
        U = np.stack([(total - works[j]) / (m - 1) - b_mean for j in range(m)])
        a = [cosine(d, x) for x in U]
        rates = rater.rates(U, a) if rater is not None else [None] * m
        rows = [{"work": w, "alignment": aj, "influence": None if aj is None or full is None else full - aj, "rate": r}
                for w, aj, r in zip(work_ids, a, rates)]
        out["leave_one_out"] = sorted(rows, key=lambda r: (-(r["influence"] or 0.0), r["work"]))
    else:
        out["note"] = "one claimed work: it cannot be left out or resampled"
        return out
    boots = prompt_resamples(work_ids, n_resamples, seed)
    U = np.stack([works[b].mean(axis=0) - b_mean for b in boots])
    a = [cosine(d, x) for x in U]
    out["resampled"] = {"alignment_ci": percentile_ci(a),
                        "rate_ci": percentile_ci(rater.rates(U, a)) if rater is not None else None}
    return out
