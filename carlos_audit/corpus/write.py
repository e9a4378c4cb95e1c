"""Writing a corpus: staged, hashed, committed atomically under a folder lock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from carlos_audit.case.signature import empty_signature
from carlos_audit.corpus.store import (
    BUILD_CASES_DIR,
    CHUNK_ELEMENTS,
    CORPUS_FILES,
    DIRECTIONS_FILE,
    DTYPES,
    META_FILE,
    ROW_SCHEMA,
    ROWS_FILE,
    SCHEMA,
    Corpus,
    direction_fault,
    dupes,
    value_fault,
)
from carlos_audit.errors import AuditError
from carlos_audit.fileio import write_json_atomic
from carlos_audit.casefolder.lock import LOCK_NAME


def _npy_header(n: int, dim: int, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, dim)})
    return buf.getvalue()


class NpyWriter:
    """Streams an (n, dim) matrix into a temp .npy beside ``final``, hashing as it writes."""

    def __init__(self, final: Path, n: int, dim: int, dtype: np.dtype):
        self.final, self.n, self.dim, self.dtype = Path(final), n, dim, np.dtype(dtype)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.final.parent, prefix=f".{self.final.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "wb")
        self.h = hashlib.sha256()
        self.rows = 0
        self._write(_npy_header(n, dim, self.dtype))

    def _write(self, data) -> None:
        self.f.write(data)
        self.h.update(data)

    def write(self, block: np.ndarray) -> None:
        block = np.asarray(block)
        if block.dtype.itemsize > self.dtype.itemsize:  # e.g. float64 into float32: exact or refused
            narrow = block.astype(self.dtype)
            if not np.array_equal(narrow.astype(block.dtype), block):
                raise AuditError(f"directions are not exactly representable as {self.dtype.name}; "
                                 f"store them as float64")
            block = narrow
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise AuditError(f"direction block has shape {block.shape}, expected (*, {self.dim})")
        self.rows += block.shape[0]
        if self.rows > self.n:
            raise AuditError(f"more direction rows than the {self.n} announced")
        self._write(memoryview(block).cast("B"))

    def finish(self) -> tuple[Path, str]:
        if self.rows != self.n:
            raise AuditError(f"wrote {self.rows} direction rows, expected {self.n}")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.chmod(self.tmp, 0o644)
        return self.tmp, self.h.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def _stage_bytes(final: Path, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    return Path(tmp)


def _rows_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def locked(folder: Path):
    """Exclusive lock on the corpus folder itself (flock on the directory; no lock file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def commit(dest: Path, meta: dict, staged_dirs: Path | None, dirs_sha: str, rows_table: pa.Table) -> None:
    """Put the new data files in place, corpus.json last (its n/hashes describe them)."""
    rows_tmp = None
    try:
        rows_data = _rows_bytes(rows_table)
        rows_tmp = _stage_bytes(dest / ROWS_FILE, rows_data)
        meta = dict(meta, directions_sha256=dirs_sha, rows_sha256=hashlib.sha256(rows_data).hexdigest())
        if staged_dirs is not None:
            os.replace(staged_dirs, dest / DIRECTIONS_FILE)
            staged_dirs = None
        os.replace(rows_tmp, dest / ROWS_FILE)
        rows_tmp = None
        write_json_atomic(dest / META_FILE, meta)
        _fsync_dir(dest)
    finally:
        for p in (staged_dirs, rows_tmp):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    Path(p).unlink()


def _rows_table(cols: dict) -> pa.Table:
    n = len(cols["id"])
    arrays = []
    for field in ROW_SCHEMA:
        v = cols.get(field.name)
        if v is None:
            arrays.append(pa.nulls(n, type=field.type))
        elif isinstance(v, (pa.Array, pa.ChunkedArray)):
            arrays.append(v.cast(field.type))
        elif isinstance(v, np.ndarray) and v.dtype.kind == "f":
            arrays.append(pa.array(v, type=field.type, from_pandas=True))  # NaN -> null
        else:
            arrays.append(pa.array(v, type=field.type))
    return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)


def _prepare_dest(dest: Path, overwrite: bool, protect: Path | None = None) -> None:
    if dest.exists() and not dest.is_dir():
        raise AuditError(f"{dest} exists and is not a folder")
    if dest.exists():
        # ``cases/`` holds the case folders of ``corpus build`` (kept, never replaced here); the
        # lock is the build's own (casefolder/lock.py)
        entries = sorted(p.name for p in dest.iterdir() if p.name not in (BUILD_CASES_DIR, LOCK_NAME))
        if entries and not overwrite:
            raise AuditError(f"{dest} exists and is not empty; pass --overwrite to replace a corpus there")
        foreign = [e for e in entries
                   if e not in CORPUS_FILES and not (e.startswith(".") and e.endswith(".tmp"))]
        if foreign:
            raise AuditError(f"refusing to overwrite {dest}: it holds files that are not part of a corpus "
                             f"({', '.join(foreign[:5])})")
    if protect is not None:
        for name in CORPUS_FILES:
            if (dest / name).resolve() == protect.resolve():
                raise AuditError(f"the source {protect} would be overwritten by the corpus; choose another DEST")
    dest.mkdir(parents=True, exist_ok=True)


def _check_block(block: np.ndarray, first_row: int, ids) -> None:
    fault = direction_fault(block)
    if fault is not None:
        raise AuditError(f"direction of row {_id_at(ids, first_row + fault[0])} {fault[1]}")


def _id_at(ids, i: int) -> str:
    try:
        return repr(str(ids[i]))
    except Exception:
        return f"#{i}"


@dataclass(frozen=True)
class CorpusWrite:
    """How ``create_corpus`` writes: provenance, direction dtype, replace an existing corpus,
    ``n`` and ``dim`` of directions given as blocks, extra corpus.json keys, and ``protect`` (a
    file the overwrite must not delete: the source being imported)."""

    created_from: dict | None = None
    dtype: str | None = None
    overwrite: bool = False
    n: int | None = None
    dim: int | None = None
    extra_meta: dict | None = None
    protect: Path | None = None


def create_corpus(dest, *, directions, rows: dict, signature: dict | None, name: str, **options) -> "Corpus":
    """Write a corpus from columns and a direction matrix.

    ``directions`` is an (n, dim) array (memmaps welcome) or an iterable of (k, dim) blocks
    (then ``n`` and ``dim`` are required): a 1M-row corpus is written without holding it twice.
    ``rows`` maps ROW_SCHEMA column names to sequences; ``id``, ``strength`` are required,
    ``row`` is assigned here. ``options``: the fields of ``CorpusWrite``; ``dtype`` defaults to
    the array's own (float32/float64).
    """
    how = CorpusWrite(**options)
    dest = Path(dest)
    ids = rows.get("id")
    if ids is None or rows.get("strength") is None:
        raise AuditError("a corpus needs at least the id and strength of every row")
    ids = [str(x) for x in ids] if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    n, dim, dtype, blocks = _direction_shape(directions, how, len(ids))
    id_arr = pa.array(ids, type=pa.string()) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    if id_arr.null_count or pc.count_distinct(id_arr).as_py() != n:
        raise AuditError(f"row ids must be present and unique: {dupes(id_arr)}")
    cols = dict(rows, id=id_arr, row=np.arange(n, dtype=np.int64), **_checked_columns(rows, ids))
    created = not dest.exists()
    _prepare_dest(dest, how.overwrite, how.protect)
    if blocks is None:
        blocks = _row_blocks(directions, n, dim)
    staged, dirs_sha = _write_directions(dest, created, blocks, (n, dim, dtype), ids)
    sig = empty_signature()
    sig.update(signature or {})
    meta = {
        "schema": SCHEMA, "name": name, "n": int(n), "dim": int(dim) if n or dim else None,
        "dtype": dtype, "signature": sig, "created_from": how.created_from,
        "files": {"rows": ROWS_FILE, "directions": DIRECTIONS_FILE},
    }
    meta.update(how.extra_meta or {})
    commit(dest, meta, staged, dirs_sha, _rows_table(cols))
    return Corpus.open(dest)


def _direction_shape(directions, how: CorpusWrite, n_rows: int) -> tuple:
    """(n, dim, dtype, blocks): blocks None for a matrix."""
    if isinstance(directions, np.ndarray):
        if directions.ndim != 2:
            raise AuditError(f"directions must be a matrix, got shape {directions.shape}")
        n, dim = directions.shape
        dtype = how.dtype or {"f4": "float32", "f8": "float64"}.get(directions.dtype.str[1:], "float64")
        blocks = None
    else:
        if how.n is None or how.dim is None:
            raise AuditError("n and dim are required when directions come as blocks")
        n, dim, dtype, blocks = how.n, how.dim, how.dtype or "float32", directions
    if dtype not in DTYPES:
        raise AuditError(f"unsupported direction dtype {dtype!r} (float32 or float64)")
    if n != n_rows:
        raise AuditError(f"{n_rows} rows but {n} directions")
    return n, dim, dtype, blocks


def _checked_columns(rows: dict, ids) -> dict:
    """The strength column as float64 and, when given, consistency as float64 (None as nan),
    every value valid (store.value_fault: the rule a corpus is opened with)."""
    strength = np.asarray(rows["strength"], dtype=np.float64)
    cons = None
    if rows.get("consistency") is not None:
        cons = np.array([np.nan if x is None else x for x in rows["consistency"]], dtype=np.float64) \
            if not isinstance(rows["consistency"], np.ndarray) else rows["consistency"].astype(np.float64)
    fault = value_fault(strength, cons)
    if fault is not None:
        raise AuditError(f"row {_id_at(ids, fault[0])}: {fault[1]}")
    return {"strength": strength} if cons is None else {"strength": strength, "consistency": cons}


def _row_blocks(directions, n: int, dim: int):
    """A direction matrix in row blocks of about CHUNK_ELEMENTS values."""
    step = max(1, CHUNK_ELEMENTS // max(dim, 1))
    for start in range(0, n, step):
        yield directions[start:start + step]


def _write_directions(dest: Path, created: bool, blocks, shape: tuple, ids) -> tuple:
    """directions.npy staged from ``blocks`` (each checked); (staged path, sha256). On an error
    the staged file is removed, and ``dest`` too when this call ``created`` it and it is empty."""
    n, dim, dtype = shape
    writer = NpyWriter(dest / DIRECTIONS_FILE, n, dim, DTYPES[dtype])
    try:
        start = 0
        for blk in blocks:
            blk = np.asarray(blk)
            if blk.ndim != 2 or blk.shape[1] != dim:
                raise AuditError(f"direction block has shape {blk.shape}, expected (*, {dim})")
            _check_block(blk, start, ids)
            writer.write(blk)
            start += blk.shape[0]
        return writer.finish()
    except BaseException:
        writer.abort()
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only if still empty
        raise


def create_empty(dest, signature: dict | None, name: str, *, dim: int | None = None,
                 dtype: str = "float32", overwrite: bool = False) -> "Corpus":
    """An empty corpus with a signature, to be filled with ``add_case``."""
    if signature is not None and not isinstance(signature, dict):
        raise AuditError("a corpus signature must be a mapping")
    return create_corpus(dest, directions=np.zeros((0, dim or 0), dtype=DTYPES[dtype]),
                         rows={"id": [], "strength": []}, signature=signature, name=name,
                         created_from={"kind": "empty"}, dtype=dtype, overwrite=overwrite)


