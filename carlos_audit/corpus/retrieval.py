"""CARLoS text retrieval: find corpus LoRAs whose Direction matches a text query.

    signature(q) = mean over retrieval prompts p of  CLIP_txt(p + " " + q) - CLIP_txt(p)
    score(LoRA)  = cos(signature(q), Direction(LoRA))

on raw (unnormalised) text features of the embedder the corpus was profiled with. LoRAs with
strength above ``max_strength`` or consistency below ``min_consistency`` are dropped first.
Defaults: the upstream values 9.8 / 0.041 for a corpus profiled like CARLoS (openai ViT-B/32,
CARLoS indexing prompts). Elsewhere the same *fractions* of the corpus are cut: 9.8 is the
97.2th percentile of strength and 0.041 the 27.6th percentile of consistency in the public
CARLoS database, so the defaults are those percentiles of the corpus at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carlos_audit.errors import AuditError

CARLOS_MAX_STRENGTH = 9.8
CARLOS_MIN_CONSISTENCY = 0.041
STRENGTH_PERCENTILE = 97.2
CONSISTENCY_PERCENTILE = 27.6


def default_filters(corpus) -> dict:
    from carlos_audit.case.protocol import CARLOS_INDEXING_SHA256
    from carlos_audit.models.embedders import HF_IDENTITY_PREFIX

    sig = corpus.signature or {}
    if sig.get("prompts_sha256") == CARLOS_INDEXING_SHA256 and sig.get("embedder") == HF_IDENTITY_PREFIX + "openai/clip-vit-base-patch32":
        return {"max_strength": CARLOS_MAX_STRENGTH, "min_consistency": CARLOS_MIN_CONSISTENCY, "source": "CARLoS upstream thresholds"}
    s = np.asarray(corpus.strength, dtype=float)
    c = np.asarray(corpus.consistency, dtype=float)
    return {"max_strength": float(np.nanpercentile(s, STRENGTH_PERCENTILE)) if np.isfinite(s).any() else None,
            "min_consistency": float(np.nanpercentile(c, CONSISTENCY_PERCENTILE)) if np.isfinite(c).any() else None,
            "source": f"corpus percentiles (strength p{STRENGTH_PERCENTILE}, consistency p{CONSISTENCY_PERCENTILE})"}


def retrieval_prompts(corpus, prompts_spec: str | None):
    from carlos_audit.case.protocol import (
        CARLOS_INDEXING_SHA256,
        load_prompt_set,
        load_prompts,
        prompts_sha256,
    )

    from carlos_audit.corpus.public import public_prompt_sets

    sig = corpus.signature or {}
    sets = public_prompt_sets(corpus)
    if prompts_spec is None and sets and "retrieval" in sets:  # a fetched public corpus carries its retrieval set
        from carlos_audit.case.protocol import prompts_from_triples

        prompts = prompts_from_triples(sets["retrieval"], f"{corpus.path}:retrieval")
        return prompts, {"source": f"{corpus.path} (retrieval set of the fetched wheel)", "n": len(prompts),
                         "sha256": prompts_sha256(prompts)}
    if prompts_spec is None:
        if sig.get("prompts_sha256") == CARLOS_INDEXING_SHA256:
            raise AuditError("this corpus was profiled with the CARLoS indexing prompts; pass --prompts "
                             "builtin:carlos-retrieval (after `carlos-audit corpus fetch carlos-public`) or a "
                             "carlos_prompts.json so its retrieval set is used")
        prompts_spec = "builtin:retrieval"
    if prompts_spec.endswith(".json") and Path(prompts_spec).is_file():
        import json

        if "retrieval" in json.loads(Path(prompts_spec).read_text("utf-8")):
            prompts = load_prompt_set(prompts_spec, "retrieval")
            return prompts, {"source": f"{prompts_spec} (retrieval set)", "n": len(prompts), "sha256": prompts_sha256(prompts)}
    prompts, _ = load_prompts(prompts_spec)
    return prompts, {"source": prompts_spec, "n": len(prompts), "sha256": prompts_sha256(prompts)}


@dataclass(frozen=True)
class RetrievalOptions:
    """A retrieval's settings: how many LoRAs, the strength and consistency filters (default: the
    corpus's, ``default_filters``) and the retrieval prompt set."""

    top_k: int = 10
    max_strength: float | None = None
    min_consistency: float | None = None
    prompts: str | None = None


def retrieve(corpus_path, query: str, text_encoder, options: RetrievalOptions = RetrievalOptions()) -> dict:
    """The corpus LoRAs whose Direction best matches ``query``. ``text_encoder(identity)``: a
    function texts -> raw text features for the embedder the corpus records (the caller loads it:
    run/embed.text_encoder_for; corpus/ loads no model)."""
    from carlos_audit.case.labels import text_signature
    from carlos_audit.corpus.search import nearest
    from carlos_audit.corpus.store import load_corpus

    how = options
    if not query.strip():
        raise AuditError("the query is empty")
    corpus = load_corpus(corpus_path)
    filters = default_filters(corpus)
    if how.max_strength is not None:
        filters["max_strength"], filters["source"] = how.max_strength, "given"
    if how.min_consistency is not None:
        filters["min_consistency"], filters["source"] = how.min_consistency, "given"
    prompt_list, prompt_info = retrieval_prompts(corpus, how.prompts)
    identity = (corpus.signature or {}).get("embedder")
    if not identity:
        raise AuditError(f"corpus {corpus_path} does not record its embedder; text retrieval needs it")
    encode = text_encoder(identity)
    sig = text_signature(encode, [p.text for p in prompt_list], query)
    if corpus.dim != sig.size:
        raise AuditError(f"the text features have {sig.size} dimensions but the corpus directions {corpus.dim}")
    s = np.asarray(corpus.strength, dtype=float)
    c = np.asarray(corpus.consistency, dtype=float)
    keep = np.ones(corpus.n, dtype=bool)
    if filters["max_strength"] is not None:
        keep &= s <= filters["max_strength"]
    if filters["min_consistency"] is not None:
        keep &= np.nan_to_num(c, nan=-np.inf) >= filters["min_consistency"]
    best = nearest(corpus, sig, top_k=how.top_k, keep=keep)[0]  # exact float64 cosine, ties by id
    ids = corpus.ids
    names = corpus.column("name").to_pylist()
    return {
        "query": query, "corpus": str(corpus_path), "embedder": identity, "filters": filters,
        "prompts": prompt_info, "kept": int(keep.sum()), "dropped": int((~keep).sum()),
        "results": [{"id": ids[i], "name": names[i], "score": score, "strength": float(s[i]),
                     "consistency": None if np.isnan(c[i]) else float(c[i])} for i, score in best],
    }
