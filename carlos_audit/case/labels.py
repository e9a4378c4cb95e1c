"""The effect-label vocabulary and the text signature of a word (CARLoS text retrieval).

The signature of a word over a set of prompts is the mean of encode(p + " " + word) - encode(p):
the run computes it with the embedder and stores it (run/embed.py), the effect labels score the
stored signatures without a model (analysis/indicators.effect_labels), corpus retrieval uses the
same definition (corpus/retrieval.py). The vocabulary is ``case/prompts/vocabulary.json``.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np


def vocabulary(extra: list[str]) -> list[tuple[str, str]]:
    data = json.loads(resources.files("carlos_audit.case").joinpath("prompts/vocabulary.json").read_text("utf-8"))
    words = [(group, w) for group, ws in data.items() for w in ws]
    words += [("case", w) for w in extra if w not in {x for _, x in words}]
    return words


def text_signature(encode, prompts: list[str], word: str, plain: np.ndarray | None = None) -> np.ndarray:
    """The text signature of ``word``: mean over ``prompts`` p of encode(p + " " + word) - encode(p),
    in float64. ``plain``: encode(prompts) already computed. Used by the effect labels and by
    corpus retrieval (corpus/retrieval.py)."""
    with_w = encode([f"{p} {word}" for p in prompts]).astype(np.float64)
    if plain is None:
        plain = encode(prompts).astype(np.float64)
    return (with_w - plain).mean(axis=0)


def label_signatures(encode, retrieval_prompts: list[str], extra: list[str]) -> tuple[list[tuple[str, str]], np.ndarray]:
    """The vocabulary (``extra`` words added) and each word's text signature, one row per word:
    computed with the embedder during the run and stored, so the effect labels need no model."""
    words = vocabulary(extra)
    plain = encode(retrieval_prompts).astype(np.float64)
    return words, np.stack([text_signature(encode, retrieval_prompts, w, plain) for _, w in words])
