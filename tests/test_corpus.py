"""Reference corpus: import, storage, neighbours, percentiles, signatures, cases, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from carlos_audit.case.signature import (
    check_compatible,
    preset_signature,
    require_compatible,
    unverifiable_fields,
)
from carlos_audit.cli import main
from carlos_audit.corpus import search as search_module
from carlos_audit.corpus.carlos import export_carlos_csv, import_carlos_db
from carlos_audit.corpus.add import add_case
from carlos_audit.corpus.search import (
    nearest,
    neighbours,
    neighbours_for_vector,
    percentile_rank,
    stats,
)
from carlos_audit.corpus.store import Corpus
from carlos_audit.corpus.validate import calibrated_neighbours
from carlos_audit.corpus.write import create_corpus, create_empty
from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_file

REPO = Path(__file__).resolve().parents[1]

HOSTILE = [
    '<script>alert("x")</script><img src=x onerror=alert(1)>',
    "line1\r\nline2\nline3\r",
    "NA",
    "null",
    "",
    '  "quoted", with, commas  ',
    "nul\x00byte and \x1b[31mANSI\x1b[0m and \u202eRTL override",
    "emoji 🧪 and zero\u200bwidth and é",
    "{{ jinja }} {% raw %} ${shell} $(rm -rf /)",
]


@pytest.fixture(scope="module")
def carlos_src(carlos_parquet):
    return pd.read_parquet(carlos_parquet)


@pytest.fixture(scope="module")
def carlos_corpus(carlos_parquet, tmp_path_factory):
    dest = tmp_path_factory.mktemp("carlos") / "corpus"
    before = sha256_file(carlos_parquet)
    c = import_carlos_db(carlos_parquet, dest)
    assert sha256_file(carlos_parquet) == before, "import modified its source file"
    return c


def _synthetic_parquet(path: Path, n=12, dim=8, seed=0, descriptions=None, dtype=pa.float64()):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n, dim)).astype(np.float32).astype(np.float64)
    descriptions = descriptions or [f"desc {i}" for i in range(n)]
    t = pa.table({
        "version_id": pa.array(np.arange(1000, 1000 + n), pa.int64()),
        "model_id": pa.array([None if i % 3 == 0 else 50 + i for i in range(n)], pa.int64()),
        "model_name": [f"name {i}" for i in range(n)],
        "model_description": [descriptions[i % len(descriptions)] for i in range(n)],
        "model_nsfw_level": pa.array([None if i % 4 == 0 else i for i in range(n)], pa.int64()),
        "folder_name": [f"folder_{i}" for i in range(n)],
        "direction": pa.array([list(r) for r in d], pa.list_(dtype)),
        "strength": rng.uniform(1, 10, n),
        "consistency": rng.uniform(0, 0.5, n),
        "model_download_count": pa.array([None if i % 5 == 0 else 10 * i for i in range(n)], pa.int64()),
    })
    pq.write_table(t, path)
    return t


# ------------------------------------------------------------------ the public CARLoS file (the pinned wheel's)


def test_import_keeps_every_row_and_value_exactly(carlos_corpus, carlos_src, carlos_parquet):
    c, src = carlos_corpus, carlos_src
    assert c.n == len(src) == 740 and c.dim == 512
    rows = pq.read_table(c.path / "rows.parquet").to_pandas()
    assert list(rows["id"]) == [str(v) for v in src["version_id"]]
    assert list(rows["row"]) == list(range(740))
    assert (rows["source"] == "carlos-public-db").all()
    np.testing.assert_array_equal(rows["strength"].to_numpy(), src["strength"].to_numpy())
    np.testing.assert_array_equal(rows["consistency"].to_numpy(), src["consistency"].to_numpy())
    for ours, theirs in (("model_id", "model_id"), ("nsfw_level", "model_nsfw_level"),
                         ("download_count", "model_download_count")):
        assert rows[ours].astype("Int64").equals(src[theirs].astype("Int64")), ours
    for ours, theirs in (("name", "model_name"), ("description", "model_description"),
                         ("folder_name", "folder_name")):
        assert list(rows[ours]) == list(src[theirs]), ours
    source_dirs = np.stack(src["direction"].to_numpy())
    assert source_dirs.dtype == np.float64
    # the published float64 column holds float32 values, so float32 storage is exact
    assert c.dtype == "float32"
    np.testing.assert_array_equal(np.asarray(c.directions, dtype=np.float64), source_dirs)
    assert c.meta["created_from"]["sha256"] == sha256_file(carlos_parquet)
    assert c.signature == preset_signature("carlos-sdxl-vitb32")
    assert c.signature["seeds"] == list(range(42, 58)) and c.signature["steps"] == 25
    assert c.signature["seed_mode"] == "carlos-batch/4"


def test_directions_file_is_a_plain_npy_matrix(carlos_corpus):
    m = np.load(carlos_corpus.path / "directions.npy", mmap_mode="r")
    assert m.shape == (740, 512) and m.dtype == np.dtype("<f4") and m.flags["C_CONTIGUOUS"]
    assert sha256_file(carlos_corpus.path / "directions.npy") == carlos_corpus.meta["directions_sha256"]
    assert sha256_file(carlos_corpus.path / "rows.parquet") == carlos_corpus.meta["rows_sha256"]


def test_csv_roundtrip_equals_parquet_import(carlos_corpus, tmp_path):
    csv_path = export_carlos_csv(carlos_corpus, tmp_path / "carlos.csv")
    c2 = import_carlos_db(csv_path, tmp_path / "from_csv", name=carlos_corpus.name)
    assert c2.n == carlos_corpus.n and c2.dtype == carlos_corpus.dtype
    np.testing.assert_array_equal(np.asarray(c2.directions), np.asarray(carlos_corpus.directions))
    assert c2.rows.equals(carlos_corpus.rows)
    assert c2.meta["directions_sha256"] == carlos_corpus.meta["directions_sha256"]
    assert c2.meta["rows_sha256"] == carlos_corpus.meta["rows_sha256"]


def _independent_neighbours(src: pd.DataFrame, qid: str, k: int):
    ids = [str(v) for v in src["version_id"]]
    dirs = [np.asarray(d, dtype=np.float64) for d in src["direction"]]
    q = ids.index(qid)
    sims = []
    for i, d in enumerate(dirs):
        if i == q:
            continue
        sims.append((-(np.dot(dirs[q], d) / (np.linalg.norm(dirs[q]) * np.linalg.norm(d))), ids[i]))
    sims.sort()
    return [(i, -s) for s, i in sims[:k]]


def _independent_percentile(values, q):
    others = [v for i, v in enumerate(values) if i != q and not (v is None or math.isnan(v))]
    return 100.0 * sum(1 for v in others if v <= values[q]) / len(others)


def test_neighbours_and_percentiles_match_plain_numpy(carlos_corpus, carlos_src):
    ids = [str(v) for v in carlos_src["version_id"]]
    picks = [ids[0], ids[1], ids[369], ids[-1]]
    got = neighbours(carlos_corpus, picks, top_k=10)
    assert list(got) == picks
    strengths = list(carlos_src["strength"])
    cons = list(carlos_src["consistency"])
    for qid in picks:
        q = ids.index(qid)
        want = _independent_neighbours(carlos_src, qid, 10)
        nb = got[qid]["neighbours"]
        assert [n["id"] for n in nb] == [w[0] for w in want]
        for n, (wid, wsim) in zip(nb, want):
            assert abs(n["similarity"] - wsim) < 1e-12
            row = ids.index(wid)
            assert n["strength"] == strengths[row] and n["consistency"] == cons[row]
        sims = [n["similarity"] for n in nb]
        assert sims == sorted(sims, reverse=True)
        assert got[qid]["strength_percentile"] == pytest.approx(_independent_percentile(strengths, q), abs=1e-12)
        assert got[qid]["consistency_percentile"] == pytest.approx(_independent_percentile(cons, q), abs=1e-12)


def test_neighbours_top_k_larger_than_corpus(carlos_corpus):
    some = str(carlos_corpus.ids[5])
    r = neighbours(carlos_corpus, [some], top_k=5000)[some]["neighbours"]
    assert len(r) == 739 and some not in {n["id"] for n in r}


def test_cli_neighbours_json_shape(carlos_corpus):
    a, b = carlos_corpus.ids[0], carlos_corpus.ids[10]
    res = CliRunner().invoke(main, ["corpus", "neighbours", str(carlos_corpus.path), "--lora-id", a,
                                    "--lora-id", b, "--top-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert set(obj) == {a, b}
    for entry in obj.values():
        assert set(entry) == {"strength_percentile", "consistency_percentile", "neighbours"}
        assert isinstance(entry["strength_percentile"], float)
        assert entry["consistency_percentile"] is None or isinstance(entry["consistency_percentile"], float)
        assert len(entry["neighbours"]) == 3
        for n in entry["neighbours"]:
            assert set(n) == {"id", "name", "similarity", "strength", "consistency", "false_match", "whitened"}
            assert isinstance(n["id"], str) and isinstance(n["name"], str)
            assert isinstance(n["similarity"], float) and isinstance(n["strength"], float)
    assert obj == calibrated_neighbours(carlos_corpus, [a, b], top_k=3)
    plain = neighbours(carlos_corpus, [a, b], top_k=3)  # the search itself is unchanged by the calibration
    assert [[{k: n[k] for k in plain[a]["neighbours"][0]} for n in obj[x]["neighbours"]] for x in (a, b)] == \
        [plain[x]["neighbours"] for x in (a, b)]


def test_cli_unknown_id_is_one_line_error(carlos_corpus):
    res = CliRunner().invoke(main, ["corpus", "neighbours", str(carlos_corpus.path), "--lora-id", "999999999"])
    assert res.exit_code != 0
    err = res.stderr.strip()
    assert err.startswith("Error:") and "999999999" in err and "\n" not in err
    assert "Traceback" not in res.output


def test_cli_table_and_stats(carlos_corpus):
    r = CliRunner().invoke(main, ["corpus", "neighbours", str(carlos_corpus.path), "--lora-id", carlos_corpus.ids[0]])
    assert r.exit_code == 0 and "similarity" in r.stdout
    r = CliRunner().invoke(main, ["corpus", "stats", str(carlos_corpus.path), "--json"])
    assert r.exit_code == 0
    s = json.loads(r.stdout)
    assert s["n"] == 740 and s["dim"] == 512 and s["sources"] == {"carlos-public-db": 740}
    assert s["strength"]["min"] == pytest.approx(0.93, abs=0.01)
    assert s["strength"]["median"] == pytest.approx(float(np.median(carlos_corpus.strength)))
    r = CliRunner().invoke(main, ["corpus", "stats", str(carlos_corpus.path)])
    assert r.exit_code == 0 and "rows 740" in r.stdout


def test_cli_import(carlos_parquet, tmp_path):
    dest = tmp_path / "c"
    r = CliRunner().invoke(main, ["corpus", "import", str(carlos_parquet), str(dest)])
    assert r.exit_code == 0, r.output
    assert "740 rows" in r.stdout
    r = CliRunner().invoke(main, ["corpus", "import", str(carlos_parquet), str(dest)])
    assert r.exit_code != 0 and "--overwrite" in r.stderr
    r = CliRunner().invoke(main, ["corpus", "import", str(carlos_parquet), str(dest), "--overwrite", "--preset", "none"])
    assert r.exit_code == 0, r.output
    assert all(v is None for v in Corpus.open(dest).signature.values())


def test_modules_do_not_import_torch():
    code = "import carlos_audit.cli, carlos_audit.corpus.store, sys; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr


def test_query_path_stays_light(tmp_path):
    """Opening and querying a corpus imports neither torch nor pandas (keeps the CLI near 0.25 s)."""
    c, _ = _small_corpus(tmp_path)
    code = ("import sys; from carlos_audit.cli import main; from carlos_audit.corpus.store import Corpus; "
            "from carlos_audit.corpus.search import neighbours, neighbours_for_vector, stats; "
            f"c = Corpus.open({str(c.path)!r}); neighbours(c, ['3', '4']); stats(c); "
            "neighbours_for_vector(c, c.directions[1], 1.0, None, exclude_id='1'); "
            "bad = [m for m in ('torch', 'pandas') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ synthetic data


def test_hostile_description_text_is_kept_byte_identical(tmp_path):
    src = tmp_path / "hostile.parquet"
    t = _synthetic_parquet(src, n=len(HOSTILE), descriptions=HOSTILE)
    c = import_carlos_db(src, tmp_path / "c", preset=None)
    assert c.rows.column("description").to_pylist() == HOSTILE
    csv_path = export_carlos_csv(c, tmp_path / "h.csv")
    c2 = import_carlos_db(csv_path, tmp_path / "c2", preset=None)
    assert [s.encode() for s in c2.rows.column("description").to_pylist()] == [s.encode() for s in HOSTILE]
    assert c2.rows.equals(c.rows)
    np.testing.assert_array_equal(np.asarray(c2.directions), np.asarray(c.directions))
    assert t.column("model_description").to_pylist() == HOSTILE


def test_float64_directions_stay_float64_and_exact(tmp_path):
    src = tmp_path / "f64.parquet"
    t = _synthetic_parquet(src)
    vals = np.asarray(t.column("direction").to_pylist(), dtype=np.float64)
    vals[0, 0] = 0.1  # not a float32 value
    pq.write_table(t.set_column(6, "direction", pa.array([list(r) for r in vals], pa.list_(pa.float64()))), src)
    c = import_carlos_db(src, tmp_path / "c", preset=None)
    assert c.dtype == "float64"
    np.testing.assert_array_equal(np.asarray(c.directions), vals)
    src32 = tmp_path / "f32.parquet"
    _synthetic_parquet(src32, dtype=pa.float32())
    assert import_carlos_db(src32, tmp_path / "c32", preset=None).meta["created_from"]["source_direction_dtype"] == "float32"


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.drop_columns(["strength"]), "strength"),
    (lambda t: t.set_column(0, "version_id", pa.array([1000] * t.num_rows, pa.int64())), "duplicate"),
    (lambda t: t.set_column(6, "direction", pa.array([[1.0, 2.0]] + t.column("direction").to_pylist()[1:],
                                                      pa.list_(pa.float64()))), "values"),
    (lambda t: t.set_column(6, "direction", pa.array([[float("nan")] * 8] + t.column("direction").to_pylist()[1:],
                                                      pa.list_(pa.float64()))), "non-finite"),
    (lambda t: t.set_column(6, "direction", pa.array([[0.0] * 8] + t.column("direction").to_pylist()[1:],
                                                      pa.list_(pa.float64()))), "all zero"),
])
def test_import_refusals(tmp_path, mutate, message):
    src = tmp_path / "s.parquet"
    t = _synthetic_parquet(src)
    pq.write_table(mutate(t), src)
    with pytest.raises(AuditError, match=message):
        import_carlos_db(src, tmp_path / "c", preset=None)
    assert not (tmp_path / "c" / "corpus.json").exists()


def test_import_refuses_wrong_dim_for_preset_and_non_empty_dest(tmp_path):
    src = tmp_path / "s.parquet"
    _synthetic_parquet(src)
    with pytest.raises(AuditError, match="expects 512"):
        import_carlos_db(src, tmp_path / "c")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(AuditError, match="--overwrite"):
        import_carlos_db(src, tmp_path / "busy", preset=None)
    with pytest.raises(AuditError, match="not part of a corpus"):
        import_carlos_db(src, tmp_path / "busy", preset=None, overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_csv_direction_forms(tmp_path):
    src = tmp_path / "s.parquet"
    _synthetic_parquet(src, n=3, dim=4)
    c = import_carlos_db(src, tmp_path / "c", preset=None)
    csv_path = export_carlos_csv(c, tmp_path / "s.csv")
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    for sep, name in ((" ", "space"), (",", "comma")):
        df2 = df.copy()
        df2["direction"] = [sep.join(str(x) for x in json.loads(v)) for v in df["direction"]]
        p = tmp_path / f"{name}.csv"
        df2.to_csv(p, index=False)
        c2 = import_carlos_db(p, tmp_path / name, preset=None)
        np.testing.assert_array_equal(np.asarray(c2.directions), np.asarray(c.directions))
    df["direction"] = ["[1, 2"] + list(df["direction"][1:])
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(AuditError, match="line 2"):
        import_carlos_db(tmp_path / "bad.csv", tmp_path / "bad", preset=None)


def test_open_errors_are_one_line(tmp_path):
    with pytest.raises(AuditError, match="does not exist"):
        Corpus.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuditError, match="corpus.json is missing"):
        Corpus.open(tmp_path / "empty")
    src = tmp_path / "s.parquet"
    _synthetic_parquet(src)
    c = import_carlos_db(src, tmp_path / "c", preset=None)
    meta = (c.path / "corpus.json").read_text()
    (c.path / "corpus.json").write_text(meta[:40])
    with pytest.raises(AuditError, match="garbled"):
        Corpus.open(c.path)
    (c.path / "corpus.json").write_text(meta)
    d = (c.path / "directions.npy").read_bytes()
    (c.path / "directions.npy").write_bytes(d[:-4])
    with pytest.raises(AuditError, match="truncated"):
        Corpus.open(c.path)
    (c.path / "directions.npy").write_bytes(d[:-4] + b"\0\0\0\0")
    with pytest.raises(AuditError, match="does not match the sha256"):
        Corpus.open(c.path)
    r = CliRunner().invoke(main, ["corpus", "stats", str(tmp_path / "empty")])
    assert r.exit_code != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("Error:")


def test_percentile_rank_definition():
    v = [1.0, 2.0, 2.0, float("nan"), 5.0]
    assert percentile_rank(v, 2.0) == 100 * 3 / 4
    assert percentile_rank(v, 2.0, exclude_index=1) == 100 * 2 / 3
    assert percentile_rank(v, 0.5) == 0.0
    assert percentile_rank(v, None) is None
    assert percentile_rank([1.0, None, 3.0], 3.0, exclude_index=2) == 100.0
    assert percentile_rank([float("nan")], 1.0) is None


def test_corpus_percentiles_follow_the_definition(tmp_path):
    """The corpus's O(log n) percentile equals percentile_rank, ties and NaNs included."""
    c, _ = _small_corpus(tmp_path, n=40)
    for i in range(c.n):
        for name in ("strength", "consistency"):
            vals = getattr(c, name)
            v = None if np.isnan(vals[i]) else vals[i]
            assert c.percentile(name, v, i) == percentile_rank(vals, v, exclude_index=i)
            assert c.percentile(name, 3.0, None) == percentile_rank(vals, 3.0)


def test_create_corpus_refuses_lossy_float32(tmp_path):
    d = np.full((2, 4), 0.1)
    with pytest.raises(AuditError, match="float64"):
        create_corpus(tmp_path / "c", directions=d, rows={"id": ["a", "b"], "strength": [1.0, 2.0]},
                        signature=None, name="x", dtype="float32")
    assert not (tmp_path / "c").exists()
    c = create_corpus(tmp_path / "c2", directions=d, rows={"id": ["a", "b"], "strength": [1.0, 2.0]},
                        signature=None, name="x")
    assert c.dtype == "float64" and np.array_equal(np.asarray(c.directions), d)


def test_prefilter_is_exact_with_ties_and_small_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    n, dim = 3000, 16
    base = rng.standard_normal((n, dim)).astype(np.float32)
    base[100:140] = base[7]  # exact duplicates of row 7 (ties broken by id)
    base[200:230] = base[7] * np.float32(1.0 + 1e-7)  # near-ties below float32 resolution
    ids = [f"r{(i * 7919) % n:05d}" for i in range(n)]
    c = create_corpus(tmp_path / "c", directions=base, rows={"id": ids, "strength": rng.uniform(1, 9, n)},
                        signature=None, name="ties")
    monkeypatch.setattr(search_module, "CHUNK_ELEMENTS", 997)  # nearest() reads it from search
    x = base.astype(np.float64)
    for q in (7, 100, 5, 2999):
        got = nearest(c, x[q:q + 1], top_k=50, exclude_rows=[q])[0]
        sims = (x @ x[q]) / (np.linalg.norm(x, axis=1) * np.linalg.norm(x[q]))
        order = sorted((i for i in range(n) if i != q), key=lambda i: (-sims[i], ids[i]))[:50]
        # identical up to float64 rounding: compare similarities, and ids where sims are distinct
        np.testing.assert_allclose([s for _, s in got], [sims[i] for i in order], rtol=0, atol=1e-12)
        assert {r for r, _ in got if abs(sims[r] - sims[order[-1]]) > 1e-12} == \
            {i for i in order if abs(sims[i] - sims[order[-1]]) > 1e-12}
    batch = nearest(c, x[:5], top_k=5, exclude_rows=np.arange(5))
    assert batch == [nearest(c, x[i:i + 1], top_k=5, exclude_rows=[i])[0] for i in range(5)]


# ------------------------------------------------------------------ cases


def _case(tmp_path: Path, name: str, direction, strength=4.0, consistency=0.1, signature=None, case_id=None):
    """A finished case folder holding only what a corpus row reads (its records' other sections empty)."""
    from carlos_audit.records import Manifest, Metrics

    d = tmp_path / name
    d.mkdir()
    Metrics(n_pairs=0, n_prompts=0, n_seeds=0, feature_dim=len(direction), direction=[float(x) for x in direction],
            strength=strength, consistency=consistency, consistency_note=None, ci={}, per_category={}, per_prompt={},
            per_pair=[]).write(d)
    Manifest(
        signature=signature if signature is not None else dict(preset_signature("carlos-sdxl-vitb32"),
                                                               base_model_sha256="ab" * 32),
        case={"id": case_id or name, "title": "Case <b>title</b>"},
        lora={"path": f"/evidence/{name}.safetensors", "sha256": "cd" * 32},
        tool={}, run={}, inputs=[], custody_ok=True, base_model={}, embedder={}, protocol={}, comparison_loras=[],
        text_features=None, cost={}, prompts=[], pairs=[], results={}, environment={},
    ).write(d)
    return d


def _small_corpus(tmp_path, n=20, dim=512):
    rng = np.random.default_rng(1)
    dirs = rng.standard_normal((n, dim)).astype(np.float32)
    return create_corpus(tmp_path / "corpus", directions=dirs,
                           rows={"id": [str(i) for i in range(n)], "strength": rng.uniform(1, 9, n),
                                 "consistency": np.where(np.arange(n) % 7 == 0, np.nan, rng.uniform(0, .5, n)),
                                 "source": ["built"] * n},
                           signature=preset_signature("carlos-sdxl-vitb32"), name="small"), dirs


def test_add_case_appends_row_exactly(tmp_path):
    c, dirs = _small_corpus(tmp_path)
    direction = np.random.default_rng(9).standard_normal(512)  # float64, not float32 values
    case = _case(tmp_path, "case-001", direction, strength=3.25, consistency=None)
    row = add_case(c.path, case)
    assert row["id"] == "case-001" and row["row"] == 20 and row["source"] == "case"
    assert row["manifest_sha256"] == sha256_file(case / "manifest.json")
    assert row["lora_sha256"] == "cd" * 32 and row["name"] == "case-001.safetensors"
    assert row["differing"] == [] and row["unverifiable"] == ["base_model_sha256", "embedder_sha256"]
    c2 = Corpus.open(c.path)
    assert c2.n == 21 and c2.dtype == "float64"
    np.testing.assert_array_equal(np.asarray(c2.directions[:20]), dirs.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(c2.directions[20]), direction)
    assert c2.meta["directions_sha256"] == sha256_file(c2.path / "directions.npy")
    r = neighbours(c2, ["case-001"], top_k=3)["case-001"]
    assert r["consistency_percentile"] is None and len(r["neighbours"]) == 3
    v = neighbours_for_vector(c2, direction, 3.25, None, top_k=3, exclude_id="case-001")
    assert v == r
    with pytest.raises(AuditError, match="already has a row"):
        add_case(c.path, case)


def test_add_case_refuses_differing_signature_naming_fields(tmp_path):
    c, _ = _small_corpus(tmp_path)
    sig = dict(preset_signature("carlos-sdxl-vitb32"), steps=4, width=512, embedder_sha256=None)
    case = _case(tmp_path, "odd", np.ones(512), signature=sig)
    with pytest.raises(AuditError) as e:
        add_case(c.path, case)
    msg = str(e.value)
    assert "steps" in msg and "width" in msg and "--allow-incompatible" in msg and "\n" not in msg
    assert "embedder_sha256" not in msg.split(";")[0] and Corpus.open(c.path).n == 20
    assert check_compatible(c.signature, sig) == ["steps", "width"]
    assert "embedder_sha256" in unverifiable_fields(c.signature, sig)
    r = CliRunner().invoke(main, ["corpus", "add", str(c.path), str(case)])
    assert r.exit_code != 0 and "steps" in r.stderr
    r = CliRunner().invoke(main, ["corpus", "add", str(c.path), str(case), "--allow-incompatible", "--id", "x1"])
    assert r.exit_code == 0, r.output
    c2 = Corpus.open(c.path)
    assert c2.row(20)["id"] == "x1" and "steps, width" in c2.row(20)["note"]
    assert c2.dtype == "float32"  # ones are float32 values: no upcast


def test_signature_compatibility_rules():
    a = preset_signature("carlos-sdxl-vitb32")
    b = dict(a, seeds=tuple(a["seeds"]), guidance_scale=5, scheduler="DDIMScheduler", prompts_sha256=None)
    assert check_compatible(a, b) == ["scheduler"]
    assert "prompts_sha256" in unverifiable_fields(a, b)
    assert require_compatible(a, b, allow_incompatible=True)["differing"] == ["scheduler"]
    with pytest.raises(AuditError, match=r"scheduler .*--allow-incompatible"):
        require_compatible(a, b)


def test_build_corpus_from_cases(tmp_path):
    sig = dict(preset_signature("carlos-sdxl-vitb32"), base_model_sha256="ab" * 32)
    c = create_empty(tmp_path / "mine", sig, "mine")
    assert c.n == 0 and stats(c)["strength"] is None
    assert neighbours_for_vector(c, np.ones(4), 1.0, 0.1)["neighbours"] == []
    rng = np.random.default_rng(4)
    for i in range(3):
        add_case(c.path, _case(tmp_path, f"c{i}", rng.standard_normal(8).astype(np.float32), strength=i + 1.0))
    c2 = Corpus.open(c.path)
    assert c2.n == 3 and c2.dim == 8 and c2.dtype == "float32" and c2.ids == ["c0", "c1", "c2"]
    assert stats(c2)["sources"] == {"case": 3}
    assert neighbours(c2, ["c1"])["c1"]["strength_percentile"] == 50.0
    with pytest.raises(AuditError, match="dim 8"):
        add_case(c.path, _case(tmp_path, "wide", np.ones(9)))
    with pytest.raises(AuditError, match="all zero"):
        add_case(c.path, _case(tmp_path, "flat", np.zeros(8)))


def test_neighbours_for_vector_edge_cases(tmp_path):
    c, dirs = _small_corpus(tmp_path)
    r = neighbours_for_vector(c, dirs[3], 5.0, 0.2, top_k=4)
    assert r["neighbours"][0]["id"] == "3" and r["neighbours"][0]["similarity"] == pytest.approx(1.0)
    r = neighbours_for_vector(c, dirs[3], 5.0, 0.2, top_k=4, exclude_id="3")
    assert "3" not in [n["id"] for n in r["neighbours"]]
    assert neighbours_for_vector(c, np.zeros(512), 5.0, 0.2)["neighbours"] == []
    with pytest.raises(AuditError, match="512"):
        neighbours_for_vector(c, np.ones(3), 5.0, 0.2)
    with pytest.raises(AuditError, match="unknown LoRA id"):
        neighbours(c, ["3", "nope"])
