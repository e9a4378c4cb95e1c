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
class Recall(Section):
    """Recall@k of a measure: the share of queries whose related row is among the k nearest."""
    queries: int | None = None
    k1: float | None = None
    k5: float | None = None
    k10: float | None = None


@dataclass(frozen=True)
class MeanSd(Section):
    mean: float | None = None
    sd: float | None = None


@dataclass(frozen=True)
class HeldOutRecall(Section):
    """Recall@k on held-out splits: mean and sd over the splits."""
    k1: MeanSd | None = part(MeanSd)
    k5: MeanSd | None = part(MeanSd)
    k10: MeanSd | None = part(MeanSd)


@dataclass(frozen=True)
class MeasureRates(Section):
    """One similarity measure's known error rates in a corpus: recall@k, the false-match table."""
    description: str | None = None
    unrelated_pairs: int | None = None
    related_pairs: int | None = None
    recall: Recall | None = part(Recall)
    false_match_table: Any = None
    at_false_match_rate: Any = None


@dataclass(frozen=True)
class SplitEvaluation(Section):
    n_splits: int | None = None
    seed: int | None = None
    protocol: str | None = None
    measures: dict[str, HeldOutRecall] | None = part(HeldOutRecall, "map")
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


# ---- sequential cases: metrics.json ``sequential``, comparison.json ``target.sequential`` ----

@dataclass(frozen=True)
class Estimate(Section):
    """A full-protocol estimate at a look with its interval."""
    estimate: float | None = None
    interval: Interval | None = interval()
    half_width: float | None = None


@dataclass(frozen=True)
class SequentialStop(Section):
    """metrics ``sequential``: the full-protocol estimates and intervals at the look a case stopped at."""
    look: int | None = None
    n_looks: int | None = None
    n_prompts: int | None = None
    n_protocol: int | None = None
    alpha: float | None = None
    spending: str | None = None
    alpha_look: float | None = None
    z: float | None = None
    fpc: float | None = None
    construction: str | None = None
    strength: Estimate | None = part(Estimate)
    consistency: Estimate | None = part(Estimate)
    stopped_early: bool | None = None
    full_protocol: bool | None = None
    normal_approximation: dict | None = None
    decision_reproduced: bool | None = None


@dataclass(frozen=True)
class Band(Section):
    """The corpus percentiles of an interval's ends."""
    band: Interval | None = interval()
    half_width: float | None = None


@dataclass(frozen=True)
class SequentialPlacement(Section):
    """comparison ``target.sequential``: percentile bands and neighbour stability at the stopping look."""
    look: int | None = None
    strength: Estimate | None = part(Estimate)
    consistency: Estimate | None = part(Estimate)
    strength_percentile: Band | None = part(Band)
    consistency_percentile: Band | None = part(Band)
    neighbours: dict | None = None


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
    sequential: SequentialPlacement | None = part(SequentialPlacement)


@dataclass(frozen=True)
class CorpusPoints(Section):
    """Strength and consistency of every corpus row (the excluded row left out), for the figures."""
    strength: list | None = None
    consistency: list | None = None


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
class ClassErrorRates(Section):
    """How often generated LoRA pairs of each family get the weights reading's class (tests/weight_families.py);
    the key ``class`` (a Python keyword) is read as ``r["class"]``."""
    reps: int | None = None
    thresholds: Any = None
    families: list | None = None
    source: str | None = None


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
    class_error_rates: ClassErrorRates | None = part(ClassErrorRates)
    per_module: list | None = None

    @property
    def reading_class(self) -> str | None:
        """The reading's class (the file's key ``class``)."""
        return self.extra.get("class")


@dataclass(frozen=True)
class HeadToHead(Section):
    lora: LoraRef | None = part(LoraRef)
    arm: str | None = None
    behaviour: Behaviour | None = part(Behaviour)
    weights: Weights | None = part(Weights)


# ---- the claimed works: metrics.json (analysis/alignment.py) -----------------------------------

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
class Calibration(Section):
    """The false-alignment rate against the reference corpus (analysis/claimed_calibration.py), or
    why it was refused. ``excluded`` and ``most_aligned`` are corpus rows (their text as the corpus
    has it): lists of dicts."""
    available: bool | None = None
    refused: str | None = None
    corpus: dict | None = None
    alignment: float | None = None
    rate: float | None = None
    n_at_least: int | None = None
    n_compared: int | None = None
    rate_over_alignment_ci: Interval | None = interval()
    corpus_alignment: dict | None = None
    excluded: list | None = None
    most_aligned: list | None = None
    definition: str | None = None


@dataclass(frozen=True)
class Sensitivity(Section):
    """The alignment's dependence on the supplier's choice of works: leave one out, works resampled."""
    n_resamples: int | None = None
    seed: int | None = None
    note: str | None = None
    resampled: dict | None = None
    leave_one_out: list | None = None


@dataclass(frozen=True)
class ClaimedMeasures(Section):
    """metrics ``claimed_works``: the LoRA's effect against the claimed works."""
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
    calibration: Calibration | None = part(Calibration)
    sensitivity: Sensitivity | None = part(Sensitivity)



@dataclass(frozen=True)
class NearCopies(Section):
    """metrics ``near_copies``: the near-copy search (analysis/near_copies.py); its parts plain."""
    definition: dict | None = None
    alpha: float | None = None
    n_works: int | None = None
    n_kept: int | None = None
    warnings: list | None = None
    prompts: list | None = None
    seeds: list | None = None
    samples_per_prompt: int | None = None
    n_images_per_arm: int | None = None
    arms: dict | None = None
    calibration: dict | None = None
    works: list | None = None
    shares: dict | None = None
    corpus: dict | None = None
    weight_indicator: dict | None = None
