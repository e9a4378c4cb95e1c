"""Known error rates of the neighbour method, measured on a corpus and stored with it.

A corpus whose rows carry a ``model_id`` (the public CARLoS corpus: Civitai model ids, several
versions of one model share one) holds a ground truth no one tuned for: two rows with the same
model id are *related* (versions of one model), two rows with different known ids are
*unrelated*. From it, per similarity measure:

- the **false-match table**: every pairwise similarity of unrelated rows and of related rows,
  sorted. The share of unrelated pairs at or above a similarity ``s`` is its false-match rate;
  the share of related pairs at or above ``s`` is how often versions of one model reach it.
  A corpus without model ids has no related pairs: then *all* pairs count as unrelated, and the
  record says so (``basis``: ``"all pairs"``).
- **version-sibling recall@k**: a query is every row whose model id has another row; it is a hit
  at k when a row with the same id is among its k nearest other rows.
- a **split-half evaluation**: model-id groups (and rows without a sibling) are split at random
  into halves; the whitening is fitted on one half only and recall is scored on the other half,
  searching among that half's rows; repeated over ``N_SPLITS`` splits (mean and spread).

Two measures (``MEASURES``):

- ``cosine``: the CARLoS cosine of directions (the published method, the default);
- ``whitened``: the cosine after centring on the corpus mean and whitening with a Ledoit-Wolf
  shrinkage covariance, ``z = W (d - mean)``, ``W = C^-1/2``, ``C = (1 - a) S + a (tr S / dim) I``,
  with ``S`` the sample covariance and ``a`` the Ledoit-Wolf (2004) shrinkage: fitted on the
  corpus's directions alone, without labels and without a tuning parameter.

Files (in the corpus folder, hashed in ``corpus.json`` under ``validation``):

    error_tables.npy   1-D float32: the sorted similarity arrays, concatenated (offsets in the record)
    whitening.npy      (dim + 1, dim) float64: row 0 the mean, rows 1.. the symmetric matrix W

The record names the corpus file hashes it was computed from; a corpus changed since (a row
added) is recomputed on first use. A corpus of more than ``MAX_TABLE_ROWS`` rows is measured on
a fixed random sample of that many rows (said in the record). No torch import.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np

from carlos_audit.corpus.store import META_FILE, TABLES_FILE, WHITENING_FILE, Corpus, as_corpus, column_array
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json, write_bytes_atomic, write_json_atomic
from carlos_audit.hashing import sha256_bytes

VALIDATION_SCHEMA = "carlos-audit/corpus-validation/1"
VALIDATION_FILES = (TABLES_FILE, WHITENING_FILE)
MEASURES = ("cosine", "whitened")
MEASURE_TEXT = {
    "cosine": "cosine of directions (CARLoS)",
    "whitened": "cosine after centring and Ledoit-Wolf whitening on the corpus",
}
THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: false-match rates at which the measures are compared (the thresholds differ per measure)
OPERATING_RATES = (0.01, 0.001, 0.0001)
RECALL_K = (1, 5, 10)
N_SPLITS = 20
SPLIT_SEED = 0
MAX_TABLE_ROWS = 2000
SAMPLE_SEED = 0
BASIS_MODEL_ID = "different model id (rows without a model id left out)"
BASIS_ALL = "all pairs (the corpus has no model ids, so no pair is known to be related)"

# --------------------------------------------------------------------------- the measures


def fit_whitening(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``(mean, W, shrinkage)`` of the Ledoit-Wolf whitening of rows ``x`` (None: fewer than two
    rows, or no variance). ``W`` is symmetric, ``W = C^-1/2`` (see the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    if n < 2 or p == 0:
        return None
    mean = x.mean(axis=0)
    xc = x - mean
    s = xc.T @ xc / n
    mu = float(np.trace(s)) / p
    if not mu > 0:
        return None
    d2 = float(((s - mu * np.eye(p)) ** 2).sum())
    sq = np.einsum("ij,ij->i", xc, xc)
    b2 = float((sq ** 2 - 2 * np.einsum("ij,ij->i", xc @ s, xc) + (s ** 2).sum()).sum()) / n ** 2
    shrink = 1.0 if d2 <= 0 else min(max(b2, 0.0), d2) / d2
    c = (1 - shrink) * s + shrink * mu * np.eye(p)
    w, v = np.linalg.eigh(c)
    w = np.maximum(w, mu * 1e-12)
    return mean, (v * w ** -0.5) @ v.T, float(shrink)


def transform(x: np.ndarray, measure: str, whitening: tuple | None) -> np.ndarray | None:
    """Rows mapped into the space where the measure is a plain cosine (None: not available)."""
    x = np.asarray(x, dtype=np.float64)
    if measure == "cosine":
        return x
    if measure == "whitened":
        return None if whitening is None else (x - whitening[0]) @ whitening[1]
    raise AuditError(f"unknown similarity measure {measure!r} (one of {', '.join(MEASURES)})")


def unit_rows(y: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    return np.divide(y, norms, out=np.zeros_like(y), where=norms > 0)


def similarity(measure: str, whitening, a, b) -> float | None:
    """The measure between two directions (None when undefined: a zero vector, no whitening)."""
    y = transform(np.stack([np.ravel(a), np.ravel(b)]), measure, whitening)
    if y is None:
        return None
    na, nb = np.linalg.norm(y, axis=1)
    if na == 0 or nb == 0:
        return None
    return float(np.clip(y[0] @ y[1] / (na * nb), -1.0, 1.0))


# --------------------------------------------------------------------------- labels and pairs


def model_labels(c: Corpus) -> np.ndarray:
    """Per row its model id, -1 where unknown (int64)."""
    col = c.column("model_id")
    if col.null_count == len(col):
        return np.full(c.n, -1, dtype=np.int64)
    return np.nan_to_num(column_array(col.cast("double")), nan=-1).astype(np.int64)


def pair_similarities(y: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted similarities of every pair i < j: (unrelated, related). With no label at all every
    pair is unrelated; otherwise a pair with an unknown label is left out."""
    u = unit_rows(y)
    s = u @ u.T
    iu = np.triu_indices(len(y), k=1)
    sims = s[iu]
    li, lj = labels[iu[0]], labels[iu[1]]
    if (labels < 0).all():
        return np.sort(sims), np.zeros(0)
    known = (li >= 0) & (lj >= 0)
    return np.sort(sims[known & (li != lj)]), np.sort(sims[known & (li == lj)])


def recall_at_k(y: np.ndarray, labels: np.ndarray, ks=RECALL_K) -> dict:
    """Version-sibling recall@k: ``{"k1": share, ..., "queries": n}`` (shares None without queries).

    Neighbours are ranked by similarity, ties by row order (a stable sort)."""
    u = unit_rows(y)
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    np.fill_diagonal(same, False)
    q = np.nonzero(same.any(axis=1))[0]
    out = {"queries": int(q.size)}
    if q.size == 0:
        return dict(out, **{f"k{k}": None for k in ks})
    s = u[q] @ u.T
    s[np.arange(q.size), q] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")
    hits = np.take_along_axis(same[q], order, axis=1)
    for k in ks:
        out[f"k{k}"] = float(hits[:, :k].any(axis=1).mean())
    return out


def split_groups(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random half of the model-id groups (a row without a model id is its own group): True
    for the rows of the fitting half."""
    keys = np.where(labels >= 0, labels, -1 - np.arange(labels.size))
    groups = np.unique(keys)
    fit = rng.permutation(groups)[: groups.size // 2]
    return np.isin(keys, fit)


def split_evaluation(x: np.ndarray, labels: np.ndarray, n_splits: int = N_SPLITS, seed: int = SPLIT_SEED) -> dict:
    """Recall per measure on held-out groups: fit on one half, score on the other (see module doc)."""
    rng = np.random.default_rng(seed)
    runs = {m: [] for m in MEASURES}
    for _ in range(n_splits):
        fit_rows = split_groups(labels, rng)
        test = ~fit_rows
        whitening = fit_whitening(x[fit_rows])
        for m in MEASURES:
            y = transform(x[test], m, whitening)
            if y is not None:
                runs[m].append(recall_at_k(y, labels[test]))
    out = {"n_splits": int(n_splits), "seed": int(seed),
           "protocol": "model-id groups split at random in halves; whitening fitted on one half; recall of the "
                       "other half's queries among the other half's rows", "measures": {}}
    for m, rs in runs.items():
        out["measures"][m] = {f"k{k}": _spread([r[f"k{k}"] for r in rs]) for k in RECALL_K}
        out["measures"][m]["queries_per_split"] = _spread([r["queries"] for r in rs])
    if runs["whitened"] and len(runs["whitened"]) == len(runs["cosine"]):
        diff = {}
        for k in RECALL_K:
            d = [w[f"k{k}"] - c[f"k{k}"] for w, c in zip(runs["whitened"], runs["cosine"])
                 if w[f"k{k}"] is not None and c[f"k{k}"] is not None]
            diff[f"k{k}"] = dict(_spread(d) or {}, better=sum(v > 0 for v in d), worse=sum(v < 0 for v in d))
        out["whitened_minus_cosine"] = diff
    return out


def _spread(values) -> dict | None:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


# --------------------------------------------------------------------------- computing the record


def compute_validation(corpus, n_splits: int = N_SPLITS) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """``(record, tables, whitening_array)`` for a corpus (nothing written)."""
    c = as_corpus(corpus)
    rows = np.arange(c.n)
    if c.n > MAX_TABLE_ROWS:
        rows = np.sort(np.random.default_rng(SAMPLE_SEED).choice(c.n, MAX_TABLE_ROWS, replace=False))
    x = np.asarray(c.directions[rows], dtype=np.float64)
    labels = model_labels(c)[rows]
    whitening = fit_whitening(x)
    chunks, measures, offset = [], {}, 0
    for m in MEASURES:
        y = transform(x, m, whitening)
        if y is None:
            measures[m] = None
            continue
        unrelated, related = pair_similarities(y, labels)
        chunks += [unrelated.astype(np.float32), related.astype(np.float32)]
        measures[m] = {"offset": offset, "unrelated_pairs": int(unrelated.size), "related_pairs": int(related.size),
                       "recall": recall_at_k(y, labels), "description": MEASURE_TEXT[m]}
        offset += unrelated.size + related.size
    tables = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    record = {
        "schema": VALIDATION_SCHEMA,
        "computed_from": {k: c.meta[k] for k in ("directions_sha256", "rows_sha256")},
        "basis": BASIS_ALL if (labels < 0).all() else BASIS_MODEL_ID,
        "rows_used": int(rows.size), "rows_total": int(c.n),
        "sample": None if rows.size == c.n else {"seed": SAMPLE_SEED, "rows": int(rows.size)},
        "rows_without_model_id": int((labels < 0).sum()),
        "model_id_groups": int((np.unique(labels[labels >= 0], return_counts=True)[1] >= 2).sum()),
        "measures": measures,
        "whitening": None if whitening is None else {"shrinkage": whitening[2], "fit_rows": int(rows.size),
                                                      "method": "Ledoit-Wolf shrinkage covariance"},
        "split_evaluation": split_evaluation(x, labels, n_splits) if (labels >= 0).any() else None,
    }
    w_arr = None if whitening is None else np.vstack([whitening[0][None, :], whitening[1]])
    for m, rec in measures.items():
        if rec is not None:
            rec["false_match_table"] = [dict(_rates(tables, rec, t), threshold=t) for t in THRESHOLDS]
            rec["at_false_match_rate"] = [_operating_point(tables, rec, r) for r in OPERATING_RATES]
    return record, tables, w_arr


def _operating_point(tables: np.ndarray, rec: dict, rate: float) -> dict:
    """The lowest threshold whose unrelated share is at most ``rate``, and the related share there."""
    o, nu = rec["offset"], rec["unrelated_pairs"]
    if nu == 0:
        return {"rate": rate, "threshold": None, "related_share": None}
    unrelated = tables[o:o + nu]
    allowed = int(math.floor(rate * nu))
    t = float(np.nextafter(unrelated[nu - allowed - 1], np.float32(np.inf))) if allowed < nu else float(unrelated[0])
    return dict(_rates(tables, rec, t), rate=rate, threshold=t)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _rates(tables: np.ndarray, rec: dict, s: float) -> dict:
    o, nu, nr = rec["offset"], rec["unrelated_pairs"], rec["related_pairs"]
    s32 = np.float32(s)  # the tables hold float32: compare in float32, so a stored value matches itself
    at_u = int(nu - np.searchsorted(tables[o:o + nu], s32, side="left"))
    at_r = int(nr - np.searchsorted(tables[o + nu:o + nu + nr], s32, side="left"))
    return {"unrelated_at_least": at_u, "unrelated_pairs": nu, "unrelated_share": at_u / nu if nu else None,
            "related_at_least": at_r, "related_pairs": nr, "related_share": at_r / nr if nr else None}


# --------------------------------------------------------------------------- stored with the corpus


class Validation:
    """A corpus's validation record with its arrays; ``false_match`` answers in O(log pairs)."""

    def __init__(self, record: dict, tables: np.ndarray, whitening: np.ndarray | None, stored: bool):
        self.record = record
        self.tables = tables
        self.whitening = None if whitening is None else (whitening[0], whitening[1:])
        self.stored = stored

    def available(self, measure: str) -> bool:
        return self.record["measures"].get(measure) is not None

    def false_match(self, measure: str, s) -> dict | None:
        """For a similarity ``s``: the unrelated and related pairs of the corpus at or above it."""
        rec = self.record["measures"].get(measure)
        if rec is None or s is None or not math.isfinite(float(s)):
            return None
        return dict(_rates(self.tables, rec, float(s)), measure=measure, similarity=float(s), basis=self.record["basis"])

    def similarity(self, measure: str, a, b) -> float | None:
        return similarity(measure, self.whitening, a, b)


def _load_stored(c: Corpus) -> Validation | None:
    """The validation stored with the corpus, when it matches the corpus's current files."""
    return _load_from(c, c.meta.get("validation"), c.path, stored=True)


def _load_from(c: Corpus, rec, folder: Path, stored: bool) -> Validation | None:
    if not isinstance(rec, dict) or rec.get("schema") != VALIDATION_SCHEMA:
        return None
    if rec.get("computed_from") != {k: c.meta[k] for k in ("directions_sha256", "rows_sha256")}:
        return None  # the corpus changed since
    arrays = {}
    for name in VALIDATION_FILES:
        p = folder / name
        want = (rec.get("files") or {}).get(name)
        if want is None:
            arrays[name] = None
            continue
        raw = p.read_bytes() if p.is_file() else None  # read once: hashed, then parsed
        if raw is None or sha256_bytes(raw) != want:
            return None
        arrays[name] = np.load(io.BytesIO(raw), allow_pickle=False)
    if arrays[TABLES_FILE] is None:
        return None
    return Validation(rec, arrays[TABLES_FILE], arrays[WHITENING_FILE], stored=stored)


def cache_dir(c: Corpus) -> Path:
    """Where a corpus's validation is cached in the tool's home, keyed by the corpus's file hashes."""
    from carlos_audit.hashing import sha256_json
    from carlos_audit.paths import carlos_home

    key = sha256_json({k: c.meta[k] for k in ("directions_sha256", "rows_sha256")})
    return carlos_home() / "validation" / key[:32]


def corpus_validation(corpus, *, write: bool = False) -> Validation:
    """The corpus's validation: the one stored with the corpus when it matches the corpus's
    current files. Otherwise ``write`` (corpus import, build, add, validate: the commands that
    write corpora) computes it and stores it with the corpus under the corpus lock; without
    ``write`` (a case's analysis, neighbours: reference data is read-only) it comes from the
    tool's home (``cache_dir``), computed and cached there when missing. ``stored`` says whether
    it is stored with the corpus."""
    from carlos_audit.corpus.write import locked

    c = as_corpus(corpus)
    found = _load_stored(c)
    if found is not None:
        return found
    cache = cache_dir(c)
    cached = _load_from(c, read_json(cache / "validation.json"), cache, stored=False) \
        if (cache / "validation.json").is_file() else None
    if cached is not None and not write:
        return cached
    record, tables, w_arr = compute_validation(c)
    files = {TABLES_FILE: _npy_bytes(tables)}
    if w_arr is not None:
        files[WHITENING_FILE] = _npy_bytes(w_arr)
    record["files"] = {k: sha256_bytes(v) for k, v in files.items()}
    if write:
        with contextlib.suppress(OSError), locked(c.path):
            meta = read_json(c.path / META_FILE)
            if all(meta.get(k) == record["computed_from"][k] for k in record["computed_from"]):
                for name, data in files.items():
                    write_bytes_atomic(c.path / name, data)
                write_json_atomic(c.path / META_FILE, dict(meta, validation=record))
                c.meta = dict(meta, validation=record)
                return Validation(record, tables, w_arr, stored=True)
    with contextlib.suppress(OSError):  # a read-only home: the validation stays in memory
        for name, data in files.items():
            write_bytes_atomic(cache / name, data)
        write_json_atomic(cache / "validation.json", record)
    return Validation(record, tables, w_arr, stored=False)


def validation_summary(v: Validation, path) -> dict:
    """The JSON object ``corpus validate --json`` prints."""
    return {"corpus": str(Path(path)), "stored": v.stored, **v.record}


# --------------------------------------------------------------------------- similarities in a case


def corpus_section(v: Validation) -> dict:
    """What comparison.json records about the corpus's error rates (the report cites it)."""
    rec = v.record
    split = rec.get("split_evaluation") or {}
    return {
        "schema": rec["schema"], "basis": rec["basis"], "rows_used": rec["rows_used"], "rows_total": rec["rows_total"],
        "model_id_groups": rec["model_id_groups"], "rows_without_model_id": rec["rows_without_model_id"],
        "files": rec["files"], "stored": v.stored,
        "measures": {m: None if r is None else {k: r[k] for k in ("description", "unrelated_pairs", "related_pairs",
                                                                   "recall", "false_match_table", "at_false_match_rate")}
                     for m, r in rec["measures"].items()},
        "whitening": rec["whitening"],
        "split_evaluation": {k: split[k] for k in ("n_splits", "seed", "protocol", "measures", "whitened_minus_cosine")
                             if k in split} or None,
    }


def calibrate_neighbours(v: Validation, corpus: Corpus, direction, neighbours: list[dict]) -> None:
    """Give each neighbour entry (rows of ``corpus``) its false-match rate, and its whitened
    similarity with its own rate."""
    for nb in neighbours:
        nb["false_match"] = v.false_match("cosine", nb.get("similarity"))
        row = np.asarray(corpus.directions[corpus.index_of(nb["id"])], dtype=np.float64)
        w = v.similarity("whitened", direction, row) if v.available("whitened") else None
        nb["whitened"] = {"similarity": w, "false_match": v.false_match("whitened", w)}


def calibrated_neighbours(corpus, ids, top_k: int = 10) -> dict:
    """``search.neighbours`` with each neighbour's false-match rate and whitened similarity."""
    from carlos_audit.corpus.search import neighbours

    c = as_corpus(corpus)
    result = neighbours(c, ids, top_k=top_k)
    v = corpus_validation(c)
    for rid, r in result.items():
        calibrate_neighbours(v, c, c.directions[c.index_of(rid)], r["neighbours"])
    return result


def calibrate_head_to_head(v: Validation, head_to_head: list, comparable: bool) -> None:
    """Give each head-to-head direction cosine (and its CI bounds) the corpus's false-match rate.
    ``comparable`` is False when the corpus was profiled under another protocol (then the rate
    compares unlike measurements, and says so)."""
    for h in head_to_head or []:
        b = h.get("behaviour") if isinstance(h, dict) else None
        if not isinstance(b, dict):
            continue
        ci = b.get("direction_cosine_ci") or [None, None]
        b["direction_cosine_false_match"] = dict(
            v.false_match("cosine", b.get("direction_cosine")) or {}, comparable=bool(comparable),
            ci_low=v.false_match("cosine", ci[0]), ci_high=v.false_match("cosine", ci[1])) \
            if b.get("direction_cosine") is not None else None


def calibrate(corpus, direction, target: dict, head_to_head: list | None, *, comparable: bool) -> dict:
    """The false-match rates of a case's similarities against ``corpus`` (entries changed in
    place); returns the ``corpus.error_rates`` section of comparison.json."""
    c = as_corpus(corpus)
    v = corpus_validation(c)
    calibrate_neighbours(v, c, direction, target.get("neighbours") or [])
    calibrate_head_to_head(v, head_to_head, comparable)
    return corpus_section(v)
