"""The typed sections of the result files (records.py): frozen dataclasses, one per object of
our own schema, with the field names of the file's keys (docs/SCHEMAS.md documents each one and
tests/test_records.py checks the docs against these classes).

A section is built from a file's JSON object (``from_json``) or from a plain dict (a record
coerces what it is given); ``to_json`` gives back exactly that JSON: the keys absent in what it
was built from stay absent (``absent``), keys this version does not name are kept as they were
(``extra``: e.g. a model family's own generation parameters). A section also reads like the dict
it came from (``s["key"]``, ``s.get("key")``, ``{**s}``), so code written against the dicts keeps
working; new code reads attributes. Untrusted data from files (a LoRA's self-reported
metadata, a corpus row's text) is never a section: it stays a dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from carlos_audit.errors import AuditError

#: field metadata of a nested section: {"section": cls, "shape": "one" | "list" | "map"}
NESTED = "section"
#: field metadata: left out of to_json when None (a section built in code, not from a file)
OPTIONAL = {"optional": True}
#: the bookkeeping fields every section has (not keys of the file)
BOOKKEEPING = ("extra", "absent")


def part(cls, shape: str = "one", required: bool = False, optional: bool = False):
    """A field holding a nested section (``shape``: one, a list of them, or a name -> section map);
    ``required``: no default (a record's field that every file has); ``optional``: left out of a
    section built in code while None."""
    meta = {NESTED: cls, "shape": shape, **(OPTIONAL if optional else {})}
    return field(metadata=meta) if required else field(default=None, metadata=meta)


def interval():
    """A field holding an Interval ([low, high] in the file; null stays None)."""
    return field(default=None, metadata={"interval": True})


class Interval(list):
    """A two-sided interval [low, high]: the list the file holds (equal to it, written as it), with
    its ends named."""

    @property
    def low(self) -> float | None:
        return self[0]

    @property
    def high(self) -> float | None:
        return self[1]


def plain(value: Any) -> Any:
    """``value`` as plain JSON values: sections -> dicts, tuples -> lists (dicts and lists copied)."""
    if isinstance(value, Section):
        return value.to_json()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def coerce(f, value: Any, where: str) -> Any:
    """The value of field ``f`` as its declared section type (dicts become sections)."""
    cls = f.metadata.get(NESTED)
    if cls is None or value is None:
        return value
    shape = f.metadata["shape"]
    if shape == "one":
        return cls.coerce(value, f"{where}.{f.name}")
    if shape == "list":
        if not isinstance(value, (list, tuple)):
            raise AuditError(f"{where}.{f.name}: not a list")
        return [None if v is None else cls.coerce(v, f"{where}.{f.name}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, Mapping):
        raise AuditError(f"{where}.{f.name}: not an object")
    return {k: None if v is None else cls.coerce(v, f"{where}.{f.name}.{k}") for k, v in value.items()}


@dataclass(frozen=True)
class Section(Mapping):
    """Base of every section: the file's keys as fields (all default None), ``extra`` (keys this
    version does not name) and ``absent`` (the named keys the source lacked; None for a section
    built in code: then an OPTIONAL field that is None is left out)."""

    extra: dict = field(default_factory=dict, kw_only=True, repr=False)
    absent: frozenset | None = field(default=None, kw_only=True, repr=False, compare=False)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.__eq__ = Section.__eq__  # kept by @dataclass: a section equals the dict it came from

    def __eq__(self, other):
        if isinstance(other, Mapping):
            return self.to_json() == plain(other)
        return NotImplemented

    __hash__ = None

    def __post_init__(self):
        where = type(self).__name__
        for f in self.key_fields():
            value = getattr(self, f.name)
            if f.metadata.get(NESTED) is not None and value is not None:
                object.__setattr__(self, f.name, coerce(f, value, where))
            elif f.metadata.get("interval") and isinstance(value, (list, tuple)) and len(value) == 2:
                object.__setattr__(self, f.name, Interval(value))

    @classmethod
    def key_fields(cls) -> list:
        return [f for f in fields(cls) if f.name not in BOOKKEEPING]

    @classmethod
    def coerce(cls, value: Any, where: str | None = None):
        """``value`` as this section: itself when it is one, else built from a dict."""
        return value if isinstance(value, cls) else cls.from_json(value, where)

    @classmethod
    def from_json(cls, data: Any, where: str | None = None):
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise AuditError(f"{where}: not a JSON object")
        names = {f.name for f in cls.key_fields()}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names}, absent=frozenset(names - set(data)))

    def present(self) -> list[str]:
        """The keys this section writes, in field order, then the extra ones."""
        if self.absent is not None:
            named = [f.name for f in self.key_fields() if f.name not in self.absent]
        else:
            named = [f.name for f in self.key_fields()
                     if not (f.metadata.get("optional") and getattr(self, f.name) is None)]
        return named + [k for k in self.extra if k not in named]

    def to_json(self) -> dict:
        return {k: plain(self.extra[k] if k in self.extra else getattr(self, k)) for k in self.present()}

    # the dict view (Mapping): code written against the plain dicts keeps working
    def __getitem__(self, key: str):
        if key in self.extra:
            return self.extra[key]
        if key in self.present():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(self.present())

    def __len__(self) -> int:
        return len(self.present())


# ---- manifest.json and units/generation.json ------------------------------------------------

@dataclass(frozen=True)
class Input(Section):
    """One input file or folder: hashed at intake (``sha256``) and again at the end (custody)."""
    role: str | None = None
    path: str | None = None
    kind: str | None = None
    size: int | None = None
    sha256: str | None = None
    sha256_end: str | None = None
    unchanged: bool | None = None


@dataclass(frozen=True)
class PairArm(Section):
    """One arm of a pair: the prompt sent, the image and embedding files with their sha256."""
    prompt: str | None = None
    image: str | None = None
    image_sha256: str | None = None
    embedding: str | None = None
    embedding_sha256: str | None = None


@dataclass(frozen=True)
class Pair(Section):
    """One (prompt, seed) pair of the protocol and its arms."""
    pair_id: str | None = None
    prompt_id: str | None = None
    category: str | None = None
    subcategory: str | None = None
    seed: int | None = None
    batch: int | None = None
    position: int | None = None
    arms: dict[str, PairArm] | None = part(PairArm, "map")


@dataclass(frozen=True)
class Prompt(Section):
    id: str | None = None
    category: str | None = None
    subcategory: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class Arm(Section):
    """One arm of the arm plan (run/arms.py): which adapter at which scale, triggers or not."""
    adapter: str | None = None
    scale: float | None = None
    with_triggers: bool | None = None
    lora_sha256: str | None = None


@dataclass(frozen=True)
class Protocol(Section):
    """The protocol as run; a model family's own generation parameters beyond these stay in ``extra``."""
    prompts: str | None = None
    prompt_source: dict | None = None
    prompts_sha256: str | None = None
    n_prompts: int | None = None
    seeds: list | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    negative_prompt: str | None = None
    seed_mode: str | None = None
    max_sequence_length: int | None = None
    batch_size: int | None = None
    bootstrap_resamples: int | None = None
    bootstrap_seed: int | None = None
    scales: list | None = None
    arms: dict[str, Arm] | None = part(Arm, "map")
    arm_aliases: dict | None = None
    profiles: dict | None = None


@dataclass(frozen=True)
class BaseModel(Section):
    """The base model as loaded (run/load.base_model_record)."""
    source: str | None = None
    identity: str | None = None
    sha256: str | None = None
    architecture: str | None = None
    path: str | None = None
    dtype: str | None = None
    device: str | None = None
    pipeline: str | None = None
    variant: str | None = None
    config: str | None = None
    config_source: str | None = None
    files: list | None = None
    stored_dtypes: dict | None = None
    watermarker: dict | None = None
    hashing: dict | None = None


@dataclass(frozen=True)
class Embedder(Section):
    model: str | None = None
    pretrained: str | None = None
    identity: str | None = None
    sha256: str | None = None
    feature_dim: int | None = None
    features: str | None = None
    preprocess: str | None = None


@dataclass(frozen=True)
class SkippedModule(Section):
    module: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class LoraLoad(Section):
    """The LoRA load accounting (run/load.py, run/patch.py): modules in the file, applied, skipped."""
    partial: bool | None = None
    applied: int | None = None
    in_file: int | None = None
    wrapped: int | None = None
    by_component: dict | None = None
    skipped: list[SkippedModule] | None = part(SkippedModule, "list")
    unapplied: list | None = None
    application: dict | None = None


@dataclass(frozen=True)
class ValueSummary(Section):
    """The ranks (or alphas) of a LoRA's low-rank modules: distinct values, counts, range; the key
    ``absent`` (modules without one) is read as ``s["absent"]`` (the name is a section's own)."""
    distinct: list | None = None
    counts: dict | None = None
    min: Any = None
    max: Any = None


@dataclass(frozen=True)
class Inspection(Section):
    """The LoRA file's inspection (lora/intake.inspect_lora) with the claimed base-hash check.
    What the file says about itself stays as read: ``metadata`` (a dict of the file's own
    strings), ``trigger_word_hints`` and ``claimed_base_model_hash`` (taken from it)."""
    path: str | None = None
    file_name: str | None = None
    size: int | None = None
    sha256: str | None = None
    format: str | None = None
    layout: str | None = None
    architecture: str | None = None
    architecture_evidence: Any = None
    module_count: int | None = None
    parameter_count: int | None = None
    payload_sha256: str | None = None
    autov2: str | None = None
    rank_summary: ValueSummary | None = part(ValueSummary)
    alpha_summary: ValueSummary | None = part(ValueSummary)
    modules: list | None = None
    families: dict | None = None
    unrecognised_tensors: list | None = None
    weight_norm_total: float | None = None
    metadata: Any = None
    trigger_word_hints: Any = None
    claimed_base_model_hash: Any = None
    base_model_hash_check: str | None = None
    base_model_hash_check_detail: str | None = None


@dataclass(frozen=True)
class Lora(Section):
    """The examined LoRA as loaded and inspected."""
    path: str | None = None
    file_name: str | None = None
    sha256: str | None = None
    scale: float | None = None
    trigger_words: list | None = None
    trigger_policy: str | None = None
    convention: str | None = None
    load: LoraLoad | None = part(LoraLoad)
    inspection: Inspection | None = part(Inspection)


@dataclass(frozen=True)
class ComparisonLora(Section):
    adapter: str | None = None
    path: str | None = None
    sha256: str | None = None
    load: LoraLoad | None = part(LoraLoad)


@dataclass(frozen=True)
class Environment(Section):
    """The software and hardware generated on (run/environment.py); on CUDA the device details
    (run/devices.cuda_details: gpu_capability, driver, cudnn, ...) are kept as read."""
    python: str | None = None
    platform: str | None = None
    machine: str | None = None
    processor: str | None = None
    packages: dict | None = None
    device: str | None = None
    dtype: str | None = None
    torch_threads: int | None = None
    omp_wait_policy: str | None = None
    cuda: Any = None
    gpu: Any = None
    determinism: dict | None = None
    fastpath: Any = None


@dataclass(frozen=True)
class CaseInfo(Section):
    """The case file's ``[case]`` table."""
    id: str | None = None
    title: str | None = None
    examiner: str | None = None
    question: str | None = None
    exhibit: str | None = None


@dataclass(frozen=True)
class Tool(Section):
    name: str | None = None
    version: str | None = None
    git_commit: str | None = None


# ---- the claimed works: manifest.json (run/embed_works.py) ----------------------------------

@dataclass(frozen=True)
class ClaimedWork(Section):
    """One claimed work as pinned and decoded; ``notes`` are the decoder's, ``file_name`` the supplier's."""
    id: str | None = None
    file_name: str | None = None
    path: str | None = None
    sha256: str | None = None
    size: int | None = None
    format: str | None = None
    mode: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    notes: list | None = None
    embedding: str | None = None
    embedding_sha256: str | None = None
    thumbnail: str | None = None
    thumbnail_sha256: str | None = None


@dataclass(frozen=True)
class ClaimedWorks(Section):
    """manifest ``claimed_works``: the ``[claimed_works]`` table as stated and every work."""
    label: str | None = None
    supplier: str | None = None
    source: str | None = None
    selection: str | None = None
    sha256sums: str | None = None
    max_pixels: int | None = None
    nearest: int | None = None
    n: int | None = None
    decoder: str | None = None
    works: list[ClaimedWork] | None = part(ClaimedWork, "list")
