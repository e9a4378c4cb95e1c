"""A finished case added to a corpus as one row (signature checked)."""

from __future__ import annotations

from collections.abc import Mapping

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from carlos_audit.case.signature import require_compatible
from carlos_audit.casefolder import CaseFolder
from carlos_audit.corpus.store import (
    CHUNK_ELEMENTS,
    DIRECTIONS_FILE,
    DTYPES,
    ROW_SCHEMA,
    Corpus,
)
from carlos_audit.corpus.write import NpyWriter, commit, locked
from carlos_audit.errors import AuditError
from carlos_audit.records import Manifest, Metrics

# --------------------------------------------------------------------------- cases


def case_direction(folder: CaseFolder) -> np.ndarray:
    """The finished case's direction as float64, checked: what a corpus row can hold (a
    non-empty, finite, non-zero vector; a finite strength, a finite or null consistency)."""
    metrics, where = folder.metrics, folder.path(Metrics.FILE)
    d = metrics.direction
    if not isinstance(d, list) or not d or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in d):
        raise AuditError(f"{where}: direction must be a non-empty list of numbers")
    d = np.asarray(d, dtype=np.float64)
    if not np.isfinite(d).all():
        raise AuditError(f"{where}: direction has non-finite values")
    if not np.any(d != 0):
        raise AuditError(f"{where}: direction is all zero (no measurable effect); a corpus row needs a direction")
    s, cons = metrics.strength, metrics.consistency
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise AuditError(f"{where}: strength must be a finite number")
    if cons is not None and (isinstance(cons, bool) or not isinstance(cons, (int, float)) or not math.isfinite(cons)):
        raise AuditError(f"{where}: consistency must be a finite number or null")
    return d


def add_case(corpus_path, case_dir, row_id: str | None = None, name: str | None = None,
             allow_incompatible: bool = False) -> dict:
    """Append a finished case (metrics.json + manifest.json) to a corpus, atomically.

    Refuses a differing signature (unless ``allow_incompatible``, which is recorded in the row's
    ``note``) and a duplicate id. A float32 corpus becomes float64 when the case's direction is
    not exactly a float32 vector (values are stored exactly). Returns the added row plus
    ``differing`` / ``unverifiable`` signature fields.
    """
    cpath, folder = Path(corpus_path), CaseFolder(case_dir).require_finished()
    d, manifest = case_direction(folder), folder.manifest
    if not isinstance(manifest.signature, dict):
        raise AuditError(f"{folder.path(Manifest.FILE)} lacks a signature")
    rid = str(row_id) if row_id is not None else _text(manifest.case, "id")
    if not rid or not rid.strip():
        raise AuditError(f"{folder.path(Manifest.FILE)} lacks case.id; pass --id")
    if not cpath.is_dir():
        raise AuditError(f"no corpus at {cpath}: the folder does not exist")
    with locked(cpath):
        c = Corpus.open(cpath, verify=True)
        if c.dim and d.size != c.dim:
            raise AuditError(f"the case direction has {d.size} values; corpus {cpath} has dim {c.dim}")
        comp = require_compatible(c.signature, manifest.signature, allow_incompatible)
        if c.lookup([rid]):
            raise AuditError(f"corpus {cpath} already has a row with id {rid!r}; pass --id to choose another")
        new = _row(folder, rid, name, _notes(comp, manifest), c.n)
        dtype = c.dtype
        if dtype == "float32" and not np.array_equal(d.astype(np.float32).astype(np.float64), d):
            dtype = "float64"
        staged, dirs_sha = _directions(c, d, dtype)
        meta = dict(c.meta, n=c.n + 1, dim=int(c.dim if c.n else d.size), dtype=dtype)
        table = pa.concat_tables([c.rows, new])
        del c
        commit(cpath, meta, staged, dirs_sha, table)
    row = new.to_pylist()[0]
    row.update(comp)
    return row


def _text(section, key: str) -> str | None:
    """A string field of a manifest section (None when the section or the value is not one)."""
    value = section.get(key) if isinstance(section, Mapping) else None
    return value if isinstance(value, str) else None


def _notes(comp: dict, manifest: Manifest) -> list[str]:
    from carlos_audit.case.sequential_plan import sequential_note

    notes = []
    if comp["differing"]:
        notes.append("added with --allow-incompatible; differing signature fields: " + ", ".join(comp["differing"]))
    if comp["unverifiable"]:
        notes.append("unverifiable signature fields: " + ", ".join(comp["unverifiable"]))
    if sequential_note(manifest.sequential):
        notes.append(sequential_note(manifest.sequential))
    return notes


def _row(folder: CaseFolder, rid: str, name: str | None, notes: list[str], index: int) -> pa.Table:
    """The corpus row of a finished case (``index``: its row number)."""
    manifest, metrics = folder.manifest, folder.metrics
    lora_path = _text(manifest.lora, "path")
    return pa.Table.from_pylist([{
        "id": rid, "name": name or (Path(lora_path).name if lora_path else rid), "source": "case", "model_id": None,
        "folder_name": folder.root.name, "description": _text(manifest.case, "title"),
        "download_count": None, "nsfw_level": None, "strength": float(metrics.strength),
        "consistency": None if metrics.consistency is None else float(metrics.consistency),
        "manifest_sha256": folder.digest(Manifest.FILE), "lora_sha256": _text(manifest.lora, "sha256"),
        "note": "; ".join(notes) or None, "row": index,
    }], schema=ROW_SCHEMA)


def _directions(c: Corpus, d: np.ndarray, dtype: str) -> tuple[Path, str]:
    """The corpus's directions with ``d`` appended, staged (not committed): (staged file, sha256)."""
    dim = c.dim if c.n else d.size
    writer = NpyWriter(c.path / DIRECTIONS_FILE, c.n + 1, dim, DTYPES[dtype])
    try:
        step = max(1, CHUNK_ELEMENTS // max(dim, 1))
        for st in range(0, c.n, step):
            writer.write(c.directions[st:st + step])
        writer.write(d[None, :])
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
