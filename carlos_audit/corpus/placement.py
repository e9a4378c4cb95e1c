"""Place a profiled case in its reference corpus: signature check, percentiles, neighbours.

From the case's metrics, signature and LoRA hash, the corpus part of ``comparison.json``
(records.Comparison, written by the analysis step):

    {"corpus": {path, name, n, signature, compatible, differing_fields, unverifiable_fields,
                allow_incompatible, excluded_row, corpus_sha256, error_rates},
     "target": {strength_percentile, consistency_percentile, neighbours: [...]},
     "corpus_points": {strength: [...], consistency: [...]}}

The target's own row is left out when the corpus holds the same LoRA file (same sha256).
No torch import: this step only touches stored numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carlos_audit.errors import AuditError


def place_in_corpus(corpus, metrics, *, top_k: int = 10, signature: dict, lora_sha256: str,
                    allow_incompatible: bool = False, head_to_head: list | None = None) -> dict:
    """``corpus``: the opened reference Corpus (or its path); ``metrics``: the case's records.Metrics. Refuses a corpus profiled differently (unless
    ``allow_incompatible``). The corpus's false-match rates are added to the neighbours and, in
    place, to the ``head_to_head`` entries (corpus/validate.calibrate)."""
    from carlos_audit.case.signature import require_compatible
    from carlos_audit.corpus.search import neighbours_for_vector
    from carlos_audit.corpus.store import Corpus, as_corpus
    from carlos_audit.corpus.validate import calibrate

    if not isinstance(corpus, Corpus) and not Path(corpus).exists():
        raise AuditError(f"reference corpus {corpus} does not exist")
    corpus = as_corpus(corpus)
    compat = require_compatible(corpus.signature, signature, allow_incompatible=allow_incompatible)
    own = own_row(corpus, lora_sha256)
    exclude = None if own is None else corpus.ids[own]
    target = neighbours_for_vector(corpus, metrics.direction, metrics.strength, metrics.consistency,
                                   top_k=top_k, exclude_id=exclude)
    keep = np.ones(corpus.n, dtype=bool)
    if exclude is not None:
        keep[corpus.index_of(exclude)] = False
    cons = np.asarray(corpus.consistency, dtype=float)[keep]
    result = {
        "corpus": {
            "path": str(Path(corpus.path).resolve()), "name": corpus.meta.get("name"), "n": corpus.n,
            "signature": corpus.signature, "compatible": not compat["differing"],
            "differing_fields": compat["differing"], "unverifiable_fields": compat["unverifiable"],
            "allow_incompatible": bool(allow_incompatible), "excluded_row": exclude,
            "corpus_sha256": {k: corpus.meta.get(k) for k in ("directions_sha256", "rows_sha256")},
        },
        "target": target,
        "corpus_points": {
            "strength": [float(x) for x in np.asarray(corpus.strength, dtype=float)[keep]],
            "consistency": [None if np.isnan(x) else float(x) for x in cons],
        },
    }
    result["corpus"]["error_rates"] = calibrate(corpus, metrics.direction, target, head_to_head,
                                                comparable=not compat["differing"])
    return result


def own_row(corpus, lora_sha256: str) -> int | None:
    """The corpus row of the same LoRA file (same sha256), left out of its own comparison; None if none."""
    if "lora_sha256" in corpus.rows.column_names:
        shas = corpus.column("lora_sha256").to_pylist()
        hits = [i for i, s in enumerate(shas) if s and s == lora_sha256]
        if hits:
            return hits[0]
    return None


def open_reference_corpus(corpus_path: Path):
    """The case's reference corpus, opened (hashes checked) once for a whole run."""
    from carlos_audit.corpus.store import load_corpus

    if not (Path(corpus_path) / "corpus.json").is_file():
        raise AuditError(f"reference corpus {corpus_path} is not a corpus (no corpus.json)")
    return load_corpus(corpus_path)


def check_corpus_signature(corpus, case_signature: dict, allow_incompatible: bool) -> dict:
    """Refuse before any generation when the corpus (a Corpus, or its path) was profiled differently."""
    from carlos_audit.case.signature import require_compatible
    from carlos_audit.corpus.store import Corpus

    corpus = corpus if isinstance(corpus, Corpus) else open_reference_corpus(corpus)
    return require_compatible(corpus.signature, case_signature, allow_incompatible=allow_incompatible)
