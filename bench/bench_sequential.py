"""The sequential protocol measured: coverage at the stopping look, prompts used, conclusions kept.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_sequential.py     # the VALIDATION.md tables (~30 min)
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_sequential.py --cases 20 --rules pocock

Each simulated case is one row of the public CARLoS corpus (../shared/reference/
carlos_sdxl_vitb32_metrics.parquet) taken as a template: the coverage simulator's heavy-tailed
effect model (analysis/coverage.py: Student-t prompt and image scale factors, a low-rank
anisotropic residual, 512 values) with the row's direction and the effect size and scale whose
simulated consistency and strength are the row's (a lookup table of effect -> consistency
measured once per run), so the simulated cases span the
corpus's strength and consistency ranges. A case is the whole protocol, 280 prompts x --seeds
seeds; its **full-protocol value** is what that whole case measures. The sequential rule
(analysis/sequential_intervals.py, the rule below) then runs on the pre-registered order (a random
permutation of the prompts: in the simulation prompts are exchangeable) look by look, against
the real corpus with the template row left out, and stops when every target is met. Per rule:

* coverage: the share of cases whose interval at the stopping look holds the full-protocol value;
* prompts used at the stop (distribution) and images as a share of the full protocol;
* conclusions, stopped vs full run: the corpus percentiles (|difference|, and whether the full
  percentile lies in the stopped case's percentile band), the corpus decile of each value, the
  upstream retrieval filter (strength > 9.8 or consistency < 0.041), the top-5 neighbour set.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from carlos_audit.analysis import sequential_intervals as seq
from carlos_audit.analysis.coverage import Generator, Shape
from carlos_audit.analysis.metrics import consistency, strength
from carlos_audit.case.sequential_plan import SequentialSpec
from carlos_audit.corpus.search import nearest

PARQUET = Path(__file__).resolve().parents[2] / "shared" / "reference" / "carlos_sdxl_vitb32_metrics.parquet"
N_PROMPTS, STEP, MIN_PROMPTS = 280, 35, 70
BASE_RULES = {
    "pocock": dict(alpha=0.05, spending="pocock", strength_half_width=0.25, consistency_half_width=0.012,
                   percentile_half_width=4.0, neighbour_stability=0.8, neighbour_k=5),
    "pocock-loose": dict(alpha=0.05, spending="pocock", strength_half_width=0.4, consistency_half_width=0.02,
                         percentile_half_width=6.0, neighbour_stability=0.7, neighbour_k=5),
    "obrien-fleming": dict(alpha=0.05, spending="obrien-fleming", strength_half_width=0.25,
                           consistency_half_width=0.012, percentile_half_width=4.0, neighbour_stability=0.8,
                           neighbour_k=5),
}

#: each rule with Cochran's rule (normal_check, the default) and without it ("-nocheck")
RULES = {**{k: dict(v, normal_check=True) for k, v in BASE_RULES.items()},
         **{f"{k}-nocheck": dict(v, normal_check=False) for k, v in BASE_RULES.items()}}


def load_public_corpus(folder: Path):
    import pyarrow.parquet as pq

    from carlos_audit.corpus.write import create_corpus

    t = pq.read_table(PARQUET, columns=["version_id", "strength", "consistency", "direction"])
    dirs = np.stack(t["direction"].to_numpy(zero_copy_only=False)).astype(np.float64)
    s, c = np.asarray(t["strength"], dtype=float), np.asarray(t["consistency"], dtype=float)
    corpus = create_corpus(folder / "public", directions=dirs, name="carlos-public", signature=None,
                           rows={"id": [str(v) for v in t["version_id"].to_pylist()], "strength": s, "consistency": c})
    return corpus, dirs, s, c


def shape(effect: float, s: float = 5.0) -> Shape:
    return Shape("corpus row", effect=effect, prompt_share=0.4, dof=3.0, lowrank=8, scale=s)


def effect_curve(n_seeds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consistency and strength / scale of one whole simulated protocol per effect size (the fit's
    lookup table)."""
    effects = np.geomspace(1e-3, 20, 40)
    rng = np.random.default_rng(99)
    draws = [Generator(shape(e), 0).draw(rng, N_PROMPTS, n_seeds) for e in effects]
    return effects, np.array([consistency(d) for d in draws]), np.array([strength(d) / 5.0 for d in draws])


def template(row_dir: np.ndarray, s: float, c: float, seed: int, curve) -> Generator:
    """The heavy-tailed model of one corpus row: its direction, and the effect size and scale whose
    simulated consistency and strength are the row's (interpolated on ``curve``)."""
    effects, cons, ratio = curve
    effect = float(np.exp(np.interp(c, cons, np.log(effects))))
    gen = Generator(shape(effect, s / float(np.interp(np.log(effect), np.log(effects), ratio))), seed)
    gen.m = row_dir / np.linalg.norm(row_dir) * np.linalg.norm(gen.m)
    return gen


def conclusions(corpus, row: int, k: int, st: float, co: float, direction: np.ndarray) -> dict:
    pct = {"strength": corpus.percentile("strength", st, row), "consistency": corpus.percentile("consistency", co, row)}
    top = {r for r, _ in nearest(corpus, direction[None, :], k, exclude_rows=[row])[0]}
    return {"pct": pct, "decile": {key: min(int(v // 10), 9) for key, v in pct.items()},
            "filter": st > 9.8 or co < 0.041, "top": top}


def run_case(gen, corpus, row: int, rule: dict, n_seeds: int, rng, n_resamples: int, seed: int) -> dict:
    d = gen.draw(rng, N_PROMPTS, n_seeds)
    ids = [f"p{i:03d}" for i in range(N_PROMPTS) for _ in range(n_seeds)]
    full = {"strength": strength(d), "consistency": consistency(d)}
    full_c = conclusions(corpus, row, rule["neighbour_k"], full["strength"], full["consistency"], d.mean(axis=0))
    order = rng.permutation(N_PROMPTS)
    looks = list(range(MIN_PROMPTS, N_PROMPTS, STEP)) + [N_PROMPTS]
    fractions = [n / N_PROMPTS for n in looks]
    spec = SequentialSpec(**{"order_seed": 0, "step": STEP, "min_prompts": MIN_PROMPTS, **rule})
    setting = seq.LookSetting(spec, fractions, N_PROMPTS, n_seeds, n_resamples, seed, corpus, row)
    for k, n in enumerate(looks, start=1):
        keep = np.sort(order[:n])
        rows = (keep[:, None] * n_seeds + np.arange(n_seeds)).ravel()
        ev = seq.evaluate_look(d[rows], [ids[i] for i in rows], k, setting)
        if ev["met"]:
            break
    stop_c = conclusions(corpus, row, rule["neighbour_k"], ev["strength"]["estimate"], ev["consistency"]["estimate"],
                         d[rows].mean(axis=0))
    out = {"n": n, "look": k, "full": full}
    for key in full:
        lo, hi = ev[key]["interval"]
        out[f"cover_{key}"] = lo - 1e-12 <= full[key] <= hi + 1e-12
        band = ev[f"{key}_percentile"]["band"]
        out[f"band_{key}"] = band[0] - 1e-9 <= full_c["pct"][key] <= band[1] + 1e-9
        out[f"dpct_{key}"] = abs(stop_c["pct"][key] - full_c["pct"][key])
        out[f"decile_{key}"] = stop_c["decile"][key] != full_c["decile"][key]
    out["filter"] = stop_c["filter"] != full_c["filter"]
    out["top_same"] = stop_c["top"] == full_c["top"]
    out["top_overlap"] = len(stop_c["top"] & full_c["top"]) / max(len(full_c["top"]), 1)
    return out


def summarise(name: str, rs: list[dict], n_seeds: int) -> list[str]:
    n = np.array([r["n"] for r in rs])
    share = n.mean() / N_PROMPTS
    cov_s, cov_c = (np.mean([r[f"cover_{k}"] for r in rs]) for k in ("strength", "consistency"))
    se = math.sqrt(0.95 * 0.05 / len(rs))
    hist = ", ".join(f"{v}: {int((n == v).sum())}" for v in sorted(set(n.tolist())))
    return [
        f"| {name} | {len(rs)} | {cov_s:.3f} | {cov_c:.3f} | {np.mean([r['cover_strength'] and r['cover_consistency'] for r in rs]):.3f} | "
        f"{np.median(n):.0f} ({np.percentile(n, 10):.0f}-{np.percentile(n, 90):.0f}) | {share:.1%} | "
        f"{np.mean([r['stop_early'] for r in rs]):.0%} |",
        f"  prompts at the stop ({name}): {hist}; coverage standard error at 0.95: {se:.3f}",
        f"| {name} | {np.mean([r['band_strength'] for r in rs]):.3f} / {np.mean([r['band_consistency'] for r in rs]):.3f} | "
        f"{np.mean([r['dpct_strength'] for r in rs]):.2f} / {np.mean([r['dpct_consistency'] for r in rs]):.2f} | "
        f"{np.percentile([r['dpct_strength'] for r in rs], 95):.2f} / {np.percentile([r['dpct_consistency'] for r in rs], 95):.2f} | "
        f"{np.mean([r['decile_strength'] for r in rs]):.1%} / {np.mean([r['decile_consistency'] for r in rs]):.1%} | "
        f"{np.mean([r['filter'] for r in rs]):.1%} | {1 - np.mean([r['top_same'] for r in rs]):.1%} | "
        f"{np.mean([r['top_overlap'] for r in rs]):.3f} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=80)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--resamples", type=int, default=500)
    ap.add_argument("--rules", default="pocock,pocock-nocheck,pocock-loose,pocock-loose-nocheck,obrien-fleming-nocheck",
                    help=f"comma-separated, of: {', '.join(RULES)}")
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        corpus, dirs, s, c = load_public_corpus(Path(tmp))
        pick = np.random.default_rng(0).choice(len(s), size=args.cases, replace=args.cases > len(s))
        results = {name.strip(): [] for name in args.rules.split(",")}
        sims, curve = [], effect_curve(args.seeds)
        for i, row in enumerate(pick):
            gen = template(dirs[row], s[row], c[row], seed=i, curve=curve)
            for name in results:
                r = run_case(gen, corpus, int(row), RULES[name], args.seeds, np.random.default_rng([i, 7]),
                             args.resamples, seed=i)
                r["stop_early"] = r["n"] < N_PROMPTS
                results[name].append(r)
            sims.append(r["full"])
    fs, fc = np.array([x["strength"] for x in sims]), np.array([x["consistency"] for x in sims])
    print(f"{args.cases} simulated cases (corpus rows as templates), {N_PROMPTS} prompts x {args.seeds} seeds; "
          f"looks at {MIN_PROMPTS}, {MIN_PROMPTS + STEP}, ... {N_PROMPTS} prompts; {args.resamples} resamples")
    print(f"simulated full-protocol strength {fs.min():.2f}..{fs.max():.2f} (median {np.median(fs):.2f}; corpus "
          f"{s.min():.2f}..{s.max():.2f}, median {np.median(s):.2f}); consistency {fc.min():.4f}..{fc.max():.4f} "
          f"(median {np.median(fc):.4f}; corpus {c.min():.4f}..{c.max():.4f}, median {np.median(c):.4f})")
    for name, rule in RULES.items():
        if name in results:
            print(f"rule {name}: " + ", ".join(f"{k} = {v}" for k, v in rule.items()))
    lines = [summarise(name, rs, args.seeds) for name, rs in results.items()]
    print("\n| rule | cases | S coverage | C coverage | both | prompts at stop, median (10-90%) | images used | stopped early |")
    print("|---|---|---|---|---|---|---|---|")
    for ln in lines:
        print(ln[0])
    print("\n| rule | full percentile in stopped band (S / C) | mean abs percentile change (S / C) | 95th pct change (S / C) "
          "| decile differs (S / C) | upstream filter differs | top-5 set differs | top-5 overlap |")
    print("|---|---|---|---|---|---|---|---|")
    for ln in lines:
        print(ln[2])
    print()
    for ln in lines:
        print(ln[1])
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
