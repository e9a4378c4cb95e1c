"""``CaseFolder(root)``: the door to a case folder, and the one answer to "is this a finished
case folder?".

Every reader of a case folder's result files (verify, export, reproduce, corpus add, the build
driver, the claimed-works checks, the pipeline and the CLI) goes through it: each record
(``manifest.json``, ``metrics.json``, ``comparison.json``, ``units/generation.json``) is read and
validated once, when first asked for, and kept; each unit record and feature file is read once
through its unit store (``units``: a ``CaseStore``); ``digest(name)`` hashes a file once while
its size, mtime and inode are unchanged. The record classes are those of ``records.py``.

A case folder is *finished* when it has ``manifest.json`` and ``metrics.json`` and both read as
their records (every required field present, the schema known); ``require_finished`` refuses
any other folder in one line naming what it lacks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from carlos_audit.casefolder.unit_store import CaseStore
from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_bytes, sha256_file
from carlos_audit.records import Comparison, Manifest, Metrics, RunRecord

#: the records a finished case folder holds (comparison.json is there when the case asked for it)
FINISHED = (Manifest, Metrics)
#: the record files: read whole, once (their bytes kept for their digest, a byte copy, an attachment)
RECORD_FILES = tuple(r.FILE for r in (Manifest, Metrics, Comparison, RunRecord))
#: the case file as run, copied into the case folder
CASE_TOML = "case.toml"
MANIFEST_SHA256 = Manifest.FILE + ".sha256"


class CaseFolder:
    """One case folder on disk; records, digests and units read once and kept on this object."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.units = CaseStore(self.root)
        self._records: dict[type, object] = {}
        self._digests: dict[str, tuple[tuple, str]] = {}
        self._raw: dict[str, tuple[tuple, bytes]] = {}
        self._case = None

    def __repr__(self) -> str:
        return f"CaseFolder({str(self.root)!r})"

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    # records -----------------------------------------------------------
    def record(self, cls):
        """The record of class ``cls`` (read and validated on first use; AuditError when absent)."""
        if cls not in self._records:
            if not self.has(cls.FILE):
                raise AuditError(f"{self.root} has no {cls.FILE}")
            path = self.root / cls.FILE
            try:
                data = json.loads(self.raw(cls.FILE).decode("utf-8"))
            except ValueError as e:
                raise AuditError(f"{path} is not valid JSON: {e}") from None
            self._records[cls] = cls.from_json(data, str(path))
        return self._records[cls]

    def optional(self, cls):
        """The record of class ``cls``, or None when the folder has no such file."""
        return self.record(cls) if self.has(cls.FILE) or cls in self._records else None

    def keep(self, *records) -> None:
        """Records this process has just written here: later reads return them, not the file."""
        for r in records:
            if r is not None:
                self._records[type(r)] = r

    @property
    def manifest(self) -> Manifest:
        return self.record(Manifest)

    @property
    def metrics(self) -> Metrics:
        return self.record(Metrics)

    @property
    def comparison(self) -> Comparison | None:
        return self.optional(Comparison)

    @property
    def run_record(self) -> RunRecord:
        return self.record(RunRecord)

    def unit(self, arm: str, batch: int) -> dict | None:
        """A unit record (``units/<arm>/b<batch>.json``), or None while it is not written."""
        return self.units.unit_done(arm, batch)

    def require_finished(self, *needs) -> CaseFolder:
        """This folder, when it is a finished case folder (``needs``: the records it must hold,
        each read and validated; by default ``FINISHED``); else AuditError in one line naming
        what it lacks."""
        needs = needs or FINISHED
        if not self.root.is_dir():
            raise AuditError(f"case folder {self.root} does not exist")
        missing = [r.FILE for r in needs if not self.has(r.FILE) and r not in self._records]
        if missing:
            raise AuditError(f"{self.root} is not a finished case folder: it has no {' and no '.join(missing)} "
                             f"(run `carlos-audit run` first)")
        for r in needs:
            self.record(r)
        return self

    # files -------------------------------------------------------------
    def _stat(self, name: str) -> tuple | None:
        try:
            st = os.stat(self.root / name)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino

    def raw(self, name: str) -> bytes:
        """The bytes of file ``name``, read again only when its size, mtime or inode changed (its
        digest is taken from them). For the record files and other small files."""
        key = self._stat(name)
        held = self._raw.get(name)
        if held is None or held[0] != key:
            data = (self.root / name).read_bytes()
            held = self._raw[name] = (key, data)
            self._digests[name] = (key, sha256_bytes(data))
        return held[1]

    def digest(self, name: str) -> str | None:
        """The sha256 of file ``name`` (None when absent), hashed again only when its size,
        mtime or inode changed since the last call (a record file is read whole, once)."""
        key = self._stat(name)
        if key is None:
            self._digests.pop(name, None)
            return None
        held = self._digests.get(name)
        if held is None or held[0] != key:
            if name in RECORD_FILES:
                self.raw(name)
            else:
                self._digests[name] = (key, sha256_file(self.root / name))
        return self._digests[name][1]

    def manifest_intact(self) -> bool | None:
        """Whether manifest.json matches ``manifest.json.sha256`` (None when that file is missing)."""
        side = self.root / MANIFEST_SHA256
        if not side.is_file():
            return None
        return side.read_text().split()[0] == self.digest(Manifest.FILE)

    def sealed(self) -> bool:
        """Whether the folder has the files of a finished case and manifest.json matches
        ``manifest.json.sha256``, which a run writes last (a run that died before is not sealed)."""
        return all(self.has(r.FILE) for r in FINISHED) and bool(self.manifest_intact())

    def results_intact(self) -> dict[str, bool]:
        """Each result file the manifest records (``results``) against its recorded sha256."""
        return {rel: self.digest(rel) == digest for rel, digest in self.manifest.results.items()}

    # the case as run ---------------------------------------------------
    @property
    def case(self):
        """The case this folder ran: its case.toml copy, relative paths resolved from the case
        file's recorded location (the manifest's ``casefile`` input)."""
        if self._case is None:
            from carlos_audit.case.casefile import parse_case

            casefile = next(i for i in self.manifest.inputs if i["role"] == "casefile")
            self._case = parse_case((self.root / CASE_TOML).read_text("utf-8"), Path(casefile["path"]))
        return self._case

    def pairs(self, ids=None) -> list[dict]:
        """The manifest's pair rows (every pair the case ran), or those of ``ids`` in that order."""
        rows = self.manifest.pairs
        if ids is None:
            return rows
        wanted = set(ids)
        return [r for r in rows if r["pair_id"] in wanted]

    def main_profile(self) -> tuple[str, str]:
        """(base arm, LoRA arm) of the main profile."""
        b, l = self.manifest.protocol["profiles"]["main"]
        return b, l
