"""A reference corpus of CARLoS profiles, opened: header, rows, memory-mapped directions.

A corpus is a folder (layout and definitions in ``docs/CORPUS.md``)::

    corpus.json      header: schema, name, n, dim, dtype, signature, provenance, file hashes
    rows.parquet     one row per LoRA (id, name, source, strength, consistency, ...; ``row``
                     is the index into the direction matrix)
    directions.npy   n x dim little-endian float32 (or float64) matrix, C order, memory-mapped

This module must start fast: it imports numpy and pyarrow only (never torch, never pandas), so
``carlos-audit corpus ...`` answers in well under a second.

Writing a corpus is in write.py; search (neighbours, percentiles) in search.py; the
CARLoS database import in carlos.py; adding a finished case in cases.py.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_bytes, sha256_file

SCHEMA = "carlos-audit/corpus/1"
META_FILE = "corpus.json"
ROWS_FILE = "rows.parquet"
DIRECTIONS_FILE = "directions.npy"
BUILD_CASES_DIR = "cases"
# known error rates, derived from the files above and recomputed when they change (validate.py)
TABLES_FILE = "error_tables.npy"
WHITENING_FILE = "whitening.npy"
CORPUS_FILES = (META_FILE, ROWS_FILE, DIRECTIONS_FILE, TABLES_FILE, WHITENING_FILE)

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
CHUNK_ELEMENTS = 1 << 24
# Bound on |cosine computed in the storage dtype - cosine computed in float64| (see CORPUS.md).
PREFILTER_TOL = {"float32": 2e-4, "float64": 1e-9}
# A consistency is a mean of cosines: in [-1, 1], up to this rounding slack.
CONSISTENCY_SLACK = 1e-9

# --------------------------------------------------------------------------- row values


def direction_fault(block: np.ndarray, squares: np.ndarray | None = None) -> tuple[int, str] | None:
    """The first row of a block of directions that is no direction (index in the block, why), or
    None: every row finite with a non-zero norm in its own dtype (``squares``: the rows' squared
    norms, when the caller has them). One pass over the block; only a faulty row is looked at again."""
    if squares is None:
        squares = np.einsum("ij,ij->i", block, block)
    ok = np.isfinite(squares) & (squares > 0)
    if ok.all():
        return None
    i = int(np.argmin(ok))
    row = np.asarray(block[i])
    if not np.isfinite(row).all():
        return i, "has non-finite values (NaN or Inf)"
    if not row.any():
        return i, "is all zero (cosine similarity is undefined)"
    if not np.isfinite(squares[i]):
        return i, f"is too large for {row.dtype} arithmetic (its squared norm overflows)"
    return i, f"is too small for {row.dtype} arithmetic (its squared norm underflows to zero)"


def value_fault(strength: np.ndarray, consistency: np.ndarray | None) -> tuple[int, str] | None:
    """The first row whose strength is not a finite number >= 0, or whose consistency is neither
    undefined (NaN) nor in [-1, 1] (index, why); None when every row is valid."""
    bad = ~(np.isfinite(strength) & (strength >= 0))
    if bad.any():
        i = int(np.argmax(bad))
        return i, f"strength {float(strength[i])!r} is not a finite number >= 0"
    if consistency is not None:
        with np.errstate(invalid="ignore"):
            bad = ~(np.isnan(consistency) | (np.abs(consistency) <= 1 + CONSISTENCY_SLACK))
        if bad.any():
            i = int(np.argmax(bad))
            return i, f"consistency {float(consistency[i])!r} is outside [-1, 1]"
    return None


# --------------------------------------------------------------------------- the store


def column_array(col) -> np.ndarray:
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


def dupes(id_arr) -> str:
    seen, dup = set(), []
    for x in id_arr.to_pylist():
        if x is None:
            return "a row has no id"
        if x in seen and x not in dup:
            dup.append(x)
        seen.add(x)
    return "duplicate id(s) " + ", ".join(dup[:5]) + (" ..." if len(dup) > 5 else "")


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
        self.strength = column_array(self.column("strength"))
        self.consistency = column_array(self.column("consistency"))

    def check_values(self) -> None:
        """Every row's values valid (``value_fault``) and every direction a direction
        (``direction_fault``), read in chunks of CHUNK_ELEMENTS values; the row norms computed on
        the way are the ones search uses (``storage_norms``). AuditError naming the first bad row."""
        fault = value_fault(self.strength, self.consistency)
        if fault is not None:
            raise AuditError(f"corpus {self.path}: row {self.ids[fault[0]]!r} (row {fault[0]}): {fault[1]}")
        out = np.empty(self.n, dtype=self.directions.dtype)
        step = max(1, CHUNK_ELEMENTS // max(self.dim or 1, 1))
        for s in range(0, self.n, step):
            blk = self.directions[s:s + step]
            squares = np.einsum("ij,ij->i", blk, blk)
            fault = direction_fault(blk, squares)
            if fault is not None:
                i = s + fault[0]
                raise AuditError(f"corpus {self.path}: the direction of row {self.ids[i]!r} (row {i}) {fault[1]}")
            out[s:s + step] = np.sqrt(squares)
        self._norms = out

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
        if verify is None:
            verify = rp.stat().st_size + dp.stat().st_size <= AUTO_VERIFY_BYTES
        # one read of the file: whole and hashed when it is verified and small enough, else mapped
        whole = verify and dp.stat().st_size <= AUTO_VERIFY_BYTES
        directions, digest = _open_directions(dp, n, dim, dtype, whole=whole)
        c = cls(p, meta, directions)
        if verify:
            c.verify({DIRECTIONS_FILE: digest})
        c.check_values()
        return c

    def verify(self, digests: dict | None = None) -> None:
        """Check both data files against the sha256 in corpus.json, and that ids are unique.
        ``digests``: {file name: sha256} already computed from the bytes just read (``open``);
        the other files are hashed here."""
        for fname, key in ((DIRECTIONS_FILE, "directions_sha256"), (ROWS_FILE, "rows_sha256")):
            digest = (digests or {}).get(fname) or sha256_file(self.path / fname)
            if digest != self.meta[key]:
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
                raise AuditError(f"{self.path / ROWS_FILE} is garbled: {dupes(pa.array(ids, pa.string()))}")
            self._index = index
        return self._index

    def lookup(self, ids: list[str]) -> dict:
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
        found = self.lookup(ids)
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

    def percentile(self, name: str, v, exclude: int | None) -> float | None:
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
            step = max(1, CHUNK_ELEMENTS // max(self.dim or 1, 1))
            for s in range(0, self.n, step):
                blk = self.directions[s:s + step]
                out[s:s + step] = np.sqrt(np.einsum("ij,ij->i", blk, blk))
            self._norms = out
        return self._norms

    def inverse_norms(self) -> np.ndarray:
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
        if rowcol.null_count or not np.array_equal(column_array(rowcol), np.arange(n)):
            raise AuditError(f"{rp} is garbled: column row must be 0..n-1 in order")


def _open_directions(dp: Path, n: int, dim: int | None, dtype: np.dtype, whole: bool) -> tuple[np.ndarray, str | None]:
    """The direction matrix, from one open of the file: read whole and hashed (``whole``: the
    corpus is verified on opening; returns the sha256 of the bytes read), else memory-mapped."""
    import io

    try:
        with open(dp, "rb") as f:
            raw = f.read() if whole else None
            src = io.BytesIO(raw) if whole else f
            version = np.lib.format.read_magic(src)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, fdtype = reader(src)
            offset = src.tell()
            size = len(raw) if whole else os.fstat(f.fileno()).st_size
            _check_directions(dp, (shape, fortran, fdtype, offset, size), n, dim, dtype)
            if shape[0] * shape[1] == 0:
                return np.zeros(shape, dtype=dtype), sha256_bytes(raw) if whole else None
            if whole:
                return np.frombuffer(raw, dtype=dtype, count=shape[0] * shape[1], offset=offset).reshape(shape), sha256_bytes(raw)
            return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape), None
    except (ValueError, OSError, SyntaxError) as e:
        raise AuditError(f"{dp} is not a valid .npy file: {e}") from None


def _check_directions(dp: Path, header: tuple, n: int, dim: int | None, dtype: np.dtype) -> None:
    shape, fortran, fdtype, offset, size = header
    if fortran or fdtype != dtype:
        raise AuditError(f"{dp}: expected a C-order {dtype.str} matrix, found {fdtype.str}"
                         f"{' (Fortran order)' if fortran else ''}")
    if len(shape) != 2 or shape[0] != n or (dim is not None and shape[1] != dim):
        raise AuditError(f"corpus is inconsistent: {dp.name} has shape {shape}, {META_FILE} says ({n}, {dim}) "
                         f"(an interrupted write?)")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    if size != expected:
        raise AuditError(f"{dp} is truncated or padded: {size} bytes, expected {expected}")


def load_corpus(path, verify: bool | None = None) -> Corpus:
    return Corpus.open(path, verify=verify)


def as_corpus(corpus) -> Corpus:
    return corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)


