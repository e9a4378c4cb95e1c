"""Work units of a corpus build, and the one function that runs any of them.

A unit is (LoRA case, arm, batch): one chunk of prompt x seed pairs, generated with one CPU
generator per image, so its bytes do not depend on where, when or in which order it runs.

A unit writes nothing where it runs (no shared file system): ``run_unit`` returns the unit's
files (PNG bytes, embeddings, the unit record) and the driver writes them into the case folder
(``engines/driver.py``), the record last. A unit with a record is done and is never submitted
again; a unit whose worker died is run again whole. Nothing is duplicated or lost.

Before it generates, a worker checks every input against the sha256 the driver planned
(``engines/inputs.py``). A ``finalize`` unit receives the case folder's records and embeddings
(not the images), runs the existing profile code (``run_case`` with every unit already done:
metrics, manifest) in a node-local scratch copy, on the same kind of worker that generated (so
the manifest's environment is the generating environment), and returns the files it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.run.store import CaseStore

#: The pipeline session of the last unit run in this process, reused by the next unit of the same
#: LoRA case (profile.load_models keeps the pipeline loaded across cases; only the adapter swaps).
CURRENT: dict = {}


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
        device = parse_case(unit.case_text, Path(unit.case_path)).base_model["device"]
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
class _Context:
    key: tuple
    session: object
    plan: object
    batches: dict


def _context(unit: WorkUnit) -> _Context:
    from carlos_audit.case.casefile import parse_case
    from carlos_audit.case.protocol import batches, enumerate_pairs, load_prompts
    from carlos_audit.engines.inputs import check_inputs
    from carlos_audit.hashing import sha256_bytes
    from carlos_audit.run.arms import plan_arms
    from carlos_audit.run.intake import intake
    from carlos_audit.run.load import load_models
    from carlos_audit.run.profile import make_session

    key = (sha256_bytes(unit.case_text.encode("utf-8")), unit.case_path, unit.allow_partial, unit.inputs)
    ctx = CURRENT.get("ctx")
    if ctx is not None and ctx.key == key:
        return ctx
    CURRENT.clear()
    case = parse_case(unit.case_text, Path(unit.case_path))
    paths, inputs, inspection = intake(case)
    lp, emb, _, determinism = load_models(case, paths, inspection, allow_partial=unit.allow_partial)
    check_inputs(unit, inputs, {"base_model": lp.sha256, "embedder": emb.sha256})
    prompts, _ = load_prompts(case.protocol["prompts"], case.base_dir)
    session, _ = make_session(case, CaseStore(unit.store), lp, emb, determinism)
    pairs = enumerate_pairs(prompts, case.protocol["seeds"], case.protocol["batch_size"])
    ctx = _Context(key, session, plan_arms(case, unit.lora_sha256, []), {b[0].batch: b for b in batches(pairs)})
    CURRENT["ctx"] = ctx
    return ctx


class ReturningStore(CaseStore):
    """A CaseStore that keeps a unit's files in memory instead of writing them: the worker side
    of a unit; the driver writes them (``CaseStore.write_unit_files``)."""

    files: list = ()
    record: dict | None = None

    def unit_done(self, arm: str, batch: int) -> None:
        return None  # the driver submits only units without a record

    def write_unit_files(self, arm: str, batch: int, files: list, record: dict) -> dict:
        self.files, self.record = files, record
        return record


def run_unit(unit: WorkUnit, threads: int | None = None, case_files: dict | None = None) -> dict:
    """Run one unit where it lands, writing nothing there but the node's own caches. Returns
    {unit, status, source, cost, node, images, files, record} for an arm unit, and for a finalize
    unit (``case_files``: the case folder's records and embeddings) {unit, status, case_id,
    signature, dim, node, files}. ``files``: [(path relative to ``unit.store``, bytes)]."""
    import time

    from carlos_audit.engines.inputs import node_label
    from carlos_audit.run.profile import run_batch

    before = set_threads(unit_threads(unit, threads))  # restored after the unit: its process's count is kept
    t0 = time.perf_counter()
    try:
        if unit.kind == "finalize":
            result = finalize_case(unit, case_files or {})
        else:
            ctx = _context(unit)
            arm = ctx.plan.arms.get(unit.arm)
            if arm is None or unit.batch not in ctx.batches:
                raise AuditError(f"unit {unit.key}: the case has no arm {unit.arm!r} batch {unit.batch}")
            store = ReturningStore(unit.store)
            record = run_batch(replace(ctx.session, store=store), arm, ctx.batches[unit.batch])
            result = {"unit": unit.key, "status": "done", "source": record["source"], "cost": record.get("cost"),
                      "images": (record.get("cost") or {}).get("images_generated", 0), "files": store.files,
                      "record": record}
    finally:
        set_threads(before)
    return result | {"node": node_label(), "seconds": time.perf_counter() - t0}


def finalize_case(unit: WorkUnit, case_files: dict) -> dict:
    """Metrics + manifest by the existing profile code, in a node-local scratch copy of the case
    folder's records and embeddings; returns the files it added or changed (manifest last)."""
    import shutil
    import tempfile

    from carlos_audit.case.casefile import parse_case
    from carlos_audit.engines.inputs import check_inputs, scratch_root
    from carlos_audit.fileio import write_bytes_atomic
    from carlos_audit.run.profile import run_case

    out = Path(tempfile.mkdtemp(prefix=f"{unit.case_id[:40]}-", dir=scratch_root()))
    try:
        for rel, data in case_files.items():
            write_bytes_atomic(out / rel, data)
        case = parse_case(unit.case_text, Path(unit.case_path))
        CURRENT.clear()  # run_case reloads the adapter: the cached session is no longer trusted
        try:
            result = run_case(case, out, allow_partial=unit.allow_partial, argv=list(unit.argv), progress=False)
        finally:
            CURRENT.clear()
        m = result["manifest"]
        check_inputs(unit, m["inputs"], {"base_model": m["base_model"]["sha256"], "embedder": m["embedder"]["sha256"]})
        written = []
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out).as_posix()
            if p.is_file() and case_files.get(rel) != (data := p.read_bytes()):
                written.append((rel, data))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    last = ("manifest.json", "manifest.json.sha256")
    written.sort(key=lambda f: (f[0] in last, last.index(f[0]) if f[0] in last else 0))
    return {"unit": unit.key, "status": "done", "case_id": unit.case_id, "signature": m["signature"],
            "dim": len(result["metrics"]["direction"]), "files": written}
