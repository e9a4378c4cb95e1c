"""Case files: one TOML file describes a case completely.

``load_case(path)`` parses and validates it into a frozen ``Case``. Every error names the file,
the key, what is wrong and what is allowed; unknown keys are rejected.

Paths inside a case file (LoRA, base model folder or file, prompt file, corpus) are relative to
the case file's folder; ``${CARLOS_AUDIT_HOME}`` expands to the tool's cache folder (where
``carlos-audit demo`` writes its demo LoRAs). ``[output] dir`` is relative to the current folder
and must stay inside ``reports/``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from carlos_audit.errors import AuditError
from carlos_audit.paths import expand_path
from carlos_audit.case.limits import check_ranges
from carlos_audit.case.sequential_plan import SequentialSpec
from carlos_audit.case.spec import schema_types

CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TRIGGER_POLICIES = ("both", "lora_only", "none")
#: how a LoRA file is applied: each format's reference implementation, or ComfyUI's behaviour (lora/comfyui_rules.py)
CONVENTIONS = ("reference", "comfyui")
DTYPES = ("auto", "float32", "float16", "bfloat16")
EMBEDDER_PREPROCESS = ("pil", "torchvision")
EMBEDDER_DTYPES = ("float32", "float16", "bfloat16")
PAPERS = ("a4", "letter")
JURISDICTIONS = ("us-frcp26", "uk-cpr35", "none")

_STR, _INT, _FLOAT, _BOOL, _STRLIST, _FLOATLIST, _SEEDS = "string", "integer", "number", "boolean", "list of strings", "list of numbers", "seeds"
_TABLE = "table"

# section -> key -> (type, required, default)
SCHEMA: dict[str, dict[str, tuple]] = {
    "case": {
        "id": (_STR, True, None),
        "title": (_STR, True, None),
        "examiner": (_STR, True, None),
        "question": (_STR, True, None),
        "exhibit": (_STR, False, "Exhibit 1"),
    },
    "base_model": {
        "source": (_STR, True, None),
        "sha256": (_STR, False, None),
        "dtype": (_STR, False, "auto"),
        "device": (_STR, False, "auto"),
        "variant": (_STR, False, None),
        "config": (_STR, False, None),
        "family": (_STR, False, None),  # "flux-dev", "flux-schnell", "zimage-turbo", "zimage-base"; default: from the source
        "add_watermarker": (_BOOL, False, False),  # SDXL's invisible watermark (diffusers' default: on when installed)
        "tf32": (_BOOL, False, False),  # TF32 for float32 work on CUDA (torch's cuDNN default: on)
    },
    "embedder": {
        "model": (_STR, True, None),
        "pretrained": (_STR, False, None),
        "sha256": (_STR, False, None),
        "preprocess": (_STR, False, "pil"),  # image preprocessing backend: pil (the reference's) or torchvision
        "dtype": (_STR, False, "float32"),
    },
    "lora": {
        "path": (_STR, True, None),
        "sha256": (_STR, False, None),
        "scale": (_FLOAT, False, 1.0),
        "trigger_words": (_STRLIST, False, []),
        "trigger_policy": (_STR, False, "both"),
        "convention": (_STR, False, "reference"),  # whose rule applies the file: reference | comfyui
    },
    "protocol": {
        "prompts": (_STR, True, None),
        "seeds": (_SEEDS, True, None),
        "steps": (_INT, False, 25),
        "guidance_scale": (_FLOAT, False, 5.0),
        "width": (_INT, False, 512),
        "height": (_INT, False, 512),
        "scheduler": (_STR, False, ""),
        "negative_prompt": (_STR, False, ""),
        "batch_size": (_INT, False, 1),
        "bootstrap_resamples": (_INT, False, 1000),
        "bootstrap_seed": (_INT, False, 0),
        "scales": (_FLOATLIST, False, []),
        "seed_mode": (_STR, False, "per-image"),
        "sequential": (_TABLE, False, None),  # [protocol.sequential]: case/sequential_plan.py
        "max_sequence_length": (_INT, False, None),  # T5 tokens (Flux), Qwen tokens (Z-Image); default per variant
    },
    "output": {
        "dir": (_STR, False, None),
    },
    "reference": {
        "corpus": (_STR, False, None),
        "allow_incompatible": (_BOOL, False, False),
        "top_k": (_INT, False, 10),
        "replicate_id": (_STR, False, None),
    },
    "indicators": {
        "trigger_dependence": (_BOOL, False, True),
        "prompt_override": (_BOOL, False, True),
        "effect_labels": (_BOOL, False, True),
        "labels": (_STRLIST, False, []),
        "top_labels": (_INT, False, 5),
    },
    "comparison": {
        "loras": (_STRLIST, False, []),
    },
    "report": {
        "paper": (_STR, False, "a4"),
        "max_pairs_in_body": (_INT, False, None),
        "filing_image_px": (_INT, False, 256),
        "max_mb": (_FLOAT, False, 35.0),
    },
    "expert": {
        "name": (_STR, False, None),
        "role": (_STR, False, None),
        "instructions": (_STR, False, None),
        "materials_provided": (_STRLIST, False, []),
        "jurisdiction": (_STR, False, "none"),
    },
    "claimed_works": {  # case/claimed_works.py
        "label": (_STR, False, None),
        "supplier": (_STR, False, None),
        "source": (_STR, False, None),
        "folder": (_STR, False, None),
        "sha256sums": (_STR, False, None),
        "files": (_STRLIST, False, []),
        "sha256": (_STRLIST, False, []),
        "max_pixels": (_INT, False, 50_000_000),
        "nearest": (_INT, False, 3),
    },
    "near_copies": {  # case/near_copies.py: the opt-in extraction protocol (analysis/near_copies.py)
        "samples_per_prompt": (_INT, False, None),
        "seed_start": (_INT, False, 0),
        "captions": (_STRLIST, False, []),
        "trigger_words": (_BOOL, False, True),
        "alpha": (_FLOAT, False, 0.01),
    },
}
REQUIRED_SECTIONS = ("case", "base_model", "embedder", "lora", "protocol")

#: one frozen, typed section class per table of SCHEMA (case/spec.py): ``case.protocol.steps``
SECTION_TYPES: dict[str, type] = schema_types(SCHEMA, {"protocol": {"sequential": SequentialSpec}}, __name__)
(CaseSpec, BaseModelSpec, EmbedderSpec, LoraSpec, ProtocolSpec, OutputSpec, ReferenceSpec, IndicatorsSpec,
 ComparisonSpec, ReportSpec, ExpertSpec, ClaimedWorksSpec, NearCopiesSpec) = SECTION_TYPES.values()


@dataclass(frozen=True)
class Case:
    path: Path  # the case file
    case: CaseSpec
    base_model: BaseModelSpec
    embedder: EmbedderSpec
    lora: LoraSpec
    protocol: ProtocolSpec
    output: OutputSpec
    reference: ReferenceSpec
    indicators: IndicatorsSpec
    comparison: ComparisonSpec
    report: ReportSpec = field(default_factory=ReportSpec)
    expert: ExpertSpec = field(default_factory=ExpertSpec)
    claimed_works: ClaimedWorksSpec = field(default_factory=ClaimedWorksSpec)
    near_copies: NearCopiesSpec = field(default_factory=NearCopiesSpec)
    raw_text: str = field(repr=False, default="")

    @property
    def id(self) -> str:
        return self.case.id

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def _type_ok(kind: str, v) -> bool:
    if kind == _STR:
        return isinstance(v, str)
    if kind == _INT:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == _FLOAT:  # finite (no nan, inf), and no integer too big for a float (TOML integers have no bound)
        return math.isfinite(v) if isinstance(v, float) else isinstance(v, int) and not isinstance(v, bool) and abs(v) <= 2 ** 1023
    if kind == _BOOL:
        return isinstance(v, bool)
    if kind == _STRLIST:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if kind == _FLOATLIST:
        return isinstance(v, list) and all(_type_ok(_FLOAT, x) for x in v)
    if kind == _TABLE:
        return isinstance(v, dict)
    if kind == _SEEDS:
        if isinstance(v, list):
            return bool(v) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
        return isinstance(v, dict)
    raise AssertionError(kind)


def parse_case(text: str, path: Path) -> Case:
    where = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AuditError(f"{where}: malformed TOML: {e}") from None
    for section in data:
        if section not in SCHEMA:
            raise AuditError(f"{where}: unknown section [{section}]; allowed: " + ", ".join(f"[{s}]" for s in SCHEMA))
        if not isinstance(data[section], dict):
            raise AuditError(f"{where}: {section} must be a table [{section}]")
    out: dict[str, dict] = {}
    for section in SCHEMA:
        if data.get(section) is None and section in REQUIRED_SECTIONS:
            raise AuditError(f"{where}: missing section [{section}]")
        out[section] = _section_values(section, data.get(section) or {}, where)
    _family_defaults(out, data.get("protocol") or {}, path.parent, where)
    _check_values(out, where)
    return Case(path=path, raw_text=text, **{s: SECTION_TYPES[s].from_dict(v) for s, v in out.items()})


def _section_values(section: str, given: dict, where: str) -> dict:
    keys = SCHEMA[section]
    for k in given:
        if k not in keys:
            raise AuditError(f"{where}: unknown key {section}.{k}; allowed: {', '.join(keys)}")
    vals = {}
    for k, (kind, required, default) in keys.items():
        if k not in given:
            if required:
                raise AuditError(f"{where}: missing required key {section}.{k} ({kind})")
            vals[k] = list(default) if isinstance(default, list) else default
            continue
        v = given[k]
        if not _type_ok(kind, v):
            what = {_SEEDS: "a non-empty list of non-negative integers or {count = N, start = S}", _FLOAT: "a finite number",
                    _FLOATLIST: "a list of finite numbers"}.get(kind, f"a {kind}")
            raise AuditError(f"{where}: {section}.{k} must be {what}, got {type(v).__name__} {v!r}"[:300])
        vals[k] = float(v) if kind == _FLOAT else [float(x) for x in v] if kind == _FLOATLIST else v
    return vals


def parse_report_settings(text: str, where: str) -> tuple[ReportSpec, ExpertSpec]:
    """The [report] and [expert] tables of a case file's text, validated like ``parse_case``
    does, without checking the rest (the report reads them from the case folder's case.toml,
    where the case's relative paths no longer resolve)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AuditError(f"{where}: malformed TOML: {e}") from None
    out = {}
    for section in ("report", "expert"):
        given = data.get(section)
        if given is not None and not isinstance(given, dict):
            raise AuditError(f"{where}: {section} must be a table [{section}]")
        out[section] = _section_values(section, given or {}, where)
    _check_report_values(out, where)
    return ReportSpec.from_dict(out["report"]), ExpertSpec.from_dict(out["expert"])


def _check_report_values(c: dict, where: str) -> None:
    r, e = c["report"], c["expert"]
    if r["paper"] not in PAPERS:
        raise AuditError(f"{where}: report.paper {r['paper']!r}; allowed: {', '.join(PAPERS)}")
    if r["max_pairs_in_body"] is not None and r["max_pairs_in_body"] < 0:
        raise AuditError(f"{where}: report.max_pairs_in_body must be >= 0")
    if r["filing_image_px"] < 32:
        raise AuditError(f"{where}: report.filing_image_px must be >= 32")
    if r["max_mb"] <= 0:
        raise AuditError(f"{where}: report.max_mb must be > 0")
    if e["jurisdiction"] not in JURISDICTIONS:
        raise AuditError(f"{where}: expert.jurisdiction {e['jurisdiction']!r}; allowed: {', '.join(JURISDICTIONS)}")
    given = any(e[k] not in (None, [], "none") for k in e)
    if given and not (e["name"] or "").strip():
        raise AuditError(f"{where}: [expert] needs expert.name (the expert's name as it should appear in the report)")


def _check_values(c: dict, where: str) -> None:
    from carlos_audit.case.protocol import resolve_seeds

    if not CASE_ID_RE.match(c["case"]["id"]):
        raise AuditError(
            f"{where}: case.id {c['case']['id']!r} is not allowed; use letters, digits, '.', '_' or '-' "
            "(first a letter or digit, at most 100 characters)"
        )
    choices = {("lora", "trigger_policy"): TRIGGER_POLICIES, ("lora", "convention"): CONVENTIONS,
               ("base_model", "dtype"): DTYPES, ("embedder", "preprocess"): EMBEDDER_PREPROCESS,
               ("embedder", "dtype"): EMBEDDER_DTYPES}
    for (sec, key), allowed in choices.items():
        if c[sec][key] not in allowed:
            raise AuditError(f"{where}: {sec}.{key} {c[sec][key]!r}; allowed: {', '.join(allowed)}")
    dev = c["base_model"]["device"]
    if not (dev in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", dev)):
        raise AuditError(f"{where}: base_model.device {dev!r}; allowed: auto, cpu, cuda, cuda:N")
    for sec in ("base_model", "embedder", "lora"):
        h = c[sec].get("sha256")
        if h is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", h):
            raise AuditError(f"{where}: {sec}.sha256 must be 64 hex characters")
    p = c["protocol"]
    _check_prompts_spec(p["prompts"], Path(where).parent, where)
    try:
        seeds = resolve_seeds(p["seeds"])
    except AuditError as e:
        raise AuditError(f"{where}: {e}") from None
    if isinstance(p["seeds"], dict) and set(p["seeds"]) - {"count", "start"}:
        raise AuditError(f"{where}: protocol.seeds table allows only count and start")
    if len(set(seeds)) != len(seeds):
        raise AuditError(f"{where}: protocol.seeds has duplicates")
    p["seeds"] = seeds
    for k, lo in (("steps", 1), ("width", 8), ("height", 8), ("batch_size", 1), ("bootstrap_resamples", 100), ("bootstrap_seed", 0)):
        if p[k] < lo:
            raise AuditError(f"{where}: protocol.{k} must be >= {lo}")
    for k in ("width", "height"):
        if p[k] % 8:
            raise AuditError(f"{where}: protocol.{k} must be a multiple of 8")
    _check_seed_mode(p, where)
    if p["sequential"] is not None:
        from carlos_audit.case.sequential_plan import check_table

        p["sequential"] = check_table(p["sequential"], p, where, has_corpus=bool(c["reference"]["corpus"]))
    check_ranges(c["lora"]["scale"], p, seeds, where)
    if len(set(p["scales"])) != len(p["scales"]):
        raise AuditError(f"{where}: protocol.scales has duplicates")
    if c["indicators"]["top_labels"] < 1:
        raise AuditError(f"{where}: indicators.top_labels must be >= 1")
    if c["reference"]["top_k"] < 1:
        raise AuditError(f"{where}: reference.top_k must be >= 1")
    _check_report_values(c, where)
    from carlos_audit.case import claimed_works, near_copies

    claimed_works.check_section(c["claimed_works"], where)
    near_copies.check_section(c, where)  # [near_copies] needs [claimed_works]


def _family_defaults(c: dict, given: dict, base_dir: Path, where: str) -> None:
    """The base model's family variant (``base_model["family"]``, None for Stable Diffusion) and
    its [protocol] defaults for the keys the file leaves out (models/families.py)."""
    from carlos_audit.models.families import FAMILY_VARIANTS, protocol_defaults, variant_of_source
    from carlos_audit.paths import carlos_home

    source = c["base_model"]["source"].replace("${CARLOS_AUDIT_HOME}", str(carlos_home()))
    variant = c["base_model"]["family"] or variant_of_source(source, base_dir)
    if variant not in (None, *FAMILY_VARIANTS):
        raise AuditError(f"{where}: base_model.family {variant!r}; allowed: {', '.join(FAMILY_VARIANTS)}")
    c["base_model"]["family"] = variant
    p = c["protocol"]
    for k, v in protocol_defaults(variant).items():
        if k not in given:
            p[k] = v
    if variant is None:
        if p["max_sequence_length"] is not None:
            raise AuditError(f"{where}: protocol.max_sequence_length (a long text encoder's length) applies to FLUX.1 "
                              "base models only, and to Z-Image; not to Stable Diffusion")
        return
    name = "Z-Image" if variant.startswith("zimage") else "FLUX.1"  # the families with [protocol] fields
    if not 1 <= p["max_sequence_length"] <= 512:
        raise AuditError(f"{where}: protocol.max_sequence_length must be 1..512 ({'Qwen' if name == 'Z-Image' else 'T5'} tokens)")
    if variant == "flux-schnell" and p["guidance_scale"] != 0.0:
        raise AuditError(f"{where}: protocol.guidance_scale must be 0 for FLUX.1-schnell (it has no guidance input)")
    if p["negative_prompt"] and (name == "FLUX.1" or p["guidance_scale"] == 0.0):  # Z-Image: CFG when guidance > 0
        raise AuditError(f"{where}: protocol.negative_prompt is not used by {name} "
                         f"({'no' if name == 'FLUX.1' else 'guidance_scale 0: no'} classifier-free guidance)")
    for k in ("width", "height"):
        if p[k] % 16:
            raise AuditError(f"{where}: protocol.{k} must be a multiple of 16 for {name}")


def _check_seed_mode(p: dict, where: str) -> None:
    from carlos_audit.case.protocol import SEED_MODES

    if p["seed_mode"] not in SEED_MODES:
        raise AuditError(f"{where}: protocol.seed_mode {p['seed_mode']!r}; allowed: {', '.join(SEED_MODES)}")
    if p["seed_mode"] == "carlos-batch":
        seeds, b = p["seeds"], p["batch_size"]
        if seeds != list(range(seeds[0], seeds[0] + len(seeds))) or len(seeds) % b:
            raise AuditError(f"{where}: protocol.seed_mode \"carlos-batch\" needs consecutive seeds whose count is a "
                             f"multiple of batch_size ({b}), e.g. seeds = {{ count = 16, start = 42 }}, batch_size = 4")


def _check_prompts_spec(spec: str, base_dir: Path, where: str) -> None:
    from carlos_audit.case.protocol import BUILTIN_SUITES, FETCHED_SUITES

    if spec.startswith("builtin:"):
        if spec.split(":", 1)[1] not in (*BUILTIN_SUITES, *FETCHED_SUITES):
            raise AuditError(f"{where}: protocol.prompts {spec!r} is not a prompt set; allowed: "
                             + ", ".join(f"builtin:{n}" for n in (*BUILTIN_SUITES, *FETCHED_SUITES))
                             + ", or a .txt/.json/.toml file")
        return
    path = expand_path(spec, base_dir)
    if not path.is_file():
        raise AuditError(f"{where}: protocol.prompts file {path} does not exist")
    if path.suffix.lower() not in (".txt", ".json", ".toml"):
        raise AuditError(f"{where}: protocol.prompts must be builtin:NAME or a .txt/.json/.toml file, got {path.name}")


def load_case(path: str | Path) -> Case:
    path = Path(path)
    if not path.exists():
        raise AuditError(f"case file not found: {path}")
    if not path.is_file():
        raise AuditError(f"case file {path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise AuditError(f"{path}: not UTF-8 text") from None
    return parse_case(text, path.resolve())


def output_dir(case: Case, out: str | None = None, reports_root: Path | None = None) -> Path:
    """Where the case's results go. ``--out`` is the user's own choice and may be anywhere;
    a case id or ``[output] dir`` must stay inside the reports folder (no '..', absolute paths
    or symlinks out)."""
    if out is not None:
        return Path(out).expanduser().resolve()
    root = (reports_root or Path.cwd() / "reports")
    rel = case.output.dir or f"reports/{case.id}"
    rp = Path(rel)
    if rp.is_absolute() or ".." in rp.parts:
        raise AuditError(f"{case.path}: output.dir {rel!r} must be a relative path inside reports/ (no '..', not absolute)")
    if rp.parts[:1] == ("reports",):
        rp = Path(*rp.parts[1:]) if len(rp.parts) > 1 else Path(case.id)
    candidate = root / rp
    root_real = root.resolve()
    real = candidate.resolve()
    if real != root_real and root_real not in real.parents:
        raise AuditError(f"{case.path}: output.dir {rel!r} escapes the reports folder (through a symlink)")
    if real == root_real:
        raise AuditError(f"{case.path}: output.dir must name a folder inside reports/, not reports/ itself")
    return real


# ----------------------------------------------------------------------------- derived case files


def absolute_paths(case: Case) -> dict:
    """The case file's tables with every relative input path made absolute against the case
    file's folder, so that the text means the same case wherever it is stored."""
    data = tomllib.loads(case.raw_text)

    def rebase(table: str, key: str, only_existing: bool = False):
        v = data.get(table, {}).get(key)
        if isinstance(v, str) and "${" not in v and not v.startswith("builtin:"):
            p = expand_path(v, case.base_dir)
            if not only_existing or p.exists():
                data[table][key] = str(p)

    rebase("lora", "path")
    rebase("protocol", "prompts")
    rebase("reference", "corpus")
    rebase("base_model", "source", only_existing=True)  # "hf:...", "embedded:..." are not paths
    rebase("embedder", "pretrained", only_existing=True)
    rebase("claimed_works", "folder")
    rebase("claimed_works", "sha256sums")
    if "claimed_works" in data and data["claimed_works"].get("files"):
        data["claimed_works"]["files"] = [str(expand_path(v, case.base_dir)) for v in data["claimed_works"]["files"]]
    if "comparison" in data:
        data["comparison"]["loras"] = [v if "${" in v else str(expand_path(v, case.base_dir))
                                       for v in data["comparison"].get("loras", [])]
    return data


def derive_case(data: dict, folder: Path) -> Case:
    """A case from tables built by the tool (absolute paths), stored content-addressed in
    ``folder`` (never beside the user's case file; the same tables give the same file)."""
    from carlos_audit.fileio import write_text_atomic
    from carlos_audit.hashing import sha256_bytes

    from carlos_audit.case.case_toml import dump_case

    text = dump_case(data)
    path = Path(folder) / f"{sha256_bytes(text.encode('utf-8'))[:24]}.toml"
    case = parse_case(text, path)
    if not path.is_file():
        write_text_atomic(path, text)
    return case


def reference_corpus(case: Case) -> Path | None:
    """The case's ``[reference] corpus`` folder resolved, or None when it names none."""
    corpus = case.reference.corpus
    return expand_path(corpus, case.base_dir) if corpus else None
