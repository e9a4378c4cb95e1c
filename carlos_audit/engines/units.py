"""Work units of a corpus build, and the one function that runs any of them.

A unit is (LoRA case, arm, batch): one chunk of prompt x seed pairs, generated with one CPU
generator per image, so its bytes do not depend on where, when or in which order it runs. It
writes its images and embeddings atomically and its record last (``CaseStore.write_unit``): a
unit with a record is done and is skipped; a unit whose worker died is run again whole and
overwrites any half-written files with identical bytes. Nothing is duplicated or lost.

A ``finalize`` unit copies the shared base arm into the case folder and runs the existing
profile code (``run_case`` with every unit already done: metrics, manifest), on the same kind
of worker that generated, so the manifest's environment is the generating environment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from carlos_audit.errors import AuditError

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

    @property
    def key(self) -> str:
        where = Path(self.store).name  # the case id, or the shared arm's folder name
        return f"{where}/finalize" if self.kind == "finalize" else f"{where}/{self.arm}/b{self.batch:05d}"


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
    from carlos_audit.hashing import sha256_bytes
    from carlos_audit.run.arms import plan_arms
    from carlos_audit.run.intake import intake
    from carlos_audit.run.load import load_models
    from carlos_audit.run.profile import make_session
    from carlos_audit.run.store import CaseStore

    key = (sha256_bytes(unit.case_text.encode("utf-8")), unit.case_path, unit.allow_partial)
    ctx = CURRENT.get("ctx")
    if ctx is not None and ctx.key == key:
        return ctx
    CURRENT.clear()
    case = parse_case(unit.case_text, Path(unit.case_path))
    paths, inputs, inspection = intake(case)
    sha = next(e["sha256"] for e in inputs if e["role"] == "lora")
    if sha != unit.lora_sha256:
        raise AuditError(f"LoRA {unit.lora_path} changed since the build was planned (sha256 {sha}, planned {unit.lora_sha256})")
    prompts, _ = load_prompts(case.protocol["prompts"], case.base_dir)
    lp, emb, _, determinism = load_models(case, paths, inspection, allow_partial=unit.allow_partial)
    session, _ = make_session(case, CaseStore(unit.store), lp, emb, determinism)
    pairs = enumerate_pairs(prompts, case.protocol["seeds"], case.protocol["batch_size"])
    ctx = _Context(key, session, plan_arms(case, sha, []), {b[0].batch: b for b in batches(pairs)})
    CURRENT["ctx"] = ctx
    return ctx


def run_unit(unit: WorkUnit, threads: int | None = None) -> dict:
    """Run one unit (idempotent). Returns {unit, status, source, cost}."""
    from carlos_audit.run.store import CaseStore

    set_threads(threads)
    if unit.kind == "finalize":
        return finalize_case(unit)
    store = CaseStore(unit.store)
    done = store.unit_done(unit.arm, unit.batch)
    if done is not None:
        return {"unit": unit.key, "status": "already-done", "source": done.get("source"), "cost": done.get("cost")}
    from carlos_audit.run.profile import run_batch

    ctx = _context(unit)
    arm = ctx.plan.arms.get(unit.arm)
    if arm is None or unit.batch not in ctx.batches:
        raise AuditError(f"unit {unit.key}: the case has no arm {unit.arm!r} batch {unit.batch}")
    record = run_batch(replace(ctx.session, store=store), arm, ctx.batches[unit.batch])
    return {"unit": unit.key, "status": "done", "source": record["source"], "cost": record.get("cost")}


def materialize_shared(case_dir: Path, arm: str, shared_dir: Path, shared_id: str, batch_ids) -> int:
    """Copy a shared arm's units (images, embeddings, records) into a case folder, checking every
    file against its recorded sha256. The copied records say ``source: shared``. Returns copies."""
    from carlos_audit.fileio import write_bytes_atomic, write_json_atomic
    from carlos_audit.hashing import sha256_bytes
    from carlos_audit.run.store import CaseStore

    dst, src = CaseStore(case_dir), CaseStore(shared_dir)
    n = 0
    for b in batch_ids:
        if dst.unit_done(arm, b) is not None:
            continue
        rec = src.unit_done(arm, b)
        if rec is None:
            raise AuditError(f"shared arm {shared_id}: batch {b} was not computed (units/{arm}/b{b:05d}.json missing)")
        for e in rec["pairs"]:
            for rel, digest in ((e["image"], e["image_sha256"]), (e["embedding"], e["embedding_sha256"])):
                data = src.path(rel).read_bytes()
                if sha256_bytes(data) != digest:
                    raise AuditError(f"shared arm {shared_id}: {rel} does not match its recorded sha256")
                write_bytes_atomic(dst.path(rel), data)
        write_json_atomic(dst.unit_path(arm, b), dict(rec, source="shared", shared_from=shared_id))
        n += 1
    return n


def finalize_case(unit: WorkUnit) -> dict:
    """Shared arms into the case folder, then metrics + manifest by the existing profile code."""
    from carlos_audit.case.casefile import parse_case
    from carlos_audit.fileio import read_json
    from carlos_audit.hashing import sha256_file
    from carlos_audit.run.profile import run_case

    out = Path(unit.store)
    mf, sha = out / "manifest.json", out / "manifest.json.sha256"
    if mf.is_file() and sha.is_file() and (out / "metrics.json").is_file() \
            and sha.read_text().split()[0] == sha256_file(mf):
        m = read_json(mf)
        return {"unit": unit.key, "status": "already-done", "case_id": unit.case_id, "signature": m["signature"],
                "dim": m["embedder"]["feature_dim"]}
    for arm, shared_dir, shared_id, batch_ids in unit.shared:
        materialize_shared(out, arm, Path(shared_dir), shared_id, batch_ids)
    case = parse_case(unit.case_text, Path(unit.case_path))
    CURRENT.clear()  # run_case reloads the adapter: the cached session is no longer trusted
    try:
        result = run_case(case, out, allow_partial=unit.allow_partial, argv=list(unit.argv), progress=False)
    finally:
        CURRENT.clear()
    m = result["manifest"]
    if m["lora"]["sha256"] != unit.lora_sha256:
        raise AuditError(f"LoRA {unit.lora_path} changed during the build")
    return {"unit": unit.key, "status": "done", "case_id": unit.case_id, "signature": m["signature"],
            "dim": len(result["metrics"]["direction"])}
