"""Reference corpora of CARLoS profiles: store, import, neighbours, percentiles, signatures.

A corpus is a folder (layout and definitions in ``docs/CORPUS.md``)::

    corpus.json      header: schema, name, n, dim, dtype, signature, provenance, file hashes
    rows.parquet     one row per LoRA (id, name, source, strength, consistency, ...; ``row``
                     is the index into the direction matrix)
    directions.npy   n x dim little-endian float32 (or float64) matrix, C order, memory-mapped

This module must start fast: it imports numpy and pyarrow only (never torch, never pandas), so
``carlos-audit corpus ...`` answers in well under a second.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import importlib
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import AuditError
from .fileio import read_json, write_bytes_atomic, write_json_atomic
from .hashing import sha256_file

SCHEMA = "carlos-audit/corpus/1"
META_FILE = "corpus.json"
ROWS_FILE = "rows.parquet"
DIRECTIONS_FILE = "directions.npy"
BUILD_CASES_DIR = "cases"
CORPUS_FILES = (META_FILE, ROWS_FILE, DIRECTIONS_FILE)

#: The fields two profiles must share to be comparable (same order as the manifest's ``signature``).
SIGNATURE_FIELDS = (
    "base_model", "base_model_sha256", "embedder", "embedder_sha256", "feature", "prompts_sha256",
    "seeds", "lora_scale", "trigger_policy", "steps", "guidance_scale", "width", "height",
    "scheduler",
)

#: Columns of the public CARLoS metrics database (Parquet or CSV), all required on import.
CARLOS_COLUMNS = (
    "version_id", "model_id", "model_name", "model_description", "model_nsfw_level",
    "folder_name", "direction", "strength", "consistency", "model_download_count",
)

ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("name", pa.string()),
    ("source", pa.string()),
    ("model_id", pa.int64()),
    ("folder_name", pa.string()),
    ("description", pa.string()),
    ("download_count", pa.int64()),
    ("nsfw_level", pa.int64()),
    ("strength", pa.float64()),
    ("consistency", pa.float64()),
    ("manifest_sha256", pa.string()),
    ("lora_sha256", pa.string()),
    ("note", pa.string()),
    ("row", pa.int64()),
])

DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}

#: Hashes are checked on every open when the two data files together are at most this big;
#: bigger corpora are checked by ``Corpus.open(path, verify=True)`` / ``Corpus.verify()``.
AUTO_VERIFY_BYTES = 256 << 20

# Scores of one chunk of rows against a batch of queries hold at most this many elements.
_CHUNK_ELEMENTS = 1 << 24
# Bound on |cosine computed in the storage dtype - cosine computed in float64| (see CORPUS.md).
_PREFILTER_TOL = {"float32": 2e-4, "float64": 1e-9}

_CARLOS_PRESET_NOTES = {
    "source": "shahar-sarfaty/CARLoS src/carlos/data/metrics_database.parquet (Apache-2.0)",
    "prompts": "carlos:indexing (280 prompts: 10 categories x 35 subcategories x 8)",
    "embedder_preprocessing": "CLIPProcessor; raw (unnormalised) get_image_features",
    "base_model_dtype": "fp16",
    "dim": 512,
}


def _carlos_indexing_sha256():
    # filled from protocol.CARLOS_INDEXING_SHA256 when available
    try:
        return getattr(importlib.import_module("carlos_audit.protocol"), "CARLOS_INDEXING_SHA256", None)
    except ImportError:
        return None


def preset_signature(preset: str) -> dict:
    """The signature of a named upstream protocol (``carlos-sdxl-vitb32``)."""
    if preset != "carlos-sdxl-vitb32":
        raise AuditError(f"unknown corpus preset {preset!r} (known: carlos-sdxl-vitb32)")
    return {
        "base_model": "hf:stabilityai/stable-diffusion-xl-base-1.0",
        "base_model_sha256": None,
        "embedder": "hf-transformers:openai/clip-vit-base-patch32",
        "embedder_sha256": None,
        "feature": "raw_image_features",
        "prompts_sha256": _carlos_indexing_sha256(),
        "seeds": list(range(16)),
        "lora_scale": 1.0,
        "trigger_policy": "lora_only",
        "steps": 25,
        "guidance_scale": 5.0,
        "width": 1024,
        "height": 1024,
        "scheduler": "EulerDiscreteScheduler",
    }


PRESETS = ("carlos-sdxl-vitb32",)


def empty_signature() -> dict:
    return {k: None for k in SIGNATURE_FIELDS}


# --------------------------------------------------------------------------- signatures


def _norm_value(v):
    if isinstance(v, tuple):
        v = list(v)
    if isinstance(v, list):
        return [_norm_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm_value(x) for k, x in v.items()}
    return v


def _signature_fields(a: dict, b: dict) -> list[str]:
    extra = sorted((set(a) & set(b)) - set(SIGNATURE_FIELDS))
    return list(SIGNATURE_FIELDS) + extra


def check_compatible(corpus_signature: dict | None, case_signature: dict | None) -> list[str]:
    """Names of the signature fields that both sides record and that differ."""
    a, b = corpus_signature or {}, case_signature or {}
    out = []
    for f in _signature_fields(a, b):
        va, vb = a.get(f), b.get(f)
        if va is None or vb is None:
            continue
        if _norm_value(va) != _norm_value(vb):
            out.append(f)
    return out


def unverifiable_fields(corpus_signature: dict | None, case_signature: dict | None) -> list[str]:
    """Names of the signature fields missing (or null) on at least one side."""
    a, b = corpus_signature or {}, case_signature or {}
    return [f for f in _signature_fields(a, b) if a.get(f) is None or b.get(f) is None]


def _short(v, limit: int = 48) -> str:
    s = json.dumps(v, ensure_ascii=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def require_compatible(corpus_signature: dict | None, case_signature: dict | None,
                       allow_incompatible: bool = False) -> dict:
    """Refuse (AuditError) when the signatures differ, unless ``allow_incompatible``.

    Returns ``{"differing": [...], "unverifiable": [...]}`` for the caller to record.
    """
    differing = check_compatible(corpus_signature, case_signature)
    if differing and not allow_incompatible:
        a, b = corpus_signature or {}, case_signature or {}
        detail = ", ".join(f"{f} (corpus {_short(a.get(f))}, case {_short(b.get(f))})" for f in differing)
        raise AuditError(f"the case and the corpus were profiled differently: {detail}; "
                         f"pass --allow-incompatible to compare anyway")
    return {"differing": differing, "unverifiable": unverifiable_fields(corpus_signature, case_signature)}


# --------------------------------------------------------------------------- percentiles


def percentile_rank(values, v, exclude_index: int | None = None) -> float | None:
    """100 x (number of OTHER rows with value <= v) / (number of other rows).

    NaN/None entries of ``values`` are skipped (they count neither above nor in the total);
    ``exclude_index`` is the query's own row when it belongs to the corpus. Returns None when
    ``v`` is None/NaN or no other row has a value.
    """
    if v is None:
        return None
    v = float(v)
    if math.isnan(v):
        return None
    vals = np.asarray(values, dtype=np.float64) if not isinstance(values, np.ndarray) else values
    if vals.dtype == object:
        vals = np.array([np.nan if x is None else x for x in vals], dtype=np.float64)
    valid = ~np.isnan(vals)
    if exclude_index is not None:
        valid = valid.copy()
        valid[exclude_index] = False
    total = int(np.count_nonzero(valid))
    if total == 0:
        return None
    below = int(np.count_nonzero(valid & (vals <= v)))
    return 100.0 * below / total


# --------------------------------------------------------------------------- the store


def _np(col) -> np.ndarray:
    """A numeric pyarrow (chunked) array as a numpy copy, read straight from its buffers (nulls
    of a float column become NaN). pyarrow's own to_numpy / fill_null import pandas, which would
    cost every CLI call ~0.3 s."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], type=col.type)
    t = col.type
    floating = pa.types.is_floating(t) and not pa.types.is_float16(t)
    if not (floating or pa.types.is_integer(t)) or (col.null_count and not floating):
        raise AuditError(f"internal: expected a numeric column without nulls, got {t} with {col.null_count} nulls")
    kind = "f" if floating else ("i" if pa.types.is_signed_integer(t) else "u")
    dtype = np.dtype(f"<{kind}{t.bit_width // 8}")
    n = len(col)
    if n == 0:
        return np.zeros(0, dtype=dtype)
    validity, data = col.buffers()[0], col.buffers()[1]
    out = np.frombuffer(data, dtype=dtype, count=n, offset=col.offset * dtype.itemsize).copy()
    if col.null_count:
        bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
        out[~bits[col.offset:col.offset + n].astype(bool)] = np.nan
    return out


def _npy_header(n: int, dim: int, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, dim)})
    return buf.getvalue()


class _NpyWriter:
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
def _locked(folder: Path):
    """Exclusive lock on the corpus folder itself (flock on the directory; no lock file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _commit(dest: Path, meta: dict, staged_dirs: Path | None, dirs_sha: str, rows_table: pa.Table) -> None:
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
        # ``cases/`` holds the case folders of ``corpus build`` (kept, never replaced here)
        entries = sorted(p.name for p in dest.iterdir() if p.name != BUILD_CASES_DIR)
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
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        bad = first_row + int(np.argmin(finite))
        raise AuditError(f"direction of row {_id_at(ids, bad)} has non-finite values")
    zero = ~np.any(block != 0, axis=1)
    if zero.any():
        bad = first_row + int(np.argmax(zero))
        raise AuditError(f"direction of row {_id_at(ids, bad)} is all zero (cosine similarity is undefined)")


def _id_at(ids, i: int) -> str:
    try:
        return repr(str(ids[i]))
    except Exception:
        return f"#{i}"


def create_corpus(dest, *, directions, rows: dict, signature: dict | None, name: str,
                  created_from=None, dtype: str | None = None, overwrite: bool = False,
                  n: int | None = None, dim: int | None = None, extra_meta: dict | None = None,
                  _protect: Path | None = None) -> "Corpus":
    """Write a corpus from columns and a direction matrix.

    ``directions`` is an (n, dim) array (memmaps welcome) or an iterable of (k, dim) blocks
    (then ``n`` and ``dim`` are required): a 1M-row corpus is written without holding it twice.
    ``rows`` maps ROW_SCHEMA column names to sequences; ``id``, ``strength`` are required,
    ``row`` is assigned here. ``dtype`` defaults to the array's own (float32/float64).
    """
    dest = Path(dest)
    ids = rows.get("id")
    if ids is None or rows.get("strength") is None:
        raise AuditError("a corpus needs at least the id and strength of every row")
    ids = [str(x) for x in ids] if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    n_rows = len(ids)
    if isinstance(directions, np.ndarray):
        if directions.ndim != 2:
            raise AuditError(f"directions must be a matrix, got shape {directions.shape}")
        n, dim = directions.shape
        dtype = dtype or {"f4": "float32", "f8": "float64"}.get(directions.dtype.str[1:], "float64")
        blocks = None
    else:
        if n is None or dim is None:
            raise AuditError("n and dim are required when directions come as blocks")
        dtype = dtype or "float32"
        blocks = directions
    if dtype not in DTYPES:
        raise AuditError(f"unsupported direction dtype {dtype!r} (float32 or float64)")
    if n != n_rows:
        raise AuditError(f"{n_rows} rows but {n} directions")
    id_arr = pa.array(ids, type=pa.string()) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    if id_arr.null_count or pc.count_distinct(id_arr).as_py() != n:
        raise AuditError(f"row ids must be present and unique: {_dupes(id_arr)}")
    strength = np.asarray(rows["strength"], dtype=np.float64)
    if not np.isfinite(strength).all():
        raise AuditError(f"strength of row {_id_at(ids, int(np.argmin(np.isfinite(strength))))} is missing or not finite")
    if rows.get("consistency") is not None:
        cons = np.array([np.nan if x is None else x for x in rows["consistency"]], dtype=np.float64) \
            if not isinstance(rows["consistency"], np.ndarray) else rows["consistency"].astype(np.float64)
        if np.isinf(cons).any():
            raise AuditError(f"consistency of row {_id_at(ids, int(np.argmax(np.isinf(cons))))} is infinite")
    created = not dest.exists()
    _prepare_dest(dest, overwrite, _protect)
    writer = _NpyWriter(dest / DIRECTIONS_FILE, n, dim, DTYPES[dtype])
    try:
        if blocks is None:
            step = max(1, _CHUNK_ELEMENTS // max(dim, 1))
            for start in range(0, n, step):
                blk = np.asarray(directions[start:start + step])
                _check_block(blk, start, ids)
                writer.write(blk)
        else:
            start = 0
            for blk in blocks:
                blk = np.asarray(blk)
                if blk.ndim != 2 or blk.shape[1] != dim:
                    raise AuditError(f"direction block has shape {blk.shape}, expected (*, {dim})")
                _check_block(blk, start, ids)
                writer.write(blk)
                start += blk.shape[0]
        staged, dirs_sha = writer.finish()
    except BaseException:
        writer.abort()
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only if still empty
        raise
    cols = dict(rows, id=id_arr, row=np.arange(n, dtype=np.int64), strength=strength)
    if "consistency" in rows and rows["consistency"] is not None:
        cols["consistency"] = cons
    table = _rows_table(cols)
    sig = empty_signature()
    sig.update(signature or {})
    meta = {
        "schema": SCHEMA, "name": name, "n": int(n), "dim": int(dim) if n or dim else None,
        "dtype": dtype, "signature": sig, "created_from": created_from,
        "files": {"rows": ROWS_FILE, "directions": DIRECTIONS_FILE},
    }
    meta.update(extra_meta or {})
    _commit(dest, meta, staged, dirs_sha, table)
    return Corpus.open(dest)


def _dupes(id_arr) -> str:
    seen, dup = set(), []
    for x in id_arr.to_pylist():
        if x is None:
            return "a row has no id"
        if x in seen and x not in dup:
            dup.append(x)
        seen.add(x)
    return "duplicate id(s) " + ", ".join(dup[:5]) + (" ..." if len(dup) > 5 else "")


def create_empty(dest, signature: dict | None, name: str, *, dim: int | None = None,
                 dtype: str = "float32", overwrite: bool = False) -> "Corpus":
    """An empty corpus with a signature, to be filled with ``add_case``."""
    if signature is not None and not isinstance(signature, dict):
        raise AuditError("a corpus signature must be a mapping")
    return create_corpus(dest, directions=np.zeros((0, dim or 0), dtype=DTYPES[dtype]),
                         rows={"id": [], "strength": []}, signature=signature, name=name,
                         created_from={"kind": "empty"}, dtype=dtype, overwrite=overwrite)


class Corpus:
    """An opened corpus: header, rows (pyarrow, columns read on first use) and the memory-mapped
    direction matrix. ``strength`` and ``consistency`` are float64 arrays (NaN: no consistency)."""

    def __init__(self, path: Path, meta: dict, directions: np.ndarray):
        self.path = path
        self.meta = meta
        self.directions = directions
        self.n = meta["n"]
        self.dim = meta["dim"]
        self.dtype = meta["dtype"]
        self.name = meta.get("name")
        self.signature = meta["signature"]
        self._cols: dict[str, pa.ChunkedArray] = {}
        self._table = None
        self._ids = None
        self._index = None
        self._norms = None
        self._inv = None
        self._sorted: dict[str, np.ndarray] = {}
        self.strength = _np(self.column("strength"))
        self.consistency = _np(self.column("consistency"))

    # ---- opening

    @classmethod
    def open(cls, path, verify: bool | None = None) -> "Corpus":
        p = Path(path)
        if p.name == META_FILE and p.is_file():
            p = p.parent
        if not p.exists():
            raise AuditError(f"no corpus at {p}: the folder does not exist")
        if not p.is_dir():
            raise AuditError(f"no corpus at {p}: not a folder")
        mp = p / META_FILE
        if not mp.is_file():
            raise AuditError(f"{p} is not a corpus: {META_FILE} is missing")
        try:
            meta = read_json(mp)
        except (ValueError, UnicodeDecodeError) as e:
            raise AuditError(f"{mp} is garbled (not valid JSON: {e})") from None
        _check_meta(meta, mp)
        n, dim, dtype = meta["n"], meta["dim"], DTYPES[meta["dtype"]]
        rp, dp = p / ROWS_FILE, p / DIRECTIONS_FILE
        for f in (rp, dp):
            if not f.is_file():
                raise AuditError(f"corpus {p} is incomplete: {f.name} is missing")
        _check_rows_file(rp, n)
        directions = _open_directions(dp, n, dim, dtype)
        c = cls(p, meta, directions)
        if verify is None:
            verify = rp.stat().st_size + dp.stat().st_size <= AUTO_VERIFY_BYTES
        if verify:
            c.verify()
        return c

    def verify(self) -> None:
        """Check both data files against the sha256 in corpus.json, and that ids are unique."""
        for fname, key in ((DIRECTIONS_FILE, "directions_sha256"), (ROWS_FILE, "rows_sha256")):
            if sha256_file(self.path / fname) != self.meta[key]:
                raise AuditError(f"corpus {self.path}: {fname} does not match the sha256 in {META_FILE} "
                                 f"(changed after it was written)")
        self._id_index()

    # ---- rows

    def column(self, name: str) -> pa.ChunkedArray:
        """One rows.parquet column (read on first use, cached)."""
        if self._table is not None:
            return self._table.column(name)
        if name not in self._cols:
            self._cols[name] = _read_rows(self.path / ROWS_FILE, [name]).column(0)
        return self._cols[name]

    @property
    def rows(self) -> pa.Table:
        """The whole rows table (every column, ROW_SCHEMA types)."""
        if self._table is None:
            self._table = _read_rows(self.path / ROWS_FILE, None)
        return self._table

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = self.column("id").to_pylist()
        return self._ids

    def _id_index(self) -> dict:
        if self._index is None:
            ids = self.ids
            index = dict(zip(ids, range(len(ids))))
            if None in index or len(index) != self.n:
                raise AuditError(f"{self.path / ROWS_FILE} is garbled: {_dupes(pa.array(ids, pa.string()))}")
            self._index = index
        return self._index

    def _lookup(self, ids: list[str]) -> dict:
        """{id: row} for the ids present (absent ones are left out)."""
        if self._index is None and len(ids) <= 16:
            # a few look-ups: a C-speed scan of the id list beats building a 1M-key dict
            found = {}
            for i in ids:
                with contextlib.suppress(ValueError):
                    found[i] = self.ids.index(i)
            return found
        index = self._id_index()
        return {i: index[i] for i in ids if i in index}

    def indices_of(self, ids) -> np.ndarray:
        """Row indices of ``ids``; AuditError naming every unknown id."""
        ids = [str(x) for x in ids]
        found = self._lookup(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise AuditError(f"unknown LoRA id(s) in corpus {self.path}: {shown}")
        return np.array([found[i] for i in ids], dtype=np.int64)

    def index_of(self, row_id) -> int:
        return int(self.indices_of([row_id])[0])

    def row(self, i: int, columns=None) -> dict:
        """One row as a dict (all columns, or the ones named)."""
        i = int(i)
        return {name: self.column(name)[i].as_py() for name in (columns or ROW_SCHEMA.names)}

    def _sorted_valid(self, name: str) -> np.ndarray:
        if name not in self._sorted:
            v = getattr(self, name)
            self._sorted[name] = np.sort(v[~np.isnan(v)])
        return self._sorted[name]

    def _percentile(self, name: str, v, exclude: int | None) -> float | None:
        """``percentile_rank(getattr(self, name), v, exclude)`` in O(log n) from a sorted copy."""
        if v is None or math.isnan(float(v)):
            return None
        srt = self._sorted_valid(name)
        own = None if exclude is None else getattr(self, name)[exclude]
        own_counts = own is not None and not math.isnan(own)
        total = srt.size - (1 if own_counts else 0)
        if total <= 0:
            return None
        below = int(np.searchsorted(srt, float(v), side="right")) - (1 if own_counts and own <= float(v) else 0)
        return 100.0 * below / total

    # ---- directions

    def storage_norms(self) -> np.ndarray:
        """Row norms computed in the storage dtype (cached; a prefilter, not a reported number)."""
        if self._norms is None:
            out = np.empty(self.n, dtype=self.directions.dtype)
            step = max(1, _CHUNK_ELEMENTS // max(self.dim or 1, 1))
            for s in range(0, self.n, step):
                blk = self.directions[s:s + step]
                out[s:s + step] = np.sqrt(np.einsum("ij,ij->i", blk, blk))
            self._norms = out
        return self._norms

    def _inverse_norms(self) -> np.ndarray:
        if self._inv is None:
            nrm = self.storage_norms()
            with np.errstate(divide="ignore"):
                self._inv = np.where(nrm > 0, 1 / nrm, 0).astype(nrm.dtype)
        return self._inv


def _check_meta(meta, mp: Path) -> None:
    if not isinstance(meta, dict):
        raise AuditError(f"{mp} is garbled: expected a JSON object")
    if meta.get("schema") != SCHEMA:
        raise AuditError(f"{mp}: unsupported corpus schema {meta.get('schema')!r} (expected {SCHEMA!r})")
    missing = [k for k in ("name", "n", "dim", "dtype", "signature", "directions_sha256", "rows_sha256")
               if k not in meta]
    if missing:
        raise AuditError(f"{mp} is garbled: missing {', '.join(missing)}")
    n, dim = meta["n"], meta["dim"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise AuditError(f"{mp} is garbled: n must be a non-negative integer")
    if dim is None:
        if n:
            raise AuditError(f"{mp} is garbled: dim is missing")
    elif not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
        raise AuditError(f"{mp} is garbled: dim must be a non-negative integer")
    if meta["dtype"] not in DTYPES:
        raise AuditError(f"{mp}: unsupported dtype {meta['dtype']!r} (float32 or float64)")
    if not isinstance(meta["signature"], dict):
        raise AuditError(f"{mp} is garbled: signature must be an object")


def _read_rows(rp: Path, columns) -> pa.Table:
    names = list(columns) if columns else ROW_SCHEMA.names
    try:
        t = pq.ParquetFile(rp).read(columns=names)  # (read_table would import pyarrow.dataset + pandas)
        return t.select(names).cast(pa.schema([ROW_SCHEMA.field(x) for x in names]))
    except (pa.ArrowException, OSError, KeyError, ValueError) as e:
        raise AuditError(f"{rp} cannot be read: {' '.join(str(e).split())[:200]}") from None


def _type_fits(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected or pa.types.is_null(actual):
        return True
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    return pa.types.is_floating(expected) and pa.types.is_floating(actual)


def _check_rows_file(rp: Path, n: int) -> None:
    """Columns, types and row count from the Parquet footer; the ``row`` column read in full."""
    try:
        pf = pq.ParquetFile(rp)
        schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise AuditError(f"{rp} cannot be read as Parquet: {' '.join(str(e).split())[:200]}") from None
    missing = [f.name for f in ROW_SCHEMA if f.name not in schema.names]
    if missing:
        raise AuditError(f"{rp} is garbled: missing column(s) {', '.join(missing)}")
    wrong = [f"{f.name} ({schema.field(f.name).type})" for f in ROW_SCHEMA
             if not _type_fits(schema.field(f.name).type, f.type)]
    if wrong:
        raise AuditError(f"{rp} has unexpected column types: {', '.join(wrong)}")
    if num_rows != n:
        raise AuditError(f"corpus is inconsistent: {rp.name} holds {num_rows} rows, {META_FILE} says {n} "
                         f"(an interrupted write?)")
    if n:
        rowcol = _read_rows(rp, ["row"]).column(0)
        if rowcol.null_count or not np.array_equal(_np(rowcol), np.arange(n)):
            raise AuditError(f"{rp} is garbled: column row must be 0..n-1 in order")


def _open_directions(dp: Path, n: int, dim: int | None, dtype: np.dtype) -> np.ndarray:
    try:
        with open(dp, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, fdtype = reader(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise AuditError(f"{dp} is not a valid .npy file: {e}") from None
    if fortran or fdtype != dtype:
        raise AuditError(f"{dp}: expected a C-order {dtype.str} matrix, found {fdtype.str}"
                         f"{' (Fortran order)' if fortran else ''}")
    if len(shape) != 2 or shape[0] != n or (dim is not None and shape[1] != dim):
        raise AuditError(f"corpus is inconsistent: {dp.name} has shape {shape}, {META_FILE} says ({n}, {dim}) "
                         f"(an interrupted write?)")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    size = dp.stat().st_size
    if size != expected:
        raise AuditError(f"{dp} is truncated or padded: {size} bytes, expected {expected}")
    if shape[0] * shape[1] == 0:
        return np.zeros(shape, dtype=dtype)
    return np.load(dp, mmap_mode="r")


def load_corpus(path, verify: bool | None = None) -> Corpus:
    return Corpus.open(path, verify=verify)


def _as_corpus(corpus) -> Corpus:
    return corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)


# --------------------------------------------------------------------------- import / export


def _read_carlos_parquet(src: Path) -> tuple[dict, np.ndarray, str, list]:
    try:
        t = pq.read_table(src)
    except (pa.ArrowException, OSError) as e:
        raise AuditError(f"{src} cannot be read as Parquet: {' '.join(str(e).split())[:200]}") from None
    missing = [c for c in CARLOS_COLUMNS if c not in t.column_names]
    if missing:
        raise AuditError(f"{src} lacks the CARLoS column(s) {', '.join(missing)}")
    ignored = [c for c in t.column_names if c not in CARLOS_COLUMNS]
    n = t.num_rows
    vid = t.column("version_id")
    if not pa.types.is_integer(vid.type):
        raise AuditError(f"{src}: version_id must be integers, found {vid.type}")
    if vid.null_count:
        raise AuditError(f"{src}: {vid.null_count} row(s) have no version_id")
    ids = [str(int(x)) for x in vid.to_pylist()]
    col = t.column("direction").combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise AuditError(f"{src}: direction must be a list of floats, found {col.type}")
    vtype = col.type.value_type
    if not pa.types.is_floating(vtype):
        raise AuditError(f"{src}: direction values must be floats, found {vtype}")
    if col.null_count:
        bad = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
        raise AuditError(f"{src}: row {ids[bad]} has no direction")
    lengths = _np(pc.list_value_length(col)) if n else np.zeros(0, int)
    dim = int(lengths[0]) if n else 0
    if n and (lengths != dim).any():
        bad = int(np.argmax(lengths != dim))
        raise AuditError(f"{src}: direction of row {ids[bad]} has {lengths[bad]} values, expected {dim} "
                         f"(the first row's length)")
    flat = col.flatten()
    if flat.null_count:
        raise AuditError(f"{src}: a direction holds null values")
    source_dtype = "float32" if pa.types.is_float32(vtype) else "float64"
    flat = flat.cast(pa.float32() if source_dtype == "float32" else pa.float64())
    directions = _np(flat).reshape(n, dim)

    def ints(name):
        c = t.column(name)
        if not (pa.types.is_integer(c.type) or pa.types.is_null(c.type)):
            raise AuditError(f"{src}: {name} must be integers, found {c.type}")
        return c.cast(pa.int64())

    def texts(name):
        c = t.column(name)
        if not (pa.types.is_string(c.type) or pa.types.is_large_string(c.type) or pa.types.is_null(c.type)):
            raise AuditError(f"{src}: {name} must be text, found {c.type}")
        return c.cast(pa.string())

    def floats(name):
        c = t.column(name)
        if not (pa.types.is_floating(c.type) or pa.types.is_integer(c.type)):
            raise AuditError(f"{src}: {name} must be numbers, found {c.type}")
        return _np(c.cast(pa.float64()))

    cols = {
        "id": ids, "name": texts("model_name"), "model_id": ints("model_id"),
        "folder_name": texts("folder_name"), "description": texts("model_description"),
        "download_count": ints("model_download_count"), "nsfw_level": ints("model_nsfw_level"),
        "strength": floats("strength"), "consistency": floats("consistency"),
    }
    return cols, directions, source_dtype, ignored


def _parse_direction(text: str, where: str) -> list[float]:
    s = text.strip()
    try:
        if s.startswith("["):
            vals = json.loads(s)
            if not isinstance(vals, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
                raise ValueError("not a list of numbers")
            return [float(x) for x in vals]
        return [float(x) for x in re.split(r"[,\s]+", s) if x]
    except ValueError as e:
        raise AuditError(f"{where}: direction is not a JSON list or a space/comma separated list of "
                         f"numbers ({e})") from None


def _read_carlos_csv(src: Path) -> tuple[dict, np.ndarray, str, list]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)
    try:
        with open(src, "r", encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in CARLOS_COLUMNS if c not in header]
            if missing:
                raise AuditError(f"{src} lacks the CARLoS column(s) {', '.join(missing)}")
            ignored = [c for c in header if c not in CARLOS_COLUMNS]
            cols = {k: [] for k in ("id", "name", "model_id", "folder_name", "description",
                                    "download_count", "nsfw_level", "strength", "consistency")}
            dirs: list[list[float]] = []

            def num(rec, name, conv, where, nullable=True):
                v = rec[name]
                if v is None:
                    raise AuditError(f"{where}: the line has too few fields")
                if v.strip() == "":
                    if nullable:
                        return None
                    raise AuditError(f"{where}: {name} is empty")
                try:
                    return conv(v.strip())
                except ValueError:
                    raise AuditError(f"{where}: {name} {v[:40]!r} is not a valid number") from None

            for rec in reader:
                where = f"{src} line {reader.line_num}"
                if None in rec:
                    raise AuditError(f"{where}: the line has more fields than the header")
                vid = num(rec, "version_id", int, where, nullable=False)
                cols["id"].append(str(vid))
                cols["model_id"].append(num(rec, "model_id", int, where))
                cols["nsfw_level"].append(num(rec, "model_nsfw_level", int, where))
                cols["download_count"].append(num(rec, "model_download_count", int, where))
                cols["strength"].append(num(rec, "strength", float, where, nullable=False))
                c = num(rec, "consistency", float, where)
                cols["consistency"].append(np.nan if c is None else c)
                cols["name"].append(rec["model_name"])
                cols["folder_name"].append(rec["folder_name"])
                cols["description"].append(rec["model_description"])
                dirs.append(_parse_direction(rec["direction"], where))
    except UnicodeDecodeError as e:
        raise AuditError(f"{src} is not UTF-8 text: {e}") from None
    except csv.Error as e:
        raise AuditError(f"{src} is not a valid CSV file: {e}") from None
    finally:
        csv.field_size_limit(old_limit)
    n = len(dirs)
    dim = len(dirs[0]) if n else 0
    for i, d in enumerate(dirs):
        if len(d) != dim:
            raise AuditError(f"{src}: direction of row {cols['id'][i]} has {len(d)} values, expected {dim} "
                             f"(the first row's length)")
    directions = np.array(dirs, dtype=np.float64).reshape(n, dim)
    cols["strength"] = np.array(cols["strength"], dtype=np.float64)
    cols["consistency"] = np.array(cols["consistency"], dtype=np.float64)
    return cols, directions, "float64 (decimal text)", ignored


def _lossless_dtype(directions: np.ndarray) -> str:
    """float32 when every value survives float32 exactly (NaN never does), else float64."""
    if directions.dtype == np.float32:
        return "float32"
    with np.errstate(over="ignore"):
        as32 = directions.astype(np.float32)
    return "float32" if np.array_equal(as32.astype(np.float64), directions) else "float64"


def import_carlos_db(src, dest, preset: str | None = "carlos-sdxl-vitb32", *, overwrite: bool = False,
                     name: str | None = None) -> Corpus:
    """Import the public CARLoS metrics database (Parquet, or CSV from ``export_carlos_csv``).

    Keeps every row and value: directions are stored as float32 when every value is exactly a
    float32 (true of the published file, whose float64 column holds float32 values), else float64.
    """
    src = Path(src)
    if not src.is_file():
        raise AuditError(f"no such file: {src}")
    with open(src, "rb") as f:
        magic = f.read(4)
    if src.suffix.lower() in (".parquet", ".pq") or magic == b"PAR1":
        fmt = "parquet"
        cols, directions, source_dtype, ignored = _read_carlos_parquet(src)
    elif src.suffix.lower() in (".csv", ".txt"):
        fmt = "csv"
        cols, directions, source_dtype, ignored = _read_carlos_csv(src)
    else:
        raise AuditError(f"{src}: expected a .parquet or .csv file")
    if preset is not None:
        signature = preset_signature(preset)
        if directions.shape[1] != _CARLOS_PRESET_NOTES["dim"]:
            raise AuditError(f"{src}: directions have {directions.shape[1]} values; preset {preset} "
                             f"(CLIP ViT-B/32) expects {_CARLOS_PRESET_NOTES['dim']}")
    else:
        signature = empty_signature()
    if not np.isfinite(directions).all():
        bad = int(np.argmin(np.isfinite(directions).all(axis=1)))
        raise AuditError(f"{src}: direction of row {cols['id'][bad]} has non-finite values")
    dtype = _lossless_dtype(directions)
    cols["source"] = ["carlos-public-db"] * len(cols["id"])
    created_from = {
        "kind": "carlos-db", "format": fmt, "path": str(src.resolve()), "size": src.stat().st_size,
        "sha256": sha256_file(src), "source_direction_dtype": source_dtype, "ignored_columns": ignored,
    }
    extra = {"preset": preset, "preset_notes": dict(_CARLOS_PRESET_NOTES) if preset else None}
    dest = Path(dest)
    with (_locked(dest) if dest.is_dir() else contextlib.nullcontext()):
        return create_corpus(dest, directions=directions.astype(DTYPES[dtype], copy=False), rows=cols,
                             signature=signature, name=name or src.stem, created_from=created_from,
                             dtype=dtype, overwrite=overwrite, extra_meta=extra, _protect=src)


def export_carlos_csv(corpus, dest) -> Path:
    """Write a corpus as CSV in the CARLoS column layout (direction as a JSON list).

    Floats are written with ``repr`` (shortest text that reads back to the same float64), so
    importing the CSV gives back the same values; empty numeric fields are nulls. Text nulls are
    written as empty text (CSV cannot tell them apart). Ids must be integers (Civitai version ids).
    """
    c = _as_corpus(corpus)
    dest = Path(dest)
    d = c.rows.to_pydict()
    for rid in d["id"]:
        if not re.fullmatch(r"-?[0-9]+", rid) or str(int(rid)) != rid:
            raise AuditError(f"row id {rid!r} is not a Civitai version id; the CARLoS CSV layout needs integers")

    def opt(v):
        return "" if v is None else repr(v) if isinstance(v, float) else str(v)

    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CARLOS_COLUMNS)
    for i in range(c.n):
        direction = json.dumps([float(x) for x in np.asarray(c.directions[i], dtype=np.float64)])
        w.writerow([
            d["id"][i], opt(d["model_id"][i]), d["name"][i] or "", d["description"][i] or "",
            opt(d["nsfw_level"][i]), d["folder_name"][i] or "", direction, repr(float(d["strength"][i])),
            opt(d["consistency"][i]), opt(d["download_count"][i]),
        ])
    write_bytes_atomic(dest, buf.getvalue().encode("utf-8"))
    return dest


# --------------------------------------------------------------------------- neighbours


def _topk_pools(c: Corpus, queries: np.ndarray, k: int, exclude_rows: np.ndarray) -> list[np.ndarray]:
    """Per query, the candidate rows that certainly contain its top-k by float64 cosine.

    Scores are computed in the storage dtype chunk by chunk; a row is kept when its score is
    at least (k-th best score so far) - 2 * tol, tol bounding the storage-dtype error. Cosines
    lie in [-1, 1], so the starting threshold -3 admits every row; excluded rows score -inf.
    """
    m, n = queries.shape[0], c.n
    tol = _PREFILTER_TOL[c.dtype]
    floor = -3.0
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    qs = np.ascontiguousarray(qn.astype(c.directions.dtype))  # (m, dim)
    inv = c._inverse_norms()
    thr = np.full(m, floor)
    cand_rows: list[list[np.ndarray]] = [[] for _ in range(m)]
    cand_vals: list[list[np.ndarray]] = [[] for _ in range(m)]
    cand_count = np.zeros(m, dtype=np.int64)
    step = max(1024, _CHUNK_ELEMENTS // max(m, 1)) if _CHUNK_ELEMENTS >= 1024 else max(1, _CHUNK_ELEMENTS)
    for start in range(0, n, step):
        blk = c.directions[start:start + step]
        s = qs @ blk.T  # (m, rows), C order
        s *= inv[start:start + step]
        w = s.shape[1]
        inside = (exclude_rows >= start) & (exclude_rows < start + w)
        if inside.any():
            qi = np.nonzero(inside)[0]
            s[qi, exclude_rows[qi] - start] = -np.inf
        need = thr == floor
        if need.any() and w >= k:
            kth = np.partition(s[need], w - k, axis=1)[:, w - k].astype(np.float64)
            thr[need] = np.maximum(kth - 2 * tol, floor)
        qi, ri = np.nonzero(s >= thr.astype(s.dtype)[:, None])
        if qi.size == 0:
            continue
        vals = s[qi, ri].astype(np.float64)
        bounds = np.searchsorted(qi, np.arange(m + 1))
        for j in np.nonzero(np.diff(bounds))[0]:
            a, b = bounds[j], bounds[j + 1]
            cand_rows[j].append(ri[a:b] + start)
            cand_vals[j].append(vals[a:b])
            cand_count[j] += b - a
            if cand_count[j] > 4 * k + 256:
                r, v = np.concatenate(cand_rows[j]), np.concatenate(cand_vals[j])
                kth = np.partition(v, v.size - k)[v.size - k]
                thr[j] = max(thr[j], kth - 2 * tol)
                keep = v >= thr[j]
                cand_rows[j], cand_vals[j] = [r[keep]], [v[keep]]
                cand_count[j] = int(keep.sum())
    pools = []
    for j in range(m):
        if not cand_rows[j]:
            pools.append(np.zeros(0, dtype=np.int64))
            continue
        r, v = np.concatenate(cand_rows[j]), np.concatenate(cand_vals[j])
        if v.size > k:
            kth = np.partition(v, v.size - k)[v.size - k]
            r = r[v >= kth - 2 * tol]
        pools.append(np.sort(r))
    return pools


def _rank_pool(c: Corpus, q: np.ndarray, pool: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Exact float64 cosine on the pool rows; sorted by similarity descending, then id."""
    if pool.size == 0:
        return []
    x = np.asarray(c.directions[pool], dtype=np.float64)
    sims = (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    all_ids = c.ids
    ids = [all_ids[i] for i in pool]
    order = sorted(range(pool.size), key=lambda i: (-sims[i], ids[i]))[:k]
    return [(int(pool[i]), float(sims[i])) for i in order]


def nearest(corpus, vectors, top_k: int = 10, exclude_rows=None) -> list[list[tuple[int, float]]]:
    """For each query vector: [(row, cosine), ...] best first (ties by id), at most ``top_k``.

    ``vectors`` is (m, dim); ``exclude_rows`` gives per query a row to leave out (-1: none).
    Works in chunks, so 1,000 queries against 1M rows stay within a few hundred MB.
    """
    c = _as_corpus(corpus)
    q = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    m = q.shape[0]
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise AuditError(f"top_k must be a positive integer, got {top_k!r}")
    if c.n == 0 or m == 0:
        return [[] for _ in range(m)]
    if q.shape[1] != c.dim:
        raise AuditError(f"a direction has {q.shape[1]} values; corpus {c.path} has dim {c.dim}")
    ex = np.full(m, -1, dtype=np.int64) if exclude_rows is None else np.asarray(exclude_rows, dtype=np.int64)
    qnorm = np.linalg.norm(q, axis=1)
    out: list[list] = [[] for _ in range(m)]
    live = np.nonzero(np.isfinite(qnorm) & (qnorm > 0))[0]  # a zero direction has no neighbours
    if live.size == 0:
        return out
    eligible = c.n - (ex[live] >= 0).astype(int)
    k = int(min(top_k, c.n))
    pools = _topk_pools(c, q[live], k, ex[live])
    for j, qi in enumerate(live):
        out[qi] = _rank_pool(c, q[qi], pools[j], min(k, int(eligible[j])))
    return out


def _entry(c: Corpus, row: int, sim: float) -> dict:
    r = c.row(row, ["id", "name"])
    cons = c.consistency[row]
    return {"id": r["id"], "name": r["name"] if r["name"] is not None else "", "similarity": sim,
            "strength": float(c.strength[row]), "consistency": None if np.isnan(cons) else float(cons)}


def _result(c: Corpus, hits, strength, consistency, exclude: int | None) -> dict:
    return {
        "strength_percentile": c._percentile("strength", strength, exclude),
        "consistency_percentile": c._percentile("consistency", consistency, exclude),
        "neighbours": [_entry(c, r, s) for r, s in hits],
    }


def neighbours(corpus, ids, top_k: int = 10) -> dict:
    """``{id: {strength_percentile, consistency_percentile, neighbours: [...]}}`` (see CORPUS.md)."""
    c = _as_corpus(corpus)
    if isinstance(ids, (str, int)):
        ids = [ids]
    ids = list(dict.fromkeys(str(i) for i in ids))
    idx = c.indices_of(ids)
    hits = nearest(c, np.asarray(c.directions[idx], dtype=np.float64), top_k, exclude_rows=idx)
    out = {}
    for rid, i, h in zip(ids, idx, hits):
        cons = c.consistency[i]
        out[rid] = _result(c, h, c.strength[i], None if np.isnan(cons) else cons, int(i))
    return out


def neighbours_for_vector(corpus, direction, strength, consistency, top_k: int = 10,
                          exclude_id: str | None = None) -> dict:
    """The same object as one entry of ``neighbours`` for a profile that is not (or is) in the corpus.

    ``exclude_id`` leaves that row out of the neighbours and the percentiles when it is in the
    corpus (an id the corpus lacks is ignored). An all-zero direction has no neighbours.
    """
    c = _as_corpus(corpus)
    d = np.asarray(direction, dtype=np.float64).ravel()
    if c.dim is not None and d.size != c.dim:
        raise AuditError(f"the direction has {d.size} values; corpus {c.path} has dim {c.dim}")
    if not np.isfinite(d).all():
        raise AuditError("the direction has non-finite values")
    if strength is None or not math.isfinite(float(strength)):
        raise AuditError("strength must be a finite number")
    ex = None
    if exclude_id is not None:
        ex = c._lookup([str(exclude_id)]).get(str(exclude_id))
    hits = nearest(c, d[None, :], top_k, exclude_rows=[-1 if ex is None else ex])[0] if c.n else []
    return _result(c, hits, float(strength), consistency, ex)


# --------------------------------------------------------------------------- summary


def _summary(x: np.ndarray) -> dict | None:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return None
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"count": int(x.size), "min": float(x.min()), "median": float(np.median(x)), "max": float(x.max()),
            "mean": float(x.mean()),
            "quantiles": {"p05": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]),
                          "p95": float(q[4])}}


def stats(corpus) -> dict:
    """Size, signature, provenance and distributions of a corpus (JSON-ready)."""
    c = _as_corpus(corpus)
    sources = {}
    if c.n:
        for v in c.column("source").to_pylist():
            key = "(none)" if v is None else v
            sources[key] = sources.get(key, 0) + 1
    return {
        "path": str(c.path), "name": c.name, "n": c.n, "dim": c.dim, "dtype": c.dtype,
        "signature": c.signature, "preset": c.meta.get("preset"), "created_from": c.meta.get("created_from"),
        "directions_sha256": c.meta["directions_sha256"], "rows_sha256": c.meta["rows_sha256"],
        "sources": dict(sorted(sources.items())),
        "strength": _summary(c.strength.astype(np.float64)),
        "consistency": _summary(c.consistency.astype(np.float64)),
        "consistency_missing": int(np.isnan(c.consistency).sum()),
        "direction_norm": _summary(c.storage_norms().astype(np.float64)),
    }


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
    with _locked(cpath):
        c = Corpus.open(cpath, verify=True)
        if c.dim and d.size != c.dim:
            raise AuditError(f"the case direction has {d.size} values; corpus {cpath} has dim {c.dim}")
        dim = c.dim if c.n else d.size
        comp = require_compatible(c.signature, sig, allow_incompatible)
        if c._lookup([rid]):
            raise AuditError(f"corpus {cpath} already has a row with id {rid!r}; pass --id to choose another")
        lora_path = lora.get("path")
        label = name or (Path(lora_path).name if isinstance(lora_path, str) and lora_path else rid)
        notes = []
        if comp["differing"]:
            notes.append("added with --allow-incompatible; differing signature fields: " + ", ".join(comp["differing"]))
        if comp["unverifiable"]:
            notes.append("unverifiable signature fields: " + ", ".join(comp["unverifiable"]))
        dtype = c.dtype
        if dtype == "float32" and not np.array_equal(d.astype(np.float32).astype(np.float64), d):
            dtype = "float64"
        n = c.n + 1
        writer = _NpyWriter(cpath / DIRECTIONS_FILE, n, dim, DTYPES[dtype])
        try:
            step = max(1, _CHUNK_ELEMENTS // max(dim, 1))
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
        _commit(cpath, meta, staged, dirs_sha, table)
    row = new.to_pylist()[0]
    row.update(comp)
    return row
