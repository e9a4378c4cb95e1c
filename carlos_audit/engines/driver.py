"""The driver's side of a build, the same for every engine: which units are left, writing what
workers send back, when a case is ready to finalize, and per-node progress.

Only the driver writes DEST: each arm unit's files (images, embeddings, then its record last)
as its result arrives, the shared base arm copied into each case folder, and each finalize
unit's metrics and manifest. A driver killed at any point resumes from what it wrote: units with
a record are not submitted again, a case with a checked manifest is not finalized again.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.casefolder.unit_store import CaseStore

#: What a finalize unit needs of its case folder (the images stay with the driver).
FINALIZE_INPUTS = ("case.toml", "run.json", "units/**/*.json", "embeddings/**/*.npy")
PROGRESS_EVERY_S = 10.0


class NodeStats:
    """Units, images and busy seconds per node, from the results the driver received; one
    progress line per node at most every PROGRESS_EVERY_S seconds (and at the end)."""

    def __init__(self, progress: bool):
        self.progress, self.t0, self.nodes, self.shown = progress, time.perf_counter(), {}, {}

    def add(self, result: dict) -> None:
        n = self.nodes.setdefault(result.get("node", "?"), {"units": 0, "images_generated": 0, "busy_s": 0.0})
        n["units"] += 1
        n["images_generated"] += int(result.get("images") or 0)
        n["busy_s"] += float(result.get("seconds") or 0.0)
        now = time.perf_counter()
        if self.progress and now - self.shown.get(result.get("node"), -1e9) >= PROGRESS_EVERY_S:
            self.shown[result.get("node")] = now
            self.line(result.get("node", "?"))

    def line(self, node: str) -> None:
        n, wall = self.nodes[node], max(time.perf_counter() - self.t0, 1e-9)
        print(f"node {node}: {n['units']} units, {n['images_generated']} images, "
              f"{n['images_generated'] / wall:.2f} images/s", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        if self.progress:
            for node in sorted(self.nodes):
                self.line(node)
        wall = max(time.perf_counter() - self.t0, 1e-9)
        return {k: dict(v, busy_s=round(v["busy_s"], 3), images_per_s=round(v["images_generated"] / wall, 4))
                for k, v in sorted(self.nodes.items())}


class Driver:
    def __init__(self, plan, progress: bool = True):
        self.plan = plan
        self.nodes = NodeStats(progress)
        self.arm_results: dict = {}
        self.fin_results: list = []
        self.waiting = {f.key: set(plan.deps[f.key]) for f in plan.finalize_units}
        self.finalizers = {f.key: f for f in plan.finalize_units}
        self.shared_dirs = {v["dir"] for v in plan.shared.values()}
        self.shared_devices: dict = {}  # shared arm folder -> [{batch, device}] of the units written

    def arm_todo(self) -> list:
        """Arm units without a record in DEST (the others count as already done). First removes
        the temp files of atomic writes a killed driver left behind (``.<name>.<random>.tmp``)."""
        cases = self.plan.dest / "cases"
        for p in cases.rglob(".*.tmp") if cases.is_dir() else ():
            p.unlink(missing_ok=True)
        todo = []
        for u in self.plan.arm_units:
            rec = CaseStore(u.store).unit_done(u.arm, u.batch)
            if rec is None:
                todo.append(u)
            else:
                if u.store in self.shared_dirs:
                    self.shared_devices.setdefault(u.store, []).append({"batch": u.batch, "device": rec.get("device")})
                self.arm_results[u.key] = {"unit": u.key, "status": "already-done", "source": rec.get("source"),
                                           "cost": rec.get("cost")}
                self._unblock(u.key)
        return todo

    def ready(self) -> list:
        """Finalize units whose case has every unit written, not yet handed out."""
        out = [self.finalizers.pop(k) for k, deps in list(self.waiting.items()) if not deps and k in self.finalizers]
        for f in out:
            del self.waiting[f.key]
        return out

    def _unblock(self, key: str) -> None:
        for deps in self.waiting.values():
            deps.discard(key)

    def accept(self, unit, result: dict) -> None:
        """Write what a worker sent back; record the result without its files."""
        from carlos_audit.fileio import write_bytes_atomic

        files = result.pop("files", [])
        store = CaseStore(unit.store)
        if unit.kind == "finalize":
            for rel, data in files:  # manifest.json and its sha256 last
                write_bytes_atomic(store.path(rel), data)
            self.fin_results.append(result)
        else:
            record = result.pop("record")
            if unit.store in self.shared_dirs:  # one device class per shared arm (run/devices.py)
                from carlos_audit.run.devices import check_one_class

                check_one_class(Path(unit.store).name, [record] + self.shared_devices.setdefault(unit.store, []))
                self.shared_devices[unit.store].append({"batch": record.get("batch"), "device": record.get("device")})
            store.write_unit_files(unit.arm, unit.batch, files, record)
            self.arm_results[unit.key] = result
            self._unblock(unit.key)
        self.nodes.add(result)

    def finalize_files(self, unit) -> dict | None:
        """The case folder's files a finalize unit needs (shared arms copied in first); None when
        the case is already finalized (its result is recorded from the manifest)."""
        from carlos_audit.casefolder import CaseFolder

        out = Path(unit.store)
        folder = CaseFolder(out)
        if folder.sealed():
            m = folder.require_finished().manifest
            self.fin_results.append({"unit": unit.key, "status": "already-done", "case_id": unit.case_id,
                                     "signature": m.signature, "dim": m.embedder["feature_dim"]})
            return None
        for arm, shared_dir, shared_id, batch_ids in unit.shared:
            materialize_shared(out, arm, Path(shared_dir), shared_id, batch_ids)
        return {p.relative_to(out).as_posix(): p.read_bytes()
                for pattern in FINALIZE_INPUTS for p in sorted(out.glob(pattern)) if p.is_file()}

    def results(self) -> tuple[list, list, dict]:
        """(arm unit results in plan order, finalize results, per-node stats of this invocation)."""
        missing = [u.key for u in self.plan.arm_units if u.key not in self.arm_results]
        if missing or self.finalizers or self.waiting:
            raise AuditError(f"build incomplete: {len(missing)} unit(s) and {len(self.waiting)} case(s) left")
        return [self.arm_results[u.key] for u in self.plan.arm_units], self.fin_results, self.nodes.summary()


def materialize_shared(case_dir: Path, arm: str, shared_dir: Path, shared_id: str, batch_ids) -> int:
    """Put a shared arm's units (images, embeddings) into a case folder as hard links to the
    shared folder's files, each checked against its recorded sha256 (read once per file while its
    size, mtime, ctime and inode are unchanged: models/filehash), so the bytes are stored once
    per build and the case folder stays self-contained (a copy only where the file system cannot
    link). The records, written per case, say ``source: shared``. Returns the units placed."""
    from carlos_audit.models.filehash import file_sha256

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
                if file_sha256(src.path(rel)) != digest:
                    raise AuditError(f"shared arm {shared_id}: {rel} does not match its recorded sha256")
                link_or_copy(src.path(rel), dst.path(rel))
        dst.write_unit_files(arm, b, [], dict(rec, source="shared", shared_from=shared_id))
        n += 1
    return n


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link to ``src`` (atomically: linked beside it, then renamed), or an
    atomic copy where the file system refuses links (another device, no link support)."""
    import errno
    import os

    from carlos_audit.errors import write_fault
    from carlos_audit.fileio import write_bytes_atomic

    if dst.is_file() and os.path.samefile(src, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            write_bytes_atomic(dst, src.read_bytes())
            return
        raise write_fault(e, dst) or e from None
