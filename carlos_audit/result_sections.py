"""The typed sections of metrics.json and comparison.json (records.Metrics, records.Comparison):
the intervals, the indicators, the claimed-works measures, the corpus placement and the
head-to-head comparisons. The machinery (``Section``, coercion, the exact round trip) and the
manifest's sections are in record_sections.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from carlos_audit.record_sections import Interval, Section, interval, part


# ---- metrics.json ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CI(Section):
    """The 95% cluster bootstrap intervals of Strength and Consistency."""
    level: float | None = None
    method: str | None = None
    n_resamples: int | None = None
    seed: int | None = None
    strength: Interval | None = interval()
    consistency: Interval | None = interval()


@dataclass(frozen=True)
class CategoryStats(Section):
    n_pairs: int | None = None
    n_prompts: int | None = None
    strength: float | None = None
    consistency: float | None = None


@dataclass(frozen=True)
class PromptStats(Section):
    strength: float | None = None
    consistency: float | None = None


@dataclass(frozen=True)
class PairNorm(Section):
    pair_id: str | None = None
    prompt_id: str | None = None
    category: str | None = None
    seed: int | None = None
    diff_norm: float | None = None


# ---- metrics.json indicators (analysis/indicators.py) ---------------------------------------

@dataclass(frozen=True)
class DosePoint(Section):
    scale: float | None = None
    strength: float | None = None
    strength_ci: Interval | None = interval()
    consistency: float | None = None
    consistency_ci: Interval | None = interval()


@dataclass(frozen=True)
class DoseResponse(Section):
    points: list[DosePoint] | None = part(DosePoint, "list")
    strength_at_scale_1: float | None = None
    half_strength_scale: float | None = None
    strength_strictly_increasing: bool | None = None
    definition: str | None = None


@dataclass(frozen=True)
class TriggerDependence(Section):
    trigger_words: list | None = None
    ratio: float | None = None
    ratio_ci: Interval | None = interval()
    strength_with: float | None = None
    strength_without: float | None = None
    note: str | None = None
    definition: str | None = None


@dataclass(frozen=True)
class PromptOverride(Section):
    mean: float | None = None
    ci: Interval | None = interval()
    per_pair: list | None = None
    definition: str | None = None


@dataclass(frozen=True)
class Scope(Section):
    per_category_strength: dict | None = None
    concentration: float | None = None
    ci: Interval | None = interval()
    note: str | None = None
    definition: str | None = None


@dataclass(frozen=True)
class EffectLabel(Section):
    label: str | None = None
    group: str | None = None
    score: float | None = None


@dataclass(frozen=True)
class EffectLabels(Section):
    top: list[EffectLabel] | None = part(EffectLabel, "list")
    vocabulary_size: int | None = None
    note: str | None = None
    definition: str | None = None


@dataclass(frozen=True)
class Indicators(Section):
    """The indicators a case enables (each absent otherwise)."""
    dose_response: DoseResponse | None = part(DoseResponse, optional=True)
    trigger_dependence: TriggerDependence | None = part(TriggerDependence, optional=True)
    prompt_override: PromptOverride | None = part(PromptOverride, optional=True)
    scope: Scope | None = part(Scope, optional=True)
    effect_labels: EffectLabels | None = part(EffectLabels, optional=True)


# ---- comparison.json ------------------------------------------------------------------------

@dataclass(frozen=True)
class FalseMatchEnd(Section):
    """How often a similarity this high occurs between unrelated (and related) corpus LoRAs (corpus/validate.py)."""
    measure: str | None = None
    similarity: float | None = None
    basis: str | None = None
    unrelated_at_least: int | None = None
    unrelated_pairs: int | None = None
    unrelated_share: float | None = None
    related_at_least: int | None = None
    related_pairs: int | None = None
    related_share: float | None = None


@dataclass(frozen=True)
class FalseMatch(FalseMatchEnd):
    """A false-match rate with, for a head-to-head cosine, the rates at its interval's ends."""
    comparable: bool | None = None
    ci_low: FalseMatchEnd | None = part(FalseMatchEnd)
    ci_high: FalseMatchEnd | None = part(FalseMatchEnd)


@dataclass(frozen=True)
class MeasureRates(Section):
    """One similarity measure's known error rates in a corpus: recall@k, the false-match table."""
    description: str | None = None
    unrelated_pairs: int | None = None
    related_pairs: int | None = None
    recall: dict | None = None
    false_match_table: Any = None
    at_false_match_rate: Any = None


@dataclass(frozen=True)
class SplitEvaluation(Section):
    n_splits: int | None = None
    seed: int | None = None
    protocol: str | None = None
    measures: dict | None = None
    whitened_minus_cosine: Any = None


@dataclass(frozen=True)
class ErrorRates(Section):
    """comparison ``corpus.error_rates``: what the corpus's validation measured (corpus/validate.corpus_section)."""
    schema: str | None = None
    basis: str | None = None
    rows_used: int | None = None
    rows_total: int | None = None
    model_id_groups: int | None = None
    rows_without_model_id: int | None = None
    files: Any = None
    stored: Any = None
    measures: dict[str, MeasureRates] | None = part(MeasureRates, "map")
    whitening: Any = None
    split_evaluation: SplitEvaluation | None = part(SplitEvaluation)


@dataclass(frozen=True)
class Whitened(Section):
    similarity: float | None = None
    false_match: FalseMatchEnd | None = part(FalseMatchEnd)


@dataclass(frozen=True)
class CorpusRef(Section):
    """The reference corpus a case was placed in; ``error_rates`` (corpus/validate.py) stays a dict."""
    path: str | None = None
    name: str | None = None
    n: int | None = None
    signature: dict | None = None
    compatible: bool | None = None
    differing_fields: list | None = None
    unverifiable_fields: list | None = None
    allow_incompatible: bool | None = None
    excluded_row: Any = None
    corpus_sha256: dict | None = None
    error_rates: ErrorRates | None = part(ErrorRates)


@dataclass(frozen=True)
class Neighbour(Section):
    """A nearest corpus row (its ``name`` is the corpus's text, shown clipped and escaped)."""
    id: str | None = None
    name: str | None = None
    similarity: float | None = None
    strength: float | None = None
    consistency: float | None = None
    false_match: FalseMatchEnd | None = part(FalseMatchEnd)
    whitened: Whitened | None = part(Whitened)


@dataclass(frozen=True)
class Target(Section):
    strength_percentile: float | None = None
    consistency_percentile: float | None = None
    neighbours: list[Neighbour] | None = part(Neighbour, "list")
    sequential: dict | None = None


@dataclass(frozen=True)
class LoraRef(Section):
    path: str | None = None
    file_name: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class PerPairCosine(Section):
    """The cosines between the two LoRAs' changes to each pair: mean, quantiles, pair id -> value."""
    mean: float | None = None
    quantiles: dict | None = None
    values: dict | None = None


@dataclass(frozen=True)
class TargetVsComparison(Section):
    """One measure of the examined LoRA and of the comparison LoRA on the shared base arm."""
    target: float | None = None
    comparison: float | None = None


@dataclass(frozen=True)
class Behaviour(Section):
    """Head to head on a shared base arm (analysis/head_to_head.py)."""
    direction_cosine: float | None = None
    direction_cosine_ci: Interval | None = interval()
    direction_cosine_false_match: FalseMatch | None = part(FalseMatch)
    per_pair_cosine: PerPairCosine | None = part(PerPairCosine)
    per_category_cosine: dict | None = None
    strength: TargetVsComparison | None = part(TargetVsComparison)
    consistency: TargetVsComparison | None = part(TargetVsComparison)
    agree_most: list | None = None
    agree_least: list | None = None
    definition: str | None = None


@dataclass(frozen=True)
class Weights(Section):
    """Weight-space comparison of two LoRA files (lora/weights.py); the key ``class`` (a Python
    keyword) is read as ``w["class"]``."""
    cosine: float | None = None
    norm_ratio: float | None = None
    payload_identical: bool | None = None
    modules_compared: int | None = None
    modules_only_in_a: list | None = None
    modules_only_in_b: list | None = None
    format_a: str | None = None
    format_b: str | None = None
    reading: str | None = None
    class_error_rates: dict | None = None
    per_module: list | None = None


@dataclass(frozen=True)
class HeadToHead(Section):
    lora: LoraRef | None = part(LoraRef)
    arm: str | None = None
    behaviour: Behaviour | None = part(Behaviour)
    weights: Weights | None = part(Weights)


# ---- the claimed works: metrics.json (analysis/claimed.py) -----------------------------------

@dataclass(frozen=True)
class Alignment(Section):
    value: float | None = None
    ci: Interval | None = interval()
    u_norm: float | None = None
    direction_norm: float | None = None


@dataclass(frozen=True)
class Approach(Section):
    """Per pair, is the LoRA image closer to the claimed works than its base image: summary with CIs."""
    n_pairs: int | None = None
    n_prompts: int | None = None
    n_closer: int | None = None
    share_closer: float | None = None
    share_closer_ci: Interval | None = interval()
    mean_change: float | None = None
    mean_change_ci: Interval | None = interval()
    per_category: dict | None = None   # category -> the same measures (plain: n_prompts added)


@dataclass(frozen=True)
class Approaches(Section):
    centroid: Approach | None = part(Approach)
    nearest: Approach | None = part(Approach)


@dataclass(frozen=True)
class NearestPair(Section):
    pair_id: str | None = None
    prompt_id: str | None = None
    seed: int | None = None
    work_lora: float | None = None
    work_base: float | None = None
    base_lora: float | None = None


@dataclass(frozen=True)
class NearestWork(Section):
    work: str | None = None
    pairs: list[NearestPair] | None = part(NearestPair, "list")


@dataclass(frozen=True)
class ClaimedMeasures(Section):
    """metrics ``claimed_works``: the LoRA's effect against the claimed works; ``calibration``
    (analysis/claimed_calibration.py) and ``sensitivity`` stay dicts."""
    definition: dict | None = None
    label: str | None = None
    supplier: str | None = None
    source: str | None = None
    selection: str | None = None
    n_works: int | None = None
    n_pairs: int | None = None
    embedder: str | None = None
    ci: CI | None = part(CI)
    alignment: Alignment | None = part(Alignment)
    approach: Approaches | None = part(Approaches)
    per_pair: list | None = None
    nearest: list[NearestWork] | None = part(NearestWork, "list")
    calibration: dict | None = None
    sensitivity: dict | None = None
