"""The result files of a case folder as typed records: one class and one writer each.

    manifest.json    Manifest     what was run, on what, with which inputs (run/profile.run_case)
    metrics.json     Metrics      the CARLoS representation and the indicators (analysis/case_analysis)
    comparison.json  Comparison   head to head and placement in the reference corpus (analysis/case_analysis)
    units/generation.json  RunRecord  what the generation step loaded and did (run/profile.generate_units)

A record's fields are its file's top-level keys; docs/SCHEMAS.md documents them and
tests/test_records.py checks the docs against these classes. Adding a field is one line here
(give it a default, so that files written before it still read), its value where the record is
built, and its line in docs/SCHEMAS.md. Files are written with fileio.json_dumps (sorted keys),
so the order of the fields never changes bytes.

The sections of our own schema (inputs, pairs and their arms, protocol, models, LoRA load
accounting, intervals, ...) are frozen ``Section`` dataclasses (record_sections.py); a record
coerces plain dicts given for them when it is built (``__post_init__``), so code that builds records
from dicts keeps working, and ``to_json`` gives back exactly the JSON read (the same keys present
or absent). Untrusted data from files (a LoRA's self-reported metadata, corpus rows) stays a dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json, write_json_atomic, write_text_atomic
from carlos_audit.hashing import sha256_file
from carlos_audit.record_sections import (
    Arm,
    BaseModel,
    CaseInfo,
    ClaimedWorks,
    ComparisonLora,
    Embedder,
    Environment,
    Input,
    Inspection,
    Interval,
    Lora,
    LoraLoad,
    Pair,
    PairArm,
    Prompt,
    Protocol,
    Section,
    Tool,
    NESTED,
    coerce,
    part,
    plain,
)
from carlos_audit.result_sections import (
    CI,
    CategoryStats,
    ClaimedMeasures,
    CorpusPoints,
    CorpusRef,
    HeadToHead,
    Indicators,
    NearCopies,
    PairNorm,
    PromptStats,
    SequentialStop,
    Target,
)

#: the sections re-exported here: a reader of records imports them from records.py
__all__ = ["Record", "Manifest", "Metrics", "Comparison", "RunRecord", "Section", "Interval", "Arm", "BaseModel",
           "CaseInfo", "ClaimedWorks", "ComparisonLora", "Embedder", "Environment", "Input", "Inspection", "Lora",
           "LoraLoad", "Pair", "PairArm", "Prompt", "Protocol", "Tool", "CI", "CategoryStats", "ClaimedMeasures",
           "CorpusPoints", "CorpusRef", "HeadToHead", "Indicators", "NearCopies", "PairNorm", "PromptStats", "SequentialStop",
           "Target"]

MANIFEST_SCHEMA = "carlos-audit/manifest/1"
METRICS_SCHEMA = "carlos-audit/metrics/1"
COMPARISON_SCHEMA = "carlos-audit/comparison/1"
RUN_RECORD_SCHEMA = "carlos-audit/run-record/1"

#: the report's files in a case folder (report/ writes them; run/intake clears them on --force)
FILING_PDF = "report.pdf"
ARCHIVE_PDF = "report-archive.pdf"
SIGNED_PDF = "report-archive-signed.pdf"
REPORT_FILES = (FILING_PDF, f"{FILING_PDF}.sha256", ARCHIVE_PDF, f"{ARCHIVE_PDF}.sha256", SIGNED_PDF, f"{SIGNED_PDF}.sha256")

#: field metadata: the key is left out of the file when its value is None
OPTIONAL = {"optional": True}


@dataclass
class Record:
    FILE: ClassVar[str]
    SCHEMA: ClassVar[str]

    def __post_init__(self):
        """Plain dicts given for typed sections become sections. Assigning a field later keeps what
        is assigned (the analysis step fills a Comparison part by part, changing dicts in place);
        ``to_json`` writes either the same way."""
        for f in fields(self):
            if f.metadata.get(NESTED) is not None:
                object.__setattr__(self, f.name, coerce(f, getattr(self, f.name), self.FILE))

    def to_json(self) -> dict:
        """The file's JSON object: sections as plain dicts (plain values are copied)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional"):
                continue
            out[f.name] = plain(value)
        return out

    @classmethod
    def from_json(cls, data: dict, where: str | None = None):
        where = where or cls.FILE
        if not isinstance(data, dict):
            raise AuditError(f"{where}: not a JSON object")
        if data.get("schema", cls.SCHEMA) != cls.SCHEMA:
            raise AuditError(f"{where}: unsupported schema {data.get('schema')!r} (expected {cls.SCHEMA!r})")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise AuditError(f"{where}: unknown field(s) {', '.join(unknown)} (written by a newer carlos-audit?)")
        try:
            return cls(**data)
        except TypeError as e:
            raise AuditError(f"{where}: {e}") from None

    @classmethod
    def read(cls, case_dir: str | Path):
        path = Path(case_dir) / cls.FILE
        if not path.is_file():
            raise AuditError(f"{case_dir} has no {cls.FILE}")
        try:
            data = read_json(path)
        except ValueError as e:
            raise AuditError(f"{path} is not valid JSON: {e}") from None
        return cls.from_json(data, str(path))

    @classmethod
    def read_optional(cls, case_dir: str | Path):
        """The record, or None when the case folder has no such file."""
        return cls.read(case_dir) if (Path(case_dir) / cls.FILE).is_file() else None

    def write(self, case_dir: str | Path) -> Path:
        path = Path(case_dir) / self.FILE
        write_json_atomic(path, self.to_json())
        return path


@dataclass
class Metrics(Record):
    """metrics.json: Direction, Strength, Consistency with their CIs (analysis/metrics.py), then
    the indicators (analysis/indicators.py)."""

    FILE: ClassVar[str] = "metrics.json"
    SCHEMA: ClassVar[str] = METRICS_SCHEMA

    n_pairs: int
    n_prompts: int
    n_seeds: int
    feature_dim: int
    direction: list
    strength: float
    consistency: float | None
    consistency_note: str | None
    ci: CI = part(CI, required=True)
    per_category: dict[str, CategoryStats] = part(CategoryStats, "map", required=True)
    per_prompt: dict[str, PromptStats] = part(PromptStats, "map", required=True)
    per_pair: list[PairNorm] = part(PairNorm, "list", required=True)
    indicators: Indicators = field(default_factory=Indicators, metadata={NESTED: Indicators, "shape": "one"})
    sequential: SequentialStop | None = part(SequentialStop, optional=True)  # analysis/sequential_intervals.py
    claimed_works: ClaimedMeasures | None = part(ClaimedMeasures, optional=True)
    near_copies: NearCopies | None = part(NearCopies, optional=True)  # analysis/near_copies.py
    schema: str = METRICS_SCHEMA


@dataclass
class Comparison(Record):
    """comparison.json: the head-to-head comparisons and the placement in the reference corpus;
    each part is present when the case asked for it."""

    FILE: ClassVar[str] = "comparison.json"
    SCHEMA: ClassVar[str] = COMPARISON_SCHEMA

    head_to_head: list[HeadToHead] | None = part(HeadToHead, "list", optional=True)
    corpus: CorpusRef | None = part(CorpusRef, optional=True)
    target: Target | None = part(Target, optional=True)
    corpus_points: CorpusPoints | None = part(CorpusPoints, optional=True)
    replication: dict | None = field(default=None, metadata=OPTIONAL)
    schema: str = COMPARISON_SCHEMA


@dataclass
class Manifest(Record):
    """manifest.json: the case, the tool, the run, every input with its hashes at start and end,
    the models as loaded, the protocol and arms, every pair with the hashes of its files, the
    hashes of the result files, the signature and the environment."""

    FILE: ClassVar[str] = "manifest.json"
    SCHEMA: ClassVar[str] = MANIFEST_SCHEMA

    case: CaseInfo = part(CaseInfo, required=True)
    tool: Tool = part(Tool, required=True)
    run: dict  # mutated while the run finishes (finished_utc)
    inputs: list[Input] = part(Input, "list", required=True)
    custody_ok: bool
    base_model: BaseModel = part(BaseModel, required=True)
    embedder: Embedder = part(Embedder, required=True)
    lora: Lora = part(Lora, required=True)
    protocol: Protocol = part(Protocol, required=True)
    comparison_loras: list[ComparisonLora] = part(ComparisonLora, "list", required=True)
    text_features: dict | None
    cost: dict
    signature: dict
    prompts: list[Prompt] = part(Prompt, "list", required=True)
    pairs: list[Pair] = part(Pair, "list", required=True)
    results: dict
    environment: Environment = part(Environment, required=True)
    label_signatures: dict | None = field(default=None, metadata=OPTIONAL)
    sequential: dict | None = field(default=None, metadata=OPTIONAL)  # case/sequential_plan.py, looks.py
    claimed_works: ClaimedWorks | None = part(ClaimedWorks, optional=True)
    near_copies: dict | None = field(default=None, metadata=OPTIONAL)  # [near_copies]: run/near_copy_arms.py, its pairs
    schema: str = MANIFEST_SCHEMA

    def write(self, case_dir: str | Path) -> Path:
        """manifest.json and, beside it, its sha256 (sha256sum format) for verify."""
        path = super().write(case_dir)
        write_text_atomic(path.with_name(path.name + ".sha256"), f"{sha256_file(path)}  {path.name}\n")
        return path


@dataclass
class RunRecord(Record):
    """units/generation.json: what the generation step (run/) loaded and did, everything of the
    manifest that needs a model: the inputs as hashed at intake, the base model, the embedder and
    the LoRA load accounting as loaded, the environment generated in, the batches generated, the
    text features and label signatures stored. The model-free finish step (pipeline.finish_case)
    builds the manifest from it and the case folder."""

    FILE: ClassVar[str] = "units/generation.json"
    SCHEMA: ClassVar[str] = RUN_RECORD_SCHEMA

    inputs: list[Input] = part(Input, "list", required=True)
    inspection: Inspection = part(Inspection, required=True)
    lora_path: str
    lora_load: LoraLoad = part(LoraLoad, required=True)
    prompt_source: dict
    generation: dict
    stats: dict
    comparison_loras: list[ComparisonLora] = part(ComparisonLora, "list", required=True)
    base_model: BaseModel = part(BaseModel, required=True)
    embedder: Embedder = part(Embedder, required=True)
    environment: Environment = part(Environment, required=True)
    signature: dict
    text_features: dict | None
    label_signatures: dict | None
    sequential: dict | None = field(default=None, metadata=OPTIONAL)  # the looks run (looks.py)
    claimed_works: ClaimedWorks | None = part(ClaimedWorks, optional=True)  # the claimed works embedded (run/embed_works.py)
    near_copies: dict | None = field(default=None, metadata=OPTIONAL)  # the extraction arms (run/near_copy_arms.py)
    schema: str = RUN_RECORD_SCHEMA
