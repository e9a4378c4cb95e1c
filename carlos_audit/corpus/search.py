"""Searching a corpus: nearest neighbours by cosine (exact, float64 re-ranking), percentiles,
summary statistics."""

from __future__ import annotations

import math

import numpy as np

from carlos_audit.corpus.store import CHUNK_ELEMENTS, PREFILTER_TOL, Corpus, as_corpus
from carlos_audit.errors import AuditError

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


# --------------------------------------------------------------------------- neighbours


def _topk_pools(c: Corpus, queries: np.ndarray, k: int, exclude_rows: np.ndarray,
                keep: np.ndarray | None = None) -> list[np.ndarray]:
    """Per query, the candidate rows that certainly contain its top-k by float64 cosine.

    Scores are computed in the storage dtype chunk by chunk; a row is kept when its score is
    at least (k-th best score so far) - 2 * tol, tol bounding the storage-dtype error. Cosines
    lie in [-1, 1], so the starting threshold -3 admits every row; excluded rows (and rows where
    ``keep`` is False) score -inf.
    """
    m, n = queries.shape[0], c.n
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    qs = np.ascontiguousarray(qn.astype(c.directions.dtype))  # (m, dim)
    inv = c.inverse_norms()
    cands = _Candidates(m, k, PREFILTER_TOL[c.dtype])
    step = max(1024, CHUNK_ELEMENTS // max(m, 1)) if CHUNK_ELEMENTS >= 1024 else max(1, CHUNK_ELEMENTS)
    for start in range(0, n, step):
        s = qs @ c.directions[start:start + step].T  # (m, rows), C order
        s *= inv[start:start + step]
        w = s.shape[1]
        if keep is not None:
            s[:, ~keep[start:start + w]] = -np.inf
        inside = (exclude_rows >= start) & (exclude_rows < start + w)
        if inside.any():
            qi = np.nonzero(inside)[0]
            s[qi, exclude_rows[qi] - start] = -np.inf
        cands.add(s, start)
    return cands.pools()


class _Candidates:
    """The rows of each of ``m`` queries scoring at least its threshold (the k-th best so far
    minus 2 * tol), pruned as they accumulate."""

    FLOOR = -3.0

    def __init__(self, m: int, k: int, tol: float):
        self.m, self.k, self.tol = m, k, tol
        self.thr = np.full(m, self.FLOOR)
        self.rows: list[list[np.ndarray]] = [[] for _ in range(m)]
        self.vals: list[list[np.ndarray]] = [[] for _ in range(m)]
        self.count = np.zeros(m, dtype=np.int64)

    def add(self, s: np.ndarray, start: int) -> None:
        """The scores ``s`` (queries x rows from ``start``) of one chunk."""
        k, w, thr = self.k, s.shape[1], self.thr
        need = thr == self.FLOOR
        if need.any() and w >= k:
            kth = np.partition(s[need], w - k, axis=1)[:, w - k].astype(np.float64)
            thr[need] = np.maximum(kth - 2 * self.tol, self.FLOOR)
        qi, ri = np.nonzero(s >= thr.astype(s.dtype)[:, None])
        if qi.size == 0:
            return
        vals = s[qi, ri].astype(np.float64)
        bounds = np.searchsorted(qi, np.arange(self.m + 1))
        for j in np.nonzero(np.diff(bounds))[0]:
            a, b = bounds[j], bounds[j + 1]
            self.rows[j].append(ri[a:b] + start)
            self.vals[j].append(vals[a:b])
            self.count[j] += b - a
            if self.count[j] > 4 * k + 256:
                self._prune(j)

    def _prune(self, j: int) -> None:
        r, v = np.concatenate(self.rows[j]), np.concatenate(self.vals[j])
        kth = np.partition(v, v.size - self.k)[v.size - self.k]
        self.thr[j] = max(self.thr[j], kth - 2 * self.tol)
        kept = v >= self.thr[j]
        self.rows[j], self.vals[j] = [r[kept]], [v[kept]]
        self.count[j] = int(kept.sum())

    def pools(self) -> list[np.ndarray]:
        """Per query, its candidate rows (sorted) within 2 * tol of its k-th best."""
        out = []
        for j in range(self.m):
            if not self.rows[j]:
                out.append(np.zeros(0, dtype=np.int64))
                continue
            r, v = np.concatenate(self.rows[j]), np.concatenate(self.vals[j])
            if v.size > self.k:
                kth = np.partition(v, v.size - self.k)[v.size - self.k]
                r = r[v >= kth - 2 * self.tol]
            out.append(np.sort(r))
        return out


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


def nearest(corpus, vectors, top_k: int = 10, exclude_rows=None, keep=None) -> list[list[tuple[int, float]]]:
    """For each query vector: [(row, cosine), ...] best first (ties by id), at most ``top_k``.

    ``vectors`` is (m, dim); ``exclude_rows`` gives per query a row to leave out (-1: none);
    ``keep`` (bool, one per row) leaves out every row where it is False, for all queries.
    Works in chunks, so 1,000 queries against 1M rows stay within a few hundred MB.
    """
    c = as_corpus(corpus)
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
    kept = np.ones(c.n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    eligible = int(kept.sum()) - np.array([kept[r] if r >= 0 else 0 for r in ex[live]], dtype=int)
    k = int(min(top_k, c.n))
    pools = _topk_pools(c, q[live], k, ex[live], None if keep is None else kept)
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
        "strength_percentile": c.percentile("strength", strength, exclude),
        "consistency_percentile": c.percentile("consistency", consistency, exclude),
        "neighbours": [_entry(c, r, s) for r, s in hits],
    }


def neighbours(corpus, ids, top_k: int = 10) -> dict:
    """``{id: {strength_percentile, consistency_percentile, neighbours: [...]}}`` (see CORPUS.md)."""
    c = as_corpus(corpus)
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
    c = as_corpus(corpus)
    d = np.asarray(direction, dtype=np.float64).ravel()
    if c.dim is not None and d.size != c.dim:
        raise AuditError(f"the direction has {d.size} values; corpus {c.path} has dim {c.dim}")
    if not np.isfinite(d).all():
        raise AuditError("the direction has non-finite values")
    if strength is None or not math.isfinite(float(strength)):
        raise AuditError("strength must be a finite number")
    ex = None
    if exclude_id is not None:
        ex = c.lookup([str(exclude_id)]).get(str(exclude_id))
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
    c = as_corpus(corpus)
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


