"""Intake of a case: its input files resolved, refused when they cannot be examined soundly,
hashed; the case folder prepared (a different case is never overwritten without --force)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from carlos_audit.case.casefile import Case
from carlos_audit.paths import expand_path
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json, write_json_atomic, write_text_atomic
from carlos_audit.hashing import sha256_bytes
from carlos_audit.records import REPORT_FILES
from carlos_audit.casefolder.binding import InputBinding, bind
from carlos_audit.casefolder.lock import LOCK_NAME
from carlos_audit.casefolder.unit_store import hash_inputs

CASE_ARTIFACTS = ("case.toml", "run.json", "inputs.json", "manifest.json", "manifest.json.sha256", "metrics.json", "comparison.json",
                  "images", "embeddings", "units", "figures") + REPORT_FILES

# ----------------------------------------------------------------------------- intake


def input_paths(case: Case) -> dict:
    """The one resolver of a case's input files (``run`` and ``check``): every local path the
    case names, by role, resolved, whether it exists or not: ``casefile``, ``lora``,
    ``base_model`` and ``embedder`` (a path that may instead be a hub id or an open_clip tag),
    ``prompts`` (a prompt file), ``comparison_lora_1``... No file is read."""
    paths = {"casefile": case.path, "lora": expand_path(case.lora.path, case.base_dir)}
    src = case.base_model.source
    if not src.startswith("embedded:"):
        paths["base_model"] = expand_path(src, case.base_dir)
    pre = case.embedder.pretrained
    if pre:
        paths["embedder"] = expand_path(pre, case.base_dir)
    pr = case.protocol.prompts
    if not pr.startswith("builtin:"):
        paths["prompts"] = expand_path(pr, case.base_dir)
    for i, c in enumerate(case.comparison.loras, start=1):
        paths[f"comparison_lora_{i}"] = expand_path(c, case.base_dir)
    return paths


def resolve_inputs(case: Case) -> dict:
    """Absolute paths of the case's input files (``input_paths``), checked to exist; a base model
    or embedder that is not a local path (hub id, tag) is left out."""
    paths = input_paths(case)
    lora = paths["lora"]
    if not lora.exists():
        raise AuditError(f"{case.path}: lora.path {lora} does not exist")
    if lora.is_dir():
        raise AuditError(f"{case.path}: lora.path {lora} is a directory, not a LoRA file")
    for role in ("base_model", "embedder"):
        if role in paths and not paths[role].exists():
            del paths[role]
    for i in range(1, len(case.comparison.loras) + 1):
        cp = paths[f"comparison_lora_{i}"]
        if not cp.is_file():
            raise AuditError(f"{case.path}: comparison.loras[{i - 1}] {cp} does not exist or is not a file")
    from carlos_audit.run.embed_works import claimed_inputs

    paths.update(claimed_inputs(case))  # [claimed_works]: pinned, present, decodable
    return paths


def is_lora_role(role: str) -> bool:
    return role == "lora" or role.startswith("comparison_lora_")


@dataclass
class Intake:
    """The case's inputs resolved, refused or hashed: paths by role, the input records (in the
    order of ``paths``), the target LoRA's inspection, each LoRA file as read once
    (``lora.fileformat.LoraFile`` by role: its bytes hashed and parsed, passed down), and the
    prompts parsed from the one read of their file (with its source description)."""

    paths: dict
    inputs: list
    inspection: dict
    loras: dict
    prompts: list
    prompt_source: dict


def intake(case: Case, *, allow_unsafe_pickle: bool = False) -> tuple[dict, list[dict], dict]:
    """``read_inputs`` as (paths, inputs, inspection)."""
    got = read_inputs(case, allow_unsafe_pickle=allow_unsafe_pickle)
    return got.paths, got.inputs, got.inspection


def read_inputs(case: Case, *, allow_unsafe_pickle: bool = False) -> Intake:
    """Every input of the case resolved and hashed once; each LoRA file read once (pickle refused
    unless allowed, safetensors validated) and the target inspected from those bytes; the prompt
    file read once (parsed, and hashed from the same bytes)."""
    from carlos_audit.case.protocol import load_prompts
    from carlos_audit.lora.fileformat import LoraFile
    from carlos_audit.lora.inspection import inspect_lora, refuse_weight_faults

    paths = resolve_inputs(case)
    for role, p in paths.items():
        if not p.exists():
            raise AuditError(f"{case.path}: {role} {p} does not exist")
    loras = {role: LoraFile(p, allow_unsafe_pickle) for role, p in paths.items() if is_lora_role(role)}
    for f in loras.values():
        if not f.is_pickle and f.path.suffix.lower() == ".safetensors":
            f.header()  # validated
    prompts, prompt_source = load_prompts(case.protocol.prompts, case.base_dir)
    known = {r: f.input_record(r) for r, f in loras.items()}
    if "prompts" in paths and prompt_source.get("path") and Path(prompt_source["path"]).resolve() == paths["prompts"].resolve():
        known["prompts"] = {"role": "prompts", "path": str(paths["prompts"]), "kind": "file",
                            "size": paths["prompts"].stat().st_size, "sha256": prompt_source["sha256"]}
    hashed = iter(hash_inputs([{"role": r, "path": str(p)} for r, p in paths.items() if r not in known]))
    inputs = [known[r] if r in known else next(hashed) for r in paths]
    by_role = {e["role"]: e for e in inputs}
    for role, section in (("lora", case.lora), ("base_model", case.base_model), ("embedder", case.embedder)):
        want = section.sha256
        if want and role in by_role and by_role[role]["sha256"] != want.lower():
            raise AuditError(f"{role} {by_role[role]['path']}: sha256 {by_role[role]['sha256']} does not match the expected {want.lower()} in the case file")
    inspection = inspect_lora(loras["lora"], allow_unsafe_pickle=allow_unsafe_pickle)
    for role, f in loras.items():  # weights that are no trained weights: refused before any model is loaded
        if not f.is_pickle and f.path.suffix.lower() == ".safetensors":
            refuse_weight_faults(f, role)
    return Intake(paths, inputs, inspection, loras, prompts, prompt_source)


# ----------------------------------------------------------------------------- case folder


def prepare_case_dir(out: Path, case: Case, force: bool) -> None:
    """Refuse to overwrite a different case (or a folder that is not a case) without --force;
    the same case resumes."""
    casefile_sha = sha256_bytes(case.raw_text.encode("utf-8"))
    run = out / "run.json"
    if out.exists() and not out.is_dir():
        raise AuditError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        same = run.is_file() and read_json(run).get("casefile_sha256") == casefile_sha
        if not same:
            if not force:
                what = "a different case" if run.is_file() else "files that are not a carlos-audit case"
                raise AuditError(f"output folder {out} holds {what}; pass --force to replace it, or choose another --out")
            clear_artifacts(out, CASE_ARTIFACTS)
    out.mkdir(parents=True, exist_ok=True)
    if not run.is_file():
        write_json_atomic(run, {"casefile_sha256": casefile_sha, "case_id": case.id, "started_utc": utc_now(),
                                "started_epoch": _now_epoch()})
        write_text_atomic(out / "case.toml", case.raw_text)


def input_binding(inputs: list[dict], prompts: list) -> InputBinding:
    """What a run reads, as its case folder records it (casefolder/binding.py): every input's
    sha256 from the intake (the case file is bound by run.json) and the prompt set's hash."""
    from carlos_audit.case.protocol import prompts_sha256

    return InputBinding(inputs={e["role"]: e["sha256"] for e in inputs if e["role"] != "casefile"},
                        prompts_sha256=prompts_sha256(prompts))


def bind_run(out: Path, case: Case, now: InputBinding, force: bool) -> None:
    """The case folder ``out`` bound to the inputs ``now`` (recorded by the first attempt); a
    resume whose inputs differ is refused in one line naming the input, or with ``force``
    starts over (what carlos-audit wrote is cleared, the folder prepared afresh)."""
    diffs = bind(out, now)
    if not diffs:
        return
    if not force:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise AuditError(f"refusing to resume {out}: its units were made from other inputs ({diffs[0]}{more}); "
                         "restore them, or pass --force to start the run over")
    clear_artifacts(out, CASE_ARTIFACTS)
    prepare_case_dir(out, case, force=False)
    bind(out, now)


def clear_artifacts(out: Path, artifacts) -> None:
    """Remove what carlos-audit wrote in ``out`` (the names in ``artifacts``), for --force;
    a folder holding anything else is refused untouched."""
    foreign = [p.name for p in out.iterdir() if p.name not in artifacts and p.name != LOCK_NAME]
    if foreign:
        raise AuditError(f"output folder {out} holds files carlos-audit did not write ({', '.join(sorted(foreign)[:5])}); refusing even with --force")
    for name in artifacts:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _now_epoch() -> int:
    """The time recorded in run.json and the manifest: now, or SOURCE_DATE_EPOCH when it is set
    (the reproducible-builds convention: two builds of the same corpus then write the same bytes)."""
    sde = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if sde.isdigit():
        return int(sde)
    return int(time.time())


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_now_epoch()))


