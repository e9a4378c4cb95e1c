"""Replication of a published profile: when the case's LoRA is a row of its reference corpus (the
same LoRA file sha256, or ``[reference] replicate_id`` naming a row, e.g. the Civitai version id
of a public CARLoS LoRA whose file the examiner obtained), the published strength, consistency
and direction are set against the measured ones and the case's 95% intervals.

- strength, consistency: is the published value inside the case's 95% cluster-bootstrap interval
  (``metrics.json`` ``ci``)?
- direction: the cosine between the measured and the published direction, with its 95% interval
  over the same prompt resamples; the published direction is *within* the case's 95% direction
  cone when that cosine is at least the 2.5th percentile of the cosines between the resampled
  and the measured direction.

The ``replication`` part of comparison.json (analysis/case_analysis); the report draws it as a table
(``templates/sections/replication.html.j2``).
"""

from __future__ import annotations

import numpy as np

from carlos_audit.errors import AuditError


def find_row(corpus, lora_sha256: str, replicate_id: str | None) -> tuple[int, str] | None:
    """(row index, how it was matched) of the case's LoRA in the corpus, or None."""
    if replicate_id:
        try:
            return corpus.index_of(replicate_id), "replicate_id"
        except AuditError:
            raise AuditError(f"reference.replicate_id {replicate_id!r} is not a row of corpus {corpus.path}") from None
    if "lora_sha256" in corpus.rows.column_names:
        for i, s in enumerate(corpus.column("lora_sha256").to_pylist()):
            if s and s == lora_sha256:
                return i, "lora_sha256"
    return None


def check_replicate_id(corpus, replicate_id: str | None) -> None:
    """Refuse before any generation a replicate_id that names no row of the corpus (a Corpus or its path)."""
    if replicate_id:
        from carlos_audit.corpus.store import as_corpus

        find_row(as_corpus(corpus), "", replicate_id)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """vectors.cosine, with nan (left out by nanpercentile) where it is undefined (a zero vector)."""
    from carlos_audit.vectors import cosine

    c = cosine(a, b)
    return float("nan") if c is None else c


def replication_table(d: np.ndarray, prompt_ids: list[str], metrics: dict, published: dict,
                      n_resamples: int, seed: int) -> dict:
    """Published vs measured, from the case's per-pair diffs ``d`` (pairs x dim)."""
    from carlos_audit.analysis.indicators import prompt_resamples
    from carlos_audit.analysis.metrics import percentile_ci
    from carlos_audit.analysis.metrics import direction

    measured_dir = np.asarray(metrics["direction"], dtype=np.float64)
    pub_dir = np.asarray(published["direction"], dtype=np.float64)
    boots = prompt_resamples(prompt_ids, n_resamples, seed)
    to_pub = [_cos(direction(d[b]), pub_dir) for b in boots]
    to_self = np.array([_cos(direction(d[b]), measured_dir) for b in boots])
    cos_pub = _cos(measured_dir, pub_dir)
    cone = float(np.nanpercentile(to_self, 2.5))
    rows = []
    for key in ("strength", "consistency"):
        ci = (metrics.get("ci") or {}).get(key)
        pub, meas = published.get(key), metrics.get(key)
        within = None if ci is None or pub is None else bool(ci[0] <= pub <= ci[1])
        rows.append({"quantity": key, "published": pub, "measured": meas, "ci95": ci, "within": within})
    rows.append({"quantity": "direction cosine", "published": 1.0, "measured": cos_pub,
                 "ci95": percentile_ci(to_pub), "within": bool(cos_pub >= cone), "cone_cosine_p2_5": cone})
    return {"rows": rows, "n_resamples": n_resamples, "seed": seed}


def replication(store, manifest, metrics, corpus, replicate_id: str | None) -> dict | None:
    """comparison.json ``replication`` when the case's LoRA is a row of its corpus (the opened
    Corpus, or its path; None otherwise), from the stored features (``store``), the case's
    records.Manifest and records.Metrics."""
    from carlos_audit.analysis.metrics import diffs
    from carlos_audit.corpus.store import as_corpus

    corpus = as_corpus(corpus)
    hit = find_row(corpus, manifest.lora["sha256"], replicate_id)
    if hit is None:
        return None
    i, how = hit
    row = corpus.row(i, ["name", "strength", "consistency"])
    cons = row["consistency"]
    published = {"strength": float(row["strength"]), "direction": np.asarray(corpus.directions[i], dtype=np.float64),
                 "consistency": None if cons is None or np.isnan(cons) else float(cons)}
    ids = [r["pair_id"] for r in manifest.pairs]
    b, lo = manifest.protocol["profiles"]["main"]
    d = diffs(store.features(lo, ids), store.features(b, ids))
    p = manifest.protocol
    table = replication_table(d, [r["prompt_id"] for r in manifest.pairs], metrics.to_json(), published,
                              p["bootstrap_resamples"], p["bootstrap_seed"])
    return {"row_id": corpus.ids[i], "name": row["name"], "matched_by": how, **table}


def replication_context(comparison: dict | None) -> dict | None:
    """What templates/sections/replication.html.j2 shows (None: no section)."""
    rep = (comparison or {}).get("replication")
    if not rep:
        return None
    return {"row_id": rep["row_id"], "name": rep.get("name"), "matched_by": rep["matched_by"],
            "n_resamples": rep["n_resamples"], "rows": rep["rows"]}
