"""Reference data is checked as it is read: a corpus whose files' hashes are consistent but whose
rows hold a NaN, Inf or all-zero direction, a negative strength or a consistency outside [-1, 1]
is refused on open, in one line naming the row (docs/hostile/spoof.md)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from carlos_audit.cli import main
from carlos_audit.corpus.store import CHUNK_ELEMENTS, Corpus
from carlos_audit.corpus.write import create_corpus
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json, write_json_atomic
from carlos_audit.hashing import sha256_file

N, DIM = 12, 16


def good_corpus(tmp_path):
    rng = np.random.default_rng(5)
    return create_corpus(tmp_path / "corpus", directions=rng.standard_normal((N, DIM)).astype(np.float32),
                         rows={"id": [f"lora-{i}" for i in range(N)], "strength": rng.uniform(1, 9, N),
                               "consistency": np.where(np.arange(N) % 5 == 0, np.nan, rng.uniform(-.5, .5, N))},
                         signature=None, name="values")


def rehash(c: Corpus) -> None:
    """What a forger does after editing a data file: corpus.json's hashes made to match again."""
    meta = read_json(c.path / "corpus.json")
    meta["directions_sha256"] = sha256_file(c.path / "directions.npy")
    meta["rows_sha256"] = sha256_file(c.path / "rows.parquet")
    write_json_atomic(c.path / "corpus.json", meta)


def set_direction(c: Corpus, row: int, values) -> None:
    m = np.load(c.path / "directions.npy", mmap_mode="r+")
    m[row] = values
    m.flush()
    del m
    rehash(c)


def set_column(c: Corpus, name: str, row: int, value) -> None:
    t = pq.read_table(c.path / "rows.parquet")
    vals = t.column(name).to_pylist()
    vals[row] = value
    t = t.set_column(t.schema.get_field_index(name), name, pa.array(vals, pa.float64()))
    pq.write_table(t, c.path / "rows.parquet")
    rehash(c)


def refused_in_one_line(path, match: str) -> None:
    for verify in (True, False):  # hashed and whole, or memory-mapped (a corpus too big to hash on open)
        with pytest.raises(AuditError, match=match):
            Corpus.open(path, verify=verify)
    result = CliRunner().invoke(main, ["corpus", "stats", str(path)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("Error:")


@pytest.mark.parametrize("values, why", [
    ([np.nan] + [1.0] * (DIM - 1), "non-finite"),
    ([1.0] * (DIM - 1) + [np.inf], "non-finite"),
    ([0.0] * DIM, "all zero"),
    ([1e30] * DIM, "too large for float32"),
])
def test_a_row_that_is_no_direction_is_refused_naming_it(tmp_path, values, why):
    c = good_corpus(tmp_path)
    set_direction(c, 7, values)
    refused_in_one_line(c.path, rf"row 'lora-7' \(row 7\).*{why}")


@pytest.mark.parametrize("name, value, why", [
    ("strength", -0.5, r"strength -0.5 is not a finite number >= 0"),
    ("strength", float("inf"), r"strength inf is not a finite number >= 0"),
    ("strength", None, r"strength nan is not a finite number >= 0"),
    ("consistency", 1.5, r"consistency 1.5 is outside \[-1, 1\]"),
    ("consistency", float("-inf"), r"consistency -inf is outside \[-1, 1\]"),
])
def test_a_row_value_out_of_range_is_refused_naming_it(tmp_path, name, value, why):
    c = good_corpus(tmp_path)
    set_column(c, name, 3, value)
    refused_in_one_line(c.path, rf"row 'lora-3' \(row 3\): {why}")


def test_valid_rows_open_and_undefined_consistency_is_valid(tmp_path):
    c = good_corpus(tmp_path)
    set_column(c, "consistency", 4, None)  # undefined (null) is a valid consistency
    set_column(c, "consistency", 2, -1.0)
    set_column(c, "strength", 1, 0.0)
    c2 = Corpus.open(c.path)
    assert c2.n == N and np.isnan(c2.consistency[4]) and c2.strength[1] == 0.0
    # the norms computed by the check are the ones search uses
    d = np.asarray(c2.directions, dtype=np.float32)
    np.testing.assert_allclose(c2.storage_norms(), np.sqrt(np.einsum("ij,ij->i", d, d)), rtol=1e-6)


def test_a_bad_row_in_a_later_chunk_is_found(tmp_path, monkeypatch):
    import carlos_audit.corpus.store as store

    monkeypatch.setattr(store, "CHUNK_ELEMENTS", 3 * DIM)  # 3 rows a chunk: row 10 is in the fourth
    assert CHUNK_ELEMENTS > 3 * DIM
    c = good_corpus(tmp_path)
    set_direction(c, 10, [np.nan] * DIM)
    with pytest.raises(AuditError, match=r"row 'lora-10' \(row 10\)"):
        Corpus.open(c.path)


def test_writing_refuses_what_opening_refuses(tmp_path):
    d = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(AuditError, match=r"row 'b': strength -1.0 is not a finite number >= 0"):
        create_corpus(tmp_path / "a", directions=d, rows={"id": ["a", "b"], "strength": [1.0, -1.0]},
                      signature=None, name="x")
    with pytest.raises(AuditError, match=r"row 'a': consistency 2.0 is outside"):
        create_corpus(tmp_path / "b", directions=d, rows={"id": ["a", "b"], "strength": [1.0, 1.0],
                                                          "consistency": [2.0, None]}, signature=None, name="x")
