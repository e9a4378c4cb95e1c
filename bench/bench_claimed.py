"""Claimed-works alignment and its false-alignment rate on known truth (tiny models).

    flock /tmp/carlos-heavy.lock env OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python bench/bench_claimed.py

Families: F source LoRAs (random rank-4 demo-style LoRAs, effect 1). Each source makes the
family's "claimed works" (its images on prompts of their own). Derived from each source:
``merge`` (0.8 source + 0.2 another LoRA, rank 8), ``rescale`` (the source's up factors x 0.5),
``continued`` (the source plus an independent update of effect 0.3, rank 8: a stand-in for
continued training). Unrelated: the other families' members and R random LoRAs. Every LoRA is
profiled by ``corpus build`` under one protocol (8 demo prompts x 4 seeds, shared base arm).

For family f, u_f = mean(works_f) - mean(base arm); the alignment of a LoRA is cos(D, u_f)
(analysis/claimed_calibration.cos) and its false-alignment rate the share of the reference rows (every
LoRA outside family f, the row itself left out) at least as aligned (claimed_calibration.Rater).
ROC: derived members of f (positives) against unrelated LoRAs (negatives), scored by alignment.

Regimes of the works: ``seed-matched`` (the protocol's seeds, PNG), ``own seeds`` (seeds
1000+, PNG), ``jpeg`` (seed-matched, saved as JPEG quality 90). Prints the tables of
docs/VALIDATION.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

DERIVED = ("merge", "rescale", "continued")
WORK_PROMPTS = ["a portrait of a woman in a garden", "a harbour with boats at dawn",
                "a bowl of pears on a wooden table", "a fox standing in tall grass"]


def template(folder: Path, size: int, steps: int) -> Path:
    """The demo case's protocol (casefiles/demo.toml) at ``size`` px and ``steps`` steps, no trigger words."""
    import tomllib

    from carlos_audit.case.casefile import dump_case
    from carlos_audit.demo import DEMO_CASEFILE

    data = tomllib.loads(DEMO_CASEFILE.read_text("utf-8"))
    data["case"].update(id="bench", title="bench: claimed works on known truth")
    data["lora"] = {"path": "x.safetensors", "trigger_policy": "none"}
    data["protocol"].update(steps=steps, width=size, height=size, bootstrap_resamples=100)
    data["protocol"].pop("scales", None)
    for table in ("comparison", "reference", "indicators"):
        data.pop(table, None)
    p = folder / "template.toml"
    p.write_text(dump_case(data))
    return p


def write_loras(folder: Path, families: int, randoms: int) -> dict[str, str]:
    """Every bench LoRA file; returns {row id: family} ("" for the random ones)."""
    from carlos_audit.models.demo_loras import lora_factors, target_modules, to_diffusers, write_lora

    modules = target_modules()
    meta = {"format": "pt"}
    fam = {}
    for f in range(families):
        src = lora_factors(301 + f, 1.0, modules)
        other, extra = lora_factors(401 + f, 1.0, modules), lora_factors(501 + f, 0.3, modules)
        members = {
            "source": src,
            "merge": {k: (np.concatenate([src[k][0], other[k][0]]), np.concatenate([0.8 * src[k][1], 0.2 * other[k][1]], 1))
                      for k in src},
            "rescale": {k: (src[k][0], 0.5 * src[k][1]) for k in src},
            "continued": {k: (np.concatenate([src[k][0], extra[k][0]]), np.concatenate([src[k][1], extra[k][1]], 1))
                          for k in src},
        }
        for kind, factors in members.items():
            write_lora(folder / f"f{f}_{kind}.safetensors", to_diffusers(factors), meta)
            fam[f"f{f}_{kind}"] = f"f{f}"
    for r in range(randoms):
        write_lora(folder / f"r{r:02d}.safetensors", to_diffusers(lora_factors(601 + r, 1.0, modules)), meta)
        fam[f"r{r:02d}"] = ""
    return fam


def work_features(loras: Path, families: int, size: int, steps: int) -> dict[tuple[int, str], np.ndarray]:
    """Features of each family's works in each regime, decoded as a case run decodes them."""
    import io

    from carlos_audit.case.claimed_works import decode
    from carlos_audit.demo_claimed import encode, generate_works
    from carlos_audit.models.embedders import load_embedder
    from carlos_audit.run.embed import image_features

    emb = load_embedder("embedded:tiny-clip", None, device="cpu")
    prompts = [p for p in WORK_PROMPTS for _ in range(4)]
    out = {}
    for f in range(families):
        src = loras / f"f{f}_source.safetensors"
        matched = generate_works(src, prompts, [s for _ in WORK_PROMPTS for s in range(4)], steps=steps, size=size)
        own = generate_works(src, prompts, [1000 + 4 * i + s for i in range(len(WORK_PROMPTS)) for s in range(4)],
                             steps=steps, size=size)
        for regime, images, fmt in (("seed-matched", matched, "PNG"), ("own seeds", own, "PNG"), ("jpeg", matched, "JPEG")):
            decoded = []
            for im in images:
                data = encode(im, fmt) if fmt == "PNG" else _jpeg(im, io)
                decoded.append(decode(data, "work")[0])
            out[(f, regime)] = image_features(emb, decoded).astype(np.float64)
    return out


def _jpeg(im, io) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Rows:
    """Corpus-like view over chosen direction rows, for claimed_calibration.Rater."""

    def __init__(self, directions: np.ndarray):
        self.directions, self.n = directions, directions.shape[0]


def auc(pos: list[float], neg: list[float]) -> float:
    """Probability that a positive scores above a negative (ties count one half)."""
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def roc_points(pos: list[float], neg: list[float]) -> list[tuple[float, float, float]]:
    out = []
    for t in sorted(set(pos) | set(neg), reverse=True):
        out.append((t, float(np.mean(np.asarray(neg) >= t)), float(np.mean(np.asarray(pos) >= t))))
    return out


def main() -> None:
    from carlos_audit.analysis.claimed_calibration import cos
    from carlos_audit.analysis.claimed_calibration import Rater
    from carlos_audit.engines.corpus_build import build_corpus
    from carlos_audit.corpus.store import load_corpus
    from carlos_audit.demo import prepare_demo
    from carlos_audit.records import Manifest
    from carlos_audit.casefolder.unit_store import CaseStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--families", type=int, default=4)
    ap.add_argument("--randoms", type=int, default=12)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    t0 = time.time()
    prepare_demo(corpus=False, claimed=False)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-claimed-"))
    (work / "loras").mkdir(parents=True, exist_ok=True)
    fam = write_loras(work / "loras", args.families, args.randoms)
    build_corpus(work / "loras", template(work, args.size, args.steps), work / "corpus", name="bench", progress=False)
    corpus = load_corpus(work / "corpus")
    D = np.asarray(corpus.directions, dtype=np.float64)
    case = work / "corpus" / "cases" / corpus.ids[0]
    m = Manifest.read(case)
    base = CaseStore(case).features(m.protocol["profiles"]["main"][0], [r["pair_id"] for r in m.pairs]).astype(np.float64)
    works = work_features(work / "loras", args.families, args.size, args.steps)
    print(f"{corpus.n} LoRAs profiled ({len(m.pairs)} pairs each, {args.size} px, {args.steps} steps); "
          f"{len(next(iter(works.values())))} works per family; {time.time() - t0:.0f} s\n")
    ids = corpus.ids
    summary = {}
    for regime in ("seed-matched", "own seeds", "jpeg"):
        pos, neg, by_kind = [], [], {k: {"alignment": [], "rate": []} for k in ("source",) + DERIVED + ("unrelated",)}
        for f in range(args.families):
            u = works[(f, regime)].mean(axis=0) - base.mean(axis=0)
            a = np.array([cos(D[i], u) for i in range(len(ids))])
            outside = np.array([fam[i] != f"f{f}" for i in ids])
            for i, rid in enumerate(ids):
                keep = outside.copy()
                keep[i] = False
                rate = Rater(Rows(D), keep).rates(u[None, :], [a[i]])[0]
                kind = rid.split("_", 1)[1] if fam[rid] == f"f{f}" else "unrelated"
                by_kind[kind]["alignment"].append(a[i])
                by_kind[kind]["rate"].append(rate)
                (pos if kind in DERIVED else neg if kind == "unrelated" else []).append(a[i])
        summary[regime] = (by_kind, auc(pos, neg), roc_points(pos, neg))
    print("| works | LoRA | n | median alignment | median false-alignment rate | share with rate <= 5% |")
    print("|---|---|---|---|---|---|")
    for regime, (by_kind, _, _) in summary.items():
        for kind, v in by_kind.items():
            r = np.array(v["rate"], dtype=float)
            print(f"| {regime} | {kind} | {len(r)} | {np.median(v['alignment']):.3f} | {np.median(r):.1%} | "
                  f"{np.mean(r <= 0.05):.0%} |")
    print("\n| works | ROC AUC (derived vs unrelated, by alignment) | false-positive rate at true-positive rate >= 0.9 |")
    print("|---|---|---|")
    for regime, (_, a, pts) in summary.items():
        fpr = min((fp for _, fp, tp in pts if tp >= 0.9), default=1.0)
        print(f"| {regime} | {a:.3f} | {fpr:.2f} |")
    print(f"\ntotal {time.time() - t0:.0f} s; work folder {work}")


if __name__ == "__main__":
    main()
