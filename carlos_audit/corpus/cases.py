"""A finished case added to a corpus as one row (signature checked)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from carlos_audit.case.signature import require_compatible
from carlos_audit.corpus.store import (
    CHUNK_ELEMENTS,
    DIRECTIONS_FILE,
    DTYPES,
    ROW_SCHEMA,
    Corpus,
)
from carlos_audit.corpus.write import NpyWriter, commit, locked
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file

# --------------------------------------------------------------------------- cases


def _read_case_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise AuditError(f"{path.parent} is not a finished case: {path.name} is missing")
    try:
        obj = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise AuditError(f"{path} is garbled (not valid JSON: {e})") from None
    if not isinstance(obj, dict):
        raise AuditError(f"{path} is garbled: expected a JSON object ({what})")
    return obj


def add_case(corpus_path, case_dir, row_id: str | None = None, name: str | None = None,
             allow_incompatible: bool = False) -> dict:
    """Append a finished case (metrics.json + manifest.json) to a corpus, atomically.

    Refuses a differing signature (unless ``allow_incompatible``, which is recorded in the row's
    ``note``) and a duplicate id. A float32 corpus becomes float64 when the case's direction is
    not exactly a float32 vector (values are stored exactly). Returns the added row plus
    ``differing`` / ``unverifiable`` signature fields.
    """
    cpath, case = Path(corpus_path), Path(case_dir)
    if not case.is_dir():
        raise AuditError(f"no case folder at {case}")
    metrics = _read_case_json(case / "metrics.json", "metrics")
    mpath = case / "manifest.json"
    manifest = _read_case_json(mpath, "manifest")
    for key in ("direction", "strength", "consistency"):
        if key not in metrics:
            raise AuditError(f"{case / 'metrics.json'} lacks {key}")
    d = metrics["direction"]
    if not isinstance(d, list) or not d or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in d):
        raise AuditError(f"{case / 'metrics.json'}: direction must be a non-empty list of numbers")
    d = np.asarray(d, dtype=np.float64)
    if not np.isfinite(d).all():
        raise AuditError(f"{case / 'metrics.json'}: direction has non-finite values")
    if not np.any(d != 0):
        raise AuditError(f"{case / 'metrics.json'}: direction is all zero (no measurable effect); "
                         f"a corpus row needs a direction")
    s, cons = metrics["strength"], metrics["consistency"]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise AuditError(f"{case / 'metrics.json'}: strength must be a finite number")
    if cons is not None and (isinstance(cons, bool) or not isinstance(cons, (int, float)) or not math.isfinite(cons)):
        raise AuditError(f"{case / 'metrics.json'}: consistency must be a finite number or null")
    sig = manifest.get("signature")
    if not isinstance(sig, dict):
        raise AuditError(f"{mpath} lacks a signature")
    case_info = manifest.get("case") if isinstance(manifest.get("case"), dict) else {}
    lora = manifest.get("lora") if isinstance(manifest.get("lora"), dict) else {}
    rid = str(row_id) if row_id is not None else case_info.get("id")
    if not isinstance(rid, str) or not rid.strip():
        raise AuditError(f"{mpath} lacks case.id; pass --id")
    if not cpath.is_dir():
        raise AuditError(f"no corpus at {cpath}: the folder does not exist")
    with locked(cpath):
        c = Corpus.open(cpath, verify=True)
        if c.dim and d.size != c.dim:
            raise AuditError(f"the case direction has {d.size} values; corpus {cpath} has dim {c.dim}")
        dim = c.dim if c.n else d.size
        comp = require_compatible(c.signature, sig, allow_incompatible)
        if c.lookup([rid]):
            raise AuditError(f"corpus {cpath} already has a row with id {rid!r}; pass --id to choose another")
        lora_path = lora.get("path")
        label = name or (Path(lora_path).name if isinstance(lora_path, str) and lora_path else rid)
        notes = []
        if comp["differing"]:
            notes.append("added with --allow-incompatible; differing signature fields: " + ", ".join(comp["differing"]))
        if comp["unverifiable"]:
            notes.append("unverifiable signature fields: " + ", ".join(comp["unverifiable"]))
        from carlos_audit.case.sequential import sequential_note

        if sequential_note(manifest.get("sequential")):
            notes.append(sequential_note(manifest.get("sequential")))
        dtype = c.dtype
        if dtype == "float32" and not np.array_equal(d.astype(np.float32).astype(np.float64), d):
            dtype = "float64"
        n = c.n + 1
        writer = NpyWriter(cpath / DIRECTIONS_FILE, n, dim, DTYPES[dtype])
        try:
            step = max(1, CHUNK_ELEMENTS // max(dim, 1))
            for st in range(0, c.n, step):
                writer.write(c.directions[st:st + step])
            writer.write(d[None, :])
            staged, dirs_sha = writer.finish()
        except BaseException:
            writer.abort()
            raise
        new = pa.Table.from_pylist([{
            "id": rid, "name": label, "source": "case", "model_id": None,
            "folder_name": case.name, "description": case_info.get("title") if isinstance(case_info.get("title"), str) else None,
            "download_count": None, "nsfw_level": None, "strength": float(s),
            "consistency": None if cons is None else float(cons), "manifest_sha256": sha256_file(mpath),
            "lora_sha256": lora.get("sha256") if isinstance(lora.get("sha256"), str) else None,
            "note": "; ".join(notes) or None, "row": c.n,
        }], schema=ROW_SCHEMA)
        table = pa.concat_tables([c.rows, new])
        meta = dict(c.meta, n=n, dim=int(dim), dtype=dtype)
        del c
        commit(cpath, meta, staged, dirs_sha, table)
    row = new.to_pylist()[0]
    row.update(comp)
    return row
