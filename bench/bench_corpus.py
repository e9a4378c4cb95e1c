"""Corpus benchmark: CLI wall time on the CARLoS corpus, and synthetic 10k / 100k / 1M-row corpora.

    PYTHONPATH=. .venv/bin/python bench/bench_corpus.py            # all sizes (~2-3 min, 2 GB temp disk)
    PYTHONPATH=. .venv/bin/python bench/bench_corpus.py --sizes 10000,100000

Each synthetic size runs in two child processes (create; open + queries) so that peak RSS is
per phase. Synthetic directions are 512-d float32 standard normals. Everything is written to a
temp folder that is deleted afterwards. Figures are warm-page-cache figures (the file was just
written); a cold disk read of a 2 GB matrix adds the disk's read time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARLOS = REPO.parent / "shared" / "reference" / "carlos_sdxl_vitb32_metrics.parquet"
DIM = 512


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def phase_create(n: int, dest: str) -> dict:
    import numpy as np

    from carlos_audit.corpus.write import create_corpus

    rng = np.random.default_rng(0)
    gen_s = 0.0

    def blocks():
        nonlocal gen_s
        for start in range(0, n, 65536):
            t = time.perf_counter()
            b = rng.standard_normal((min(65536, n - start), DIM), dtype=np.float32)
            gen_s += time.perf_counter() - t
            yield b

    t = time.perf_counter()
    rows = {"id": [f"s{i:07d}" for i in range(n)], "name": [f"synthetic {i}" for i in range(n)],
            "source": ["built"] * n, "strength": rng.uniform(1, 10, n),
            "consistency": np.where(np.arange(n) % 50 == 0, np.nan, rng.uniform(0, 0.5, n))}
    gen_s += time.perf_counter() - t
    t = time.perf_counter()
    create_corpus(dest, directions=blocks(), n=n, dim=DIM, rows=rows, signature=None, name=f"synthetic-{n}")
    total = time.perf_counter() - t
    size = sum(p.stat().st_size for p in Path(dest).iterdir())
    return {"create_s": total - gen_s + 0.0, "rng_s": gen_s, "disk_mb": size / 2**20, "peak_rss_mb": _rss_mb()}


def phase_query(n: int, dest: str, queries: int) -> dict:
    import numpy as np

    t = time.perf_counter()
    from carlos_audit.corpus.search import neighbours
    from carlos_audit.corpus.store import Corpus
    import_s = time.perf_counter() - t

    t = time.perf_counter()
    c = Corpus.open(dest)  # auto-verify: hashes checked only up to 256 MiB of data
    open_s = time.perf_counter() - t
    # open cost of the two storage choices, header parse + mmap only
    p = Path(dest) / "directions.npy"
    t = time.perf_counter()
    for _ in range(20):
        np.load(p, mmap_mode="r")
    npy_open_ms = (time.perf_counter() - t) / 20 * 1e3
    t = time.perf_counter()
    for _ in range(20):
        np.memmap(p, dtype="<f4", mode="r", offset=128, shape=(n, DIM))
    raw_open_ms = (time.perf_counter() - t) / 20 * 1e3

    rng = np.random.default_rng(1)
    qid = f"s{int(rng.integers(n)):07d}"
    t = time.perf_counter()
    neighbours(c, [qid], top_k=10)
    first_s = time.perf_counter() - t  # includes computing the cached storage-dtype norms
    warm = []
    for _ in range(3):
        qid = f"s{int(rng.integers(n)):07d}"
        t = time.perf_counter()
        neighbours(c, [qid], top_k=10)
        warm.append(time.perf_counter() - t)
    ids = [f"s{int(i):07d}" for i in rng.choice(n, size=queries, replace=False)]
    t = time.perf_counter()
    res = neighbours(c, ids, top_k=10)
    batch_s = time.perf_counter() - t
    assert len(res) == queries and all(len(v["neighbours"]) == 10 for v in res.values())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "carlos_audit.cli", "corpus", "neighbours", dest, "--lora-id", ids[0],
                        "--json"], capture_output=True, env=env, cwd=REPO)
    cli_s = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    return {"cli_s": cli_s, "import_s": import_s, "open_s": open_s, "npy_open_ms": npy_open_ms, "raw_memmap_open_ms": raw_open_ms,
            "first_query_s": first_s, "warm_query_s": statistics.median(warm), "batch_s": batch_s,
            "queries": queries, "peak_rss_mb": _rss_mb()}


def bench_carlos(tmp: Path) -> None:
    if not CARLOS.is_file():
        print(f"CARLoS reference absent ({CARLOS}): skipping the CLI figure")
        return
    sys.path.insert(0, str(REPO))
    from carlos_audit.corpus.carlos import import_carlos_db

    t = time.perf_counter()
    c = import_carlos_db(CARLOS, tmp / "carlos")
    imp = time.perf_counter() - t
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "carlos_audit.cli", "corpus", "neighbours", str(c.path),
           "--lora-id", c.ids[0], "--top-k", "10", "--json"]
    walls = []
    for _ in range(7):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, env=env, cwd=REPO)
        walls.append(time.perf_counter() - t)
        assert r.returncode == 0, r.stderr
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env)
    bare = time.perf_counter() - t
    print(f"CARLoS 740 rows: import {imp:.3f} s; `corpus neighbours --json` whole process: "
          f"median {statistics.median(walls):.3f} s, min {min(walls):.3f} s (bare python start {bare:.3f} s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--phase", choices=["create", "query"])
    ap.add_argument("--n", type=int)
    ap.add_argument("--dest")
    a = ap.parse_args()
    if a.phase == "create":
        print(json.dumps(phase_create(a.n, a.dest)))
        return
    if a.phase == "query":
        print(json.dumps(phase_query(a.n, a.dest, a.queries)))
        return
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_corpus_"))
    try:
        bench_carlos(tmp)
        print(f"{'rows':>9} {'create s':>9} {'(rng s)':>8} {'disk MB':>8} {'RSS MB':>7} | {'import s':>8} "
              f"{'open s':>7} {'npy/raw open ms':>15} {'1st q s':>8} {'warm q s':>8} {'1000 q s':>8} {'RSS MB':>7} {'CLI s':>6}")
        for n in [int(x) for x in a.sizes.split(",")]:
            dest = tmp / f"syn{n}"
            cr = _child(["--phase", "create", "--n", str(n), "--dest", str(dest)])
            qr = _child(["--phase", "query", "--n", str(n), "--dest", str(dest), "--queries", str(a.queries)])
            print(f"{n:>9} {cr['create_s']:>9.2f} {cr['rng_s']:>8.2f} {cr['disk_mb']:>8.0f} {cr['peak_rss_mb']:>7.0f} | "
                  f"{qr['import_s']:>8.3f} {qr['open_s']:>7.3f} {qr['npy_open_ms']:>7.3f}/{qr['raw_memmap_open_ms']:<7.3f} "
                  f"{qr['first_query_s']:>8.3f} {qr['warm_query_s']:>8.3f} {qr['batch_s']:>8.2f} {qr['peak_rss_mb']:>7.0f} "
                  f"{qr['cli_s']:>6.2f}",
                  flush=True)
            shutil.rmtree(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"total bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
