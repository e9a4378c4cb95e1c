"""Build a corpus by profiling every LoRA file in a folder under one protocol.

Each LoRA becomes a case folder ``DEST/cases/<id>/`` run from the template case file with only
``[lora] path`` and ``[case] id`` changed; the base arm is computed once for the whole build
(``DEST/cases/_shared/``) and copied into every case folder. The work runs as units on an engine
(engines/: this process, or Ray). Resumable: a finished case is added once; an unfinished one
resumes from its finished units.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from carlos_audit.case.case_toml import dump_case
from carlos_audit.case.casefile import Case, load_case, parse_case
from carlos_audit.errors import AuditError

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
    return parse_case(dump_case(data), template.path)


@dataclass(frozen=True)
class BuildOptions:
    """How a corpus build runs: the corpus name (default: DEST's folder name), progress bars,
    partial LoRA application allowed, the engine ("local": this process; "ray": Ray tasks) with
    its cluster address and GPUs per task, the torch CPU threads of every generating process
    (default: this process's), and ``_unit_fn`` (tests: a unit function standing in for the real one)."""

    name: str | None = None
    progress: bool = True
    allow_partial: bool = False
    engine: str = "local"
    ray_address: str | None = None
    gpus_per_task: float = 0
    threads: int | None = None
    _unit_fn: object = None


def build_corpus(lora_dir: Path, template_path: Path, dest: Path, **options) -> dict:
    """Profile every LoRA of ``lora_dir`` into corpus ``dest`` as work units (engines/): the base
    arm once for the whole build, one unit per (LoRA, batch), then metrics and manifest per LoRA,
    on the engine of ``options`` (the fields of ``BuildOptions``). Rows are added in sorted LoRA
    order; with the same ``threads`` the corpus bytes do not depend on the engine. Writes
    DEST/build.json."""
    from carlos_audit.corpus.store import load_corpus
    from carlos_audit.engines.build_plan import build_record, default_threads, plan_build, run_plan
    from carlos_audit.fileio import write_json_atomic
    from carlos_audit.casefolder.lock import case_lock

    how = BuildOptions(**options)
    lora_dir, dest = Path(lora_dir), Path(dest)
    loras, ids = _lora_files(lora_dir, how.engine)
    template = load_case(template_path)
    with case_lock(dest, what="corpus folder"):  # held from the first read of DEST to build.json
        present = set(load_corpus(dest).ids) if (dest / "corpus.json").is_file() else set()
        skipped = [rid for rid in ids if rid in present]
        todo = [(rid, lora, case_for_lora(template, lora, rid)) for lora, rid in zip(loras, ids) if rid not in present]
        if not todo:
            return {"corpus": str(dest), "added": [], "already_present": skipped, "n": load_corpus(dest).n, "build": None}
        if how.engine == "ray":
            _check_ray(how.ray_address)
        threads = how.threads or default_threads()
        argv = ["carlos-audit", "corpus", "build", str(lora_dir), "--casefile", str(template_path), str(dest)]
        plan = plan_build(dest, todo, allow_partial=how.allow_partial, argv=argv, threads=threads)
        run = run_plan(plan, engine=how.engine, ray_address=how.ray_address, gpus_per_task=how.gpus_per_task,
                       threads=threads, unit_fn=how._unit_fn, progress=how.progress)
        added = _add_rows(dest, todo, run, how.name or dest.name)
        record = build_record(plan, run, engine=how.engine, threads=threads, ray_address=how.ray_address,
                              gpus_per_task=how.gpus_per_task)
        write_json_atomic(dest / "build.json", record)
        return {"corpus": str(dest), "added": added, "already_present": skipped, "n": load_corpus(dest).n, "build": record}


def _lora_files(lora_dir: Path, engine: str) -> tuple[list[Path], list[str]]:
    """The LoRA files of ``lora_dir`` in sorted order and their row ids (refused: an unknown
    engine, no folder, no LoRA, two files with one row id)."""
    from carlos_audit.engines import ENGINES

    if engine not in ENGINES:
        raise AuditError(f"unknown engine {engine!r}; allowed: {', '.join(ENGINES)}")
    if not lora_dir.is_dir():
        raise AuditError(f"LoRA folder {lora_dir} does not exist")
    loras = sorted(p for p in lora_dir.iterdir() if p.is_file() and p.suffix.lower() in LORA_SUFFIXES)
    if not loras:
        raise AuditError(f"no .safetensors files in {lora_dir}")
    ids = [_row_id(p) for p in loras]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise AuditError(f"LoRA file names map to the same row id: {', '.join(sorted(dupes))}")
    return loras, ids


def _check_ray(ray_address: str | None) -> None:
    """Fail before preparing anything when Ray is missing or the cluster refuses us."""
    from carlos_audit.engines.ray_connect import check_cluster, import_ray, resolve_address

    import_ray()
    if resolve_address(ray_address):
        check_cluster(resolve_address(ray_address))


def _add_rows(dest: Path, todo: list, run: dict, name: str) -> list[str]:
    """Each finished case added as a row, in sorted order whatever order the engine finished in;
    the corpus created with the first one; its known error rates stored once."""
    from carlos_audit.corpus.add import add_case
    from carlos_audit.corpus.store import BUILD_CASES_DIR
    from carlos_audit.corpus.write import create_empty

    added = []
    for rid, lora, _ in todo:
        fin = run["finalized"][rid]
        if not (dest / "corpus.json").is_file():
            create_empty(dest, fin["signature"], name, dim=fin["dim"])
        add_case(dest, dest / BUILD_CASES_DIR / rid, row_id=rid, name=lora.name)
        added.append(rid)
    if added:  # the known error rates, stored with the corpus once (cases only read them)
        from carlos_audit.corpus.validate import corpus_validation

        corpus_validation(dest, write=True)
    return added
