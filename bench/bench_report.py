"""Benchmark: render the evidentiary PDF of a long case from synthetic stored results.

A long case is 280 prompts x 16 seeds = 4,480 pairs (8,960 images). This script writes a
synthetic finished case folder (64x64 PNGs, fake raw features, metrics.json computed from them
by carlos_audit.analysis.metrics, manifest.json with every pair), then times ``render_report`` and reports
peak memory. Nothing is generated with a model and torch is not imported.

    .venv/bin/python bench/bench_report.py                    # 280 x 16, in a temp folder
    .venv/bin/python bench/bench_report.py --prompts 40 --seeds 4 --keep /tmp/bench-case
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from carlos_audit.analysis.metrics import compute_metrics
from carlos_audit.fileio import write_bytes_atomic, write_json_atomic
from carlos_audit.hashing import sha256_bytes, sha256_file
from carlos_audit.records import Metrics

CATEGORIES = ["people", "animals", "landscapes", "architecture", "objects", "food", "scenes", "fantasy", "vehicles", "art"]
FEATURE_DIM = 768
EPOCH = 1767225600  # 2026-01-01T00:00:00Z


def png(rng: np.random.Generator, px: int, tint: np.ndarray) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:px, 0:px] / px
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 160 + tint
    noise = rng.normal(0, 18, size=(px, px, 3))
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def npy(vec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vec.astype("<f4"), allow_pickle=False)
    return buf.getvalue()


def synthetic_case(root: Path, n_prompts: int, n_seeds: int, px: int = 64) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    style = rng.normal(0, 1, FEATURE_DIM)
    prompts = [{"id": f"p{i + 1:03d}", "category": CATEGORIES[i % len(CATEGORIES)], "subcategory": "synthetic",
                "text": f"a synthetic test prompt number {i + 1} describing a {CATEGORIES[i % len(CATEGORIES)]} scene in some detail"}
               for i in range(n_prompts)]
    pairs, base_f, lora_f = [], [], []
    for p in prompts:
        for seed in range(n_seeds):
            pid = f"{p['id']}_s{seed}"
            idx = len(pairs)
            fb = rng.normal(0, 3, FEATURE_DIM)
            fl = fb + 0.4 * style + rng.normal(0, 0.6, FEATURE_DIM)
            base_f.append(fb)
            lora_f.append(fl)
            arms = {}
            for arm, feat, tint in (("base", fb, np.array([40, 30, 20])), ("lora", fl, np.array([70, 20, 60]))):
                img = png(rng, px, tint)
                emb = npy(feat)
                write_bytes_atomic(root / f"images/{arm}/{pid}.png", img)
                write_bytes_atomic(root / f"embeddings/{arm}/{pid}.npy", emb)
                arms[arm] = {"prompt": p["text"] + ", sks", "image": f"images/{arm}/{pid}.png", "image_sha256": sha256_bytes(img),
                             "embedding": f"embeddings/{arm}/{pid}.npy", "embedding_sha256": sha256_bytes(emb)}
            pairs.append({"pair_id": pid, "prompt_id": p["id"], "category": p["category"], "subcategory": p["subcategory"],
                          "seed": seed, "batch": idx // 8, "position": idx % 8, "arms": arms})
    metrics = Metrics(**compute_metrics(np.array(lora_f), np.array(base_f), pairs, n_resamples=200, seed=0))
    metrics.write(root)
    lora_file = root.parent / "bench-lora.safetensors"
    lora_file.write_bytes(b"synthetic" * 1000)
    lsha = sha256_file(lora_file)
    seeds = list(range(n_seeds))
    params = {"steps": 30, "guidance_scale": 7.5, "width": 512, "height": 512, "scheduler": "DDIMScheduler", "negative_prompt": ""}
    manifest = {
        "schema": "carlos-audit/manifest/1",
        "case": {"id": "bench-long", "title": "Benchmark: a long synthetic case", "examiner": "bench",
                 "question": "How long does rendering take?", "exhibit": "Exhibit B-1"},
        "tool": {"name": "carlos-audit", "version": "bench", "git_commit": None},
        "run": {"started_utc": "2026-01-01T00:00:00Z", "finished_utc": "2026-01-01T05:00:00Z", "source_date_epoch": EPOCH,
                "command": ["carlos-audit", "run", "bench.toml"], "stats": {}},
        "inputs": [{"role": "lora", "kind": "file", "path": str(lora_file), "size": lora_file.stat().st_size,
                    "sha256": lsha, "sha256_end": lsha, "unchanged": True}],
        "custody_ok": True,
        "base_model": {"source": "synthetic", "identity": "synthetic-sd15", "sha256": "0" * 64, "architecture": "sd15",
                       "path": None, "dtype": "float16", "device": "cuda", "pipeline": "StableDiffusionPipeline"},
        "embedder": {"model": "ViT-L-14", "pretrained": "openai", "identity": "ViT-L-14/openai", "sha256": "1" * 64,
                     "feature_dim": FEATURE_DIM, "features": "raw image features (encode_image, normalize=False)", "preprocess": "n/a"},
        "lora": {"path": str(lora_file), "file_name": lora_file.name, "sha256": lsha, "scale": 1.0, "trigger_words": ["sks"],
                 "trigger_policy": "both", "load": {"partial": False, "applied": 192, "in_file": 192, "unapplied": []}},
        "protocol": {"prompts": "bench.txt", "prompt_source": {"kind": "file"}, "prompts_sha256": "2" * 64, "n_prompts": n_prompts,
                     "seeds": seeds, **params, "batch_size": 8, "bootstrap_resamples": 200, "bootstrap_seed": 0,
                     "arms": {"base": {"adapter": None, "scale": 0.0, "with_triggers": True},
                              "lora": {"adapter": "target", "scale": 1.0, "with_triggers": True}}},
        "signature": {"base_model": "synthetic-sd15", "embedder": "ViT-L-14/openai", "seeds": seeds, **params},
        "prompts": prompts,
        "pairs": pairs,
        "results": {"metrics.json": sha256_file(root / "metrics.json")},
        "environment": {"python": sys.version.split()[0], "device": "cuda", "packages": {"carlos-audit": "bench"}},
    }
    write_json_atomic(root / "manifest.json", manifest)
    return root


def maxrss_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: kilobytes


def render_in_child(root: Path) -> None:
    code = "import sys; from pathlib import Path; from carlos_audit.report import render_report; render_report(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(root)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=280)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--px", type=int, default=64, help="image edge in pixels (a real SD 1.5 case: 512)")
    ap.add_argument("--keep", type=Path, default=None, help="write the case here and keep it")
    args = ap.parse_args()

    tmp = None
    if args.keep is None:
        tmp = Path(tempfile.mkdtemp(prefix="carlos-bench-report-"))
        root = tmp / "case"
    else:
        root = args.keep
    try:
        t0 = time.perf_counter()
        synthetic_case(root, args.prompts, args.seeds, args.px)
        t_setup = time.perf_counter() - t0
        rss_setup = maxrss_mb(resource.RUSAGE_SELF)

        # each render in a fresh process, so RUSAGE_CHILDREN is the renderer's own peak
        t0 = time.perf_counter()
        render_in_child(root)
        t_render = time.perf_counter() - t0
        rss_render = maxrss_mb(resource.RUSAGE_CHILDREN)
        pdf = root / "report.pdf"
        first = sha256_file(pdf)

        t0 = time.perf_counter()
        render_in_child(root)
        t_rerender = time.perf_counter() - t0
        identical = sha256_file(pdf) == first and (root / "report.pdf.sha256").read_text().split()[0] == first

        info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True).stdout if shutil.which("pdfinfo") else ""
        pages = next((ln.split()[-1] for ln in info.splitlines() if ln.startswith("Pages:")), "?")
        n_pairs = args.prompts * args.seeds
        print(f"case             {args.prompts} prompts x {args.seeds} seeds = {n_pairs} pairs ({2 * n_pairs} images, {args.px}x{args.px} PNG)")
        print(f"setup            {t_setup:.1f} s (synthetic images, features, metrics, manifest)")
        print(f"render_report    {t_render:.1f} s  (second render {t_rerender:.1f} s)")
        print(f"peak RSS         {rss_render:.0f} MB (rendering process, ru_maxrss of RUSAGE_CHILDREN); setup process {rss_setup:.0f} MB")
        print(f"pdf              {pages} pages, {pdf.stat().st_size / 1e6:.1f} MB, re-render byte-identical: {identical}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
