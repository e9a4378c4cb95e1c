"""Work units of a corpus build, and the one function that runs any of them.

A unit is (LoRA case, arm, batch): one chunk of prompt x seed pairs, generated with one CPU
generator per image, so its bytes do not depend on where, when or in which order it runs.

A unit writes nothing where it runs (no shared file system): ``run_unit`` returns the unit's
files (PNG bytes, embeddings, the unit record) and the driver writes them into the case folder
(``engines/driver.py``), the record last. A unit with a record is done and is never submitted
again; a unit whose worker died is run again whole. Nothing is duplicated or lost.

Before it generates, a worker checks every input against the sha256 the driver planned
(``engines/inputs.py``). The first unit of each LoRA's main arm also returns the case's run record
(``units/generation.json``: models as loaded, LoRA load accounting, environment) and its stored
text features. A ``finalize`` unit receives the case folder's records and embeddings (not the
images) and runs only the model-free finish step (``pipeline.finish_case``: metrics, manifest,
custody) in a node-local scratch copy; it loads no model and imports no torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.casefolder.unit_store import CaseStore


@dataclass(frozen=True)
class WorkUnit:
    kind: str  # "arm": one arm of one batch; "finalize": metrics + manifest of one case
    case_id: str
    case_text: str  # the LoRA's case file (TOML), parsed in the worker
    case_path: str  # the template case file: base folder of relative paths, the recorded casefile input
    lora_path: str
    lora_sha256: str
    store: str  # folder written: the case folder, or a shared arm folder (cases/_shared/<arm>-<key>)
    arm: str = ""
    batch: int = -1
    record: bool = False  # arm unit: also return the case's run record and text features
    allow_partial: bool = False
    shared: tuple = ()  # finalize: ((arm, shared folder, shared id, (batch, ...)), ...)
    argv: tuple = ()  # finalize: the command recorded in the manifest
    inputs: tuple = ()  # ((role, path, sha256), ...) planned by the driver, checked on the worker

    @property
    def key(self) -> str:
        where = Path(self.store).name  # the case id, or the shared arm's folder name
        return f"{where}/finalize" if self.kind == "finalize" else f"{where}/{self.arm}/b{self.batch:05d}"


def unit_threads(unit: "WorkUnit", threads: int | None) -> int | None:
    """The build's thread count for a unit that computes on the CPU (the count changes CPU results
    in the last bits, so every process of a build uses the same); None on a GPU, whose bits do not
    depend on it: a GPU worker keeps its own."""
    from carlos_audit.case.casefile import parse_case

    if not threads:
        return None
    try:
        device = parse_case(unit.case_text, Path(unit.case_path)).base_model.device
    except AuditError:
        return threads
    return None if device.startswith("cuda") else threads


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch CPU threads (the count changes CPU results in the last bits, so every
    process of a build uses the same); returns the previous count."""
    import torch

    before = torch.get_num_threads()
    if threads and threads != before:
        torch.set_num_threads(int(threads))
    return before


@dataclass
class UnitContext:
    key: tuple
    prep: object  # run/profile.PreparedRun
    plan: object
    batches: dict


class UnitWorker:
    """The state a worker process keeps across units: the loaded run of the last unit's LoRA case
    (reused by the next unit of the same case) and the models it loaded (reused across cases of
    one base model and embedder; only the adapter swaps). One explicit object per worker:
    ``process_worker()`` for the engines' workers (a Ray worker process keeps its pipeline loaded
    across tasks), or one made and passed to ``run_unit`` by a caller."""

    def __init__(self, models=None) -> None:
        from carlos_audit.run.load import process_models

        self.models = models if models is not None else process_models()
        self.context: UnitContext | None = None

    def context_for(self, unit: WorkUnit) -> UnitContext:
        """The loaded run of ``unit``'s LoRA case (the previous unit's when it is the same case)."""
        from carlos_audit.case.casefile import parse_case
        from carlos_audit.case.options import RunOptions
        from carlos_audit.case.protocol import batches
        from carlos_audit.engines.inputs import check_inputs
        from carlos_audit.hashing import sha256_bytes
        from carlos_audit.run.arms import plan_arms
        from carlos_audit.run.profile import prepare_run

        key = (sha256_bytes(unit.case_text.encode("utf-8")), unit.case_path, unit.allow_partial, unit.inputs)
        if self.context is not None and self.context.key == key:
            return self.context
        self.context = None
        case = parse_case(unit.case_text, Path(unit.case_path))
        prep = prepare_run(case, CaseStore(unit.store), RunOptions(allow_partial=unit.allow_partial),
                           prepare_folder=False, models=self.models)
        check_inputs(unit, prep.inputs, {"base_model": prep.session.base_info.sha256,
                                         "embedder": prep.session.embedder.sha256})
        self.context = UnitContext(key, prep, plan_arms(case, unit.lora_sha256, []),
                                   {b[0].batch: b for b in batches(prep.pairs)})
        return self.context


@functools.cache
def process_worker() -> UnitWorker:
    """The one UnitWorker of this process (created on first use): what ``run_unit`` uses when it
    is given none, so that the units a process runs share its loaded pipeline."""
    return UnitWorker()


class ReturningStore(CaseStore):
    """A CaseStore that keeps a unit's files in memory instead of writing them: the worker side
    of a unit; the driver writes them (``CaseStore.write_unit_files``)."""

    files: list = ()
    record: dict | None = None

    def __init__(self, root: Path):
        super().__init__(root)
        self.extra = []  # other files of the case folder: the run record, text features

    def write_file(self, rel: str, data: bytes) -> None:
        self.extra.append((rel, data))

    def unit_done(self, arm: str, batch: int) -> None:
        return None  # the driver submits only units without a record

    def write_unit_files(self, arm: str, batch: int, files: list, record: dict) -> dict:
        self.files, self.record = files, record
        return record


def run_unit(unit: WorkUnit, threads: int | None = None, case_files: dict | None = None,
             worker: UnitWorker | None = None) -> dict:
    """Run one unit where it lands, writing nothing there but the node's own caches (``worker``:
    the state kept across units, ``process_worker()`` when None). Returns
    {unit, status, source, cost, node, images, files, record} for an arm unit, and for a finalize
    unit (``case_files``: the case folder's records and embeddings) {unit, status, case_id,
    signature, dim, node, files}. ``files``: [(path relative to ``unit.store``, bytes)]."""
    import time

    from carlos_audit.engines.inputs import node_label

    t0 = time.perf_counter()
    if unit.kind == "finalize":  # model-free: no torch, so no thread count to set
        result = finalize_case(unit, case_files or {})
    else:
        before = set_threads(unit_threads(unit, threads))  # restored after the unit: a unit never changes its process's count
        try:
            result = run_arm_unit(unit, worker if worker is not None else process_worker())
        finally:
            set_threads(before)
    return result | {"node": node_label(), "seconds": time.perf_counter() - t0}


def run_arm_unit(unit: WorkUnit, worker: UnitWorker) -> dict:
    """One arm of one batch, its files kept in memory; with ``unit.record`` also the case's run
    record and text features (written by the driver before the unit's record)."""
    from carlos_audit.fileio import json_dumps
    from carlos_audit.run.profile import run_batch, run_record

    ctx = worker.context_for(unit)
    arm = ctx.plan.arms.get(unit.arm)
    if arm is None or unit.batch not in ctx.batches:
        raise AuditError(f"unit {unit.key}: the case has no arm {unit.arm!r} batch {unit.batch}")
    store = ReturningStore(unit.store)
    record = run_batch(replace(ctx.prep.session, store=store), arm, ctx.batches[unit.batch])
    files = list(store.files)
    if unit.record:
        # the finalize step generates nothing: every batch of the case counts as skipped there
        stats = {a: {"generated_batches": 0, "cached_batches": 0, "skipped_batches": len(ctx.batches)}
                 for a in ctx.plan.arms}
        run = run_record(replace(ctx.prep, session=replace(ctx.prep.session, store=store)), stats, [])
        files += store.extra + [(run.FILE, json_dumps(run.to_json()).encode("utf-8"))]
    return {"unit": unit.key, "status": "done", "source": record["source"], "cost": record.get("cost"),
            "images": (record.get("cost") or {}).get("images_generated", 0), "files": files, "record": record}


def finalize_case(unit: WorkUnit, case_files: dict) -> dict:
    """The model-free finish step (``pipeline.finish_case``) in a node-local scratch copy of the
    case folder's records and embeddings; returns the files it added or changed (manifest last)."""
    import shutil
    import tempfile

    from carlos_audit.case.casefile import parse_case
    from carlos_audit.engines.inputs import check_inputs, scratch_root
    from carlos_audit.fileio import write_bytes_atomic
    from carlos_audit.casefolder import CaseFolder
    from carlos_audit.pipeline import finish_case

    out = Path(tempfile.mkdtemp(prefix=f"{unit.case_id[:40]}-", dir=scratch_root()))
    try:
        for rel, data in case_files.items():
            write_bytes_atomic(out / rel, data)
        case = parse_case(unit.case_text, Path(unit.case_path))
        folder = CaseFolder(out)
        run = folder.run_record
        check_inputs(unit, run.inputs, {"base_model": run.base_model["sha256"], "embedder": run.embedder["sha256"]})
        result = finish_case(case, out, run, argv=list(unit.argv), units=folder.units)
        written = []
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out).as_posix()
            if p.is_file() and case_files.get(rel) != (data := p.read_bytes()):
                written.append((rel, data))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    last = ("manifest.json", "manifest.json.sha256")
    written.sort(key=lambda f: (f[0] in last, last.index(f[0]) if f[0] in last else 0))
    return {"unit": unit.key, "status": "done", "case_id": unit.case_id, "signature": result.manifest.signature,
            "dim": len(result.metrics.direction), "files": written}
