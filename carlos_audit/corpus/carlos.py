"""The public CARLoS metrics database: import (Parquet or CSV) with its preset, and CSV export."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from carlos_audit.case.signature import empty_signature, preset_signature
from carlos_audit.corpus.store import DTYPES, Corpus, as_corpus, column_array
from carlos_audit.corpus.write import create_corpus, locked
from carlos_audit.errors import AuditError
from carlos_audit.fileio import write_bytes_atomic
from carlos_audit.hashing import sha256_file

#: Columns of the public CARLoS metrics database (Parquet or CSV), all required on import.
CARLOS_COLUMNS = (
    "version_id", "model_id", "model_name", "model_description", "model_nsfw_level",
    "folder_name", "direction", "strength", "consistency", "model_download_count",
)

CARLOS_PRESET_NOTES = {
    "source": "shahar-sarfaty/CARLoS src/carlos/data/metrics_database.parquet (Apache-2.0)",
    "prompts": "carlos:indexing (280 prompts: 10 categories x 35 subcategories x 8)",
    "embedder_preprocessing": "CLIPProcessor of transformers 4 (its PIL/NumPy image processor, the default then; "
                              "the tool pins backend pil); raw (unnormalised) get_image_features, float32",
    "watermarker": "unknown: carlos/index.py loads StableDiffusionXLPipeline without add_watermarker, so diffusers "
                   "watermarked every image if and only if the optional invisible-watermark package was installed, "
                   "which the reference does not record; the tool passes add_watermarker = false unless the case "
                   "file sets it",
    "base_model_dtype": "fp16",
    "dim": 512,
}

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
    directions, source_dtype = _parquet_directions(src, t.column("direction").combine_chunks(), ids, n)

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
        return column_array(c.cast(pa.float64()))

    cols = {
        "id": ids, "name": texts("model_name"), "model_id": ints("model_id"),
        "folder_name": texts("folder_name"), "description": texts("model_description"),
        "download_count": ints("model_download_count"), "nsfw_level": ints("model_nsfw_level"),
        "strength": floats("strength"), "consistency": floats("consistency"),
    }
    return cols, directions, source_dtype, ignored


def _parquet_directions(src: Path, col, ids: list[str], n: int) -> tuple[np.ndarray, str]:
    """The CARLoS ``direction`` list column as an (n, dim) matrix in its stored float type, and
    that type's name; every row present, of one length, without nulls."""
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise AuditError(f"{src}: direction must be a list of floats, found {col.type}")
    vtype = col.type.value_type
    if not pa.types.is_floating(vtype):
        raise AuditError(f"{src}: direction values must be floats, found {vtype}")
    if col.null_count:
        bad = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
        raise AuditError(f"{src}: row {ids[bad]} has no direction")
    lengths = column_array(pc.list_value_length(col)) if n else np.zeros(0, int)
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
    return column_array(flat).reshape(n, dim), source_dtype


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
                     name: str | None = None, origin: dict | None = None, extra_meta: dict | None = None) -> Corpus:
    """Import the public CARLoS metrics database (Parquet, or CSV from ``export_carlos_csv``).

    Keeps every row and value: directions are stored as float32 when every value is exactly a
    float32 (true of the published file, whose float64 column holds float32 values), else float64.
    ``origin`` replaces the recorded source path (e.g. a wheel member: corpus/public.py);
    ``extra_meta`` adds keys to the corpus header.
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
        if directions.shape[1] != CARLOS_PRESET_NOTES["dim"]:
            raise AuditError(f"{src}: directions have {directions.shape[1]} values; preset {preset} "
                             f"(CLIP ViT-B/32) expects {CARLOS_PRESET_NOTES['dim']}")
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
    if origin is not None:
        created_from = dict(created_from, path=None, **origin)
    extra = {"preset": preset, "preset_notes": dict(CARLOS_PRESET_NOTES) if preset else None, **(extra_meta or {})}
    dest = Path(dest)
    with (locked(dest) if dest.is_dir() else contextlib.nullcontext()):
        return create_corpus(dest, directions=directions.astype(DTYPES[dtype], copy=False), rows=cols,
                             signature=signature, name=name or src.stem, created_from=created_from,
                             dtype=dtype, overwrite=overwrite, extra_meta=extra, protect=src)


def export_carlos_csv(corpus, dest) -> Path:
    """Write a corpus as CSV in the CARLoS column layout (direction as a JSON list).

    Floats are written with ``repr`` (shortest text that reads back to the same float64), so
    importing the CSV gives back the same values; empty numeric fields are nulls. Text nulls are
    written as empty text (CSV cannot tell them apart). Ids must be integers (Civitai version ids).
    """
    c = as_corpus(corpus)
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


