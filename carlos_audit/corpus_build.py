"""Build a corpus by profiling every LoRA file in a folder under one protocol.

Each LoRA becomes a case folder ``DEST/cases/<id>/`` run from the template case file with only
``[lora] path`` and ``[case] id`` changed; the base arm is generated once (the base-image cache
serves every later LoRA). Resumable: a finished case is added once; an unfinished one resumes.
"""

from __future__ import annotations

import re
from pathlib import Path

from .casefile import Case, load_case, parse_case
from .errors import AuditError

LORA_SUFFIXES = (".safetensors",)


def _row_id(path: Path) -> str:
    rid = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._-") or "lora"
    return rid[:100]


def case_for_lora(template: Case, lora: Path, row_id: str) -> Case:
    import tomllib

    data = tomllib.loads(template.raw_text)
    data["case"]["id"] = row_id
    data["lora"]["path"] = str(lora.resolve())
    data["lora"].pop("sha256", None)
    # a corpus member is profiled under the protocol only: no corpus comparison, head-to-head,
    # dose-response or other indicators while building
    data.pop("reference", None)
    data.pop("output", None)
    data.pop("comparison", None)
    data["protocol"].pop("scales", None)
    data["indicators"] = {"trigger_dependence": False, "prompt_override": False, "effect_labels": False}
    return parse_case(_dump_toml(data), template.path)


def _dump_toml(data: dict) -> str:
    """A small TOML writer for case files (tables of scalars, lists and inline seed tables)."""
    import json

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    out = []
    for section, table in data.items():
        out.append(f"[{section}]")
        out += [f"{k} = {val(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def build_corpus(lora_dir: Path, template_path: Path, dest: Path, *, name: str | None = None,
                 progress: bool = True, allow_partial: bool = False) -> dict:
    from .corpus import add_case, create_empty, load_corpus
    from .profile import run_case

    lora_dir, dest = Path(lora_dir), Path(dest)
    if not lora_dir.is_dir():
        raise AuditError(f"LoRA folder {lora_dir} does not exist")
    loras = sorted(p for p in lora_dir.iterdir() if p.is_file() and p.suffix.lower() in LORA_SUFFIXES)
    if not loras:
        raise AuditError(f"no .safetensors files in {lora_dir}")
    template = load_case(template_path)
    ids = [_row_id(p) for p in loras]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise AuditError(f"LoRA file names map to the same row id: {', '.join(sorted(dupes))}")
    added, skipped = [], []
    for lora, rid in zip(loras, ids):
        case_dir = dest / "cases" / rid
        if (dest / "corpus.json").is_file() and rid in load_corpus(dest).ids:
            skipped.append(rid)
            continue
        case = case_for_lora(template, lora, rid)
        result = run_case(case, case_dir, progress=progress, allow_partial=allow_partial,
                          argv=["carlos-audit", "corpus", "build", str(lora_dir), "--casefile", str(template_path), str(dest)])
        if not (dest / "corpus.json").is_file():
            create_empty(dest, result["manifest"]["signature"], name or dest.name, dim=len(result["metrics"]["direction"]))
        add_case(dest, case_dir, row_id=rid, name=lora.name)
        added.append(rid)
    return {"corpus": str(dest), "added": added, "already_present": skipped, "n": load_corpus(dest).n}
