"""Scale-out benchmark (issues 8, 17): tiny-pipeline throughput, the time split of a case run,
the wall time of a corpus build on the local engine and on 1 and 2 Ray workers, and images/s of a
build on a real `ray start` cluster (head + 1 or 2 worker nodes, one CPU each, loopback only).

    .venv/bin/python bench/bench_scale.py             # ~6-8 min on 2 CPU cores
    .venv/bin/python bench/bench_scale.py --no-ray    # skip the Ray builds
    .venv/bin/python bench/bench_scale.py --cluster-only   # only section 4

Everything runs on the CPU with the embedded tiny models in a temporary CARLOS_AUDIT_HOME that is
deleted afterwards. Protocol: builtin:demo (8 prompts), 64x64, DDIM, guidance 5, 10 steps (the
demo case's), batch 4 unless said. Builds profile 4 demo LoRAs x 8 prompts x 2 seeds; each build
starts from an empty base-image cache. Other processes using the cores change the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOME = Path(tempfile.mkdtemp(prefix="carlos-bench-scale-"))
os.environ["CARLOS_AUDIT_HOME"] = str(HOME)
sys.path.insert(0, str(REPO / "tests"))

import carlos_audit  # noqa: E402,F401  (OMP_WAIT_POLICY before torch)
import ray_cluster  # noqa: E402,F401  (loopback-only Ray and no usage stats: set before Ray is imported)

STEPS = 10
BUILD_LORAS = ("strong", "target", "weak", "derivative")


def _quiet():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "open_clip", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()


def throughput(n_images: int = 16) -> dict:
    from carlos_audit.case.protocol import enumerate_pairs, load_prompts
    from carlos_audit.models.loading import load_base_pipeline, set_scheduler
    from carlos_audit.run.generate import GenerationParams, generate_batch

    lp = load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu")
    set_scheduler(lp.pipe, "DDIMScheduler")
    params = GenerationParams(STEPS, 5.0, 64, 64, "DDIMScheduler", "")
    prompts, _ = load_prompts("builtin:demo")
    pairs = enumerate_pairs(prompts, [0, 1], 1)[:n_images]
    generate_batch(lp.pipe, [pairs[0].prompt.text], [0], params)  # warm-up
    out = {}
    for batch in (1, 4):
        t = time.perf_counter()
        for i in range(0, n_images, batch):
            chunk = pairs[i:i + batch]
            generate_batch(lp.pipe, [p.prompt.text for p in chunk], [p.seed for p in chunk], params)
        out[batch] = n_images / (time.perf_counter() - t)
    return out


def time_split(tmp: Path, assets: dict) -> dict:
    """One case (8 prompts x 4 seeds, base + LoRA arm, empty base cache) then its report."""
    from conftest import write_case

    from carlos_audit.case.casefile import load_case
    from carlos_audit.report import render_report
    from carlos_audit import pipeline, records
    from carlos_audit.analysis import case_analysis
    from carlos_audit.casefolder import unit_store as store
    from carlos_audit.run import embed, generate, load, profile

    spent = {"generation": 0.0, "clip": 0.0, "io": 0.0, "metrics": 0.0}

    def timed(kind, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[kind] += time.perf_counter() - t
        return wrapper

    patches = [(profile, "generate_batch", "generation"), (embed, "image_features", "clip"),
               (profile, "png_bytes", "io"), (store.CaseStore, "write_unit", "io"), (case_analysis, "analyse_case", "metrics"),
               (records.Manifest, "write", "io")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, kind in patches:
        setattr(obj, name, timed(kind, getattr(obj, name)))
    extra = "[indicators]\ntrigger_dependence = false\nprompt_override = false\neffect_labels = false\n"
    cf = write_case(tmp, assets, case_id="split", seeds="{ count = 4, start = 0 }", steps=STEPS, extra=extra)
    shutil.rmtree(HOME / "base-cache", ignore_errors=True)
    load.process_models().clear()
    try:
        t = time.perf_counter()
        pipeline.run_case(load_case(cf), tmp / "split", progress=False)
        case_s = time.perf_counter() - t
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    t = time.perf_counter()
    render_report(tmp / "split")
    spent["report"] = time.perf_counter() - t
    spent["other (load, intake, hashing)"] = case_s - sum(v for k, v in spent.items() if k != "report")
    spent["case_total"] = case_s
    _ = generate  # generation counted through profile.generate_batch
    return spent


def build(tmp: Path, assets: dict, label: str, **kw) -> dict:
    from conftest import write_case

    from carlos_audit.engines.corpus_build import build_corpus
    from carlos_audit.fileio import read_json

    loras = tmp / "loras"
    if not loras.is_dir():
        loras.mkdir()
        for k in BUILD_LORAS:
            shutil.copy(assets["loras"][k], loras / f"{k}.safetensors")
        write_case(tmp, assets, case_id="tmpl", steps=STEPS)
    dest = tmp / f"build-{label}"
    shutil.rmtree(HOME / "base-cache", ignore_errors=True)
    t = time.perf_counter()
    build_corpus(loras, tmp / "tmpl.toml", dest, progress=False, **kw)
    wall = time.perf_counter() - t
    b = read_json(dest / "build.json")
    return {"wall_s": wall, "generated": b["images"]["generated"], "minimum": b["images"]["minimum"],
            "naive": b["images"]["naive_per_lora_base"], "cost": b["cost"]["total"]}


def cluster_build(tmp: Path, assets: dict, n_workers: int) -> dict:
    """A build on a `ray start` head + ``n_workers`` worker nodes (each 1 CPU, its own temp dir and
    CARLOS_AUDIT_HOME), joined with --ray-address; images/s over the build and per node."""
    import ray
    from ray_cluster import Cluster, loopback_env, ray_resolves_loopback, short_tmp

    from carlos_audit.fileio import read_json

    # without it the driver turns 127.0.0.1 into this machine's interface address and connects there
    assert ray_resolves_loopback(), "Ray was imported before tests/ray_cluster.py set its loopback variable"

    root = short_tmp()
    c = Cluster(root, {"RAY_AUTH_MODE": "token", "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        t = time.perf_counter()
        c.start_head()
        for i in range(n_workers):
            c.start_worker(f"w{i + 1}", {"CARLOS_AUDIT_HOME": str(root / f"w{i + 1}" / "home")})
        start_s = time.perf_counter() - t
        with loopback_env(root):
            r = build(tmp, assets, f"cluster{n_workers}", engine="ray", ray_address=c.address, threads=1)
            ray.shutdown()
        b = read_json(tmp / f"build-cluster{n_workers}" / "build.json")
        r["start_s"], r["nodes"] = start_s, b["this_invocation"]["nodes"]
        return r
    finally:
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--cluster-only", action="store_true")
    args = ap.parse_args()
    _quiet()
    import torch

    from carlos_audit.demo import prepare_demo

    tmp = Path(tempfile.mkdtemp(prefix="carlos-bench-work-"))
    try:
        assets = prepare_demo(corpus=False)
        print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
        if args.cluster_only:
            cluster_section(tmp, assets)
            return
        ips = throughput()
        print(f"\n1. tiny pipeline, {STEPS} steps 64x64 CFG: {ips[1]:.2f} images/s at batch 1, {ips[4]:.2f} images/s at batch 4 (default)")

        split = time_split(tmp, assets)
        print("\n2. time split of one case (8 prompts x 4 seeds, base + LoRA arm = 64 images) and its report:")
        for k in ("generation", "clip", "io", "metrics", "other (load, intake, hashing)", "report"):
            print(f"   {k:<31} {split[k]:7.2f} s")
        print(f"   {'case run total':<31} {split['case_total']:7.2f} s (+ report)")

        print(f"\n3. corpus build: {len(BUILD_LORAS)} LoRAs x 8 prompts x 2 seeds, {STEPS} steps (empty base cache each time)")
        rows = [("local, 2 threads", dict(engine="local", threads=2)), ("local, 1 thread", dict(engine="local", threads=1))]
        results = []
        for label, kw in rows:
            results.append((label, build(tmp, assets, label.replace(" ", "").replace(",", "-"), **kw)))
        if not args.no_ray:
            import ray

            for workers in (1, 2):
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
                         runtime_env={"env_vars": {"CARLOS_AUDIT_HOME": str(HOME), "OMP_WAIT_POLICY": "PASSIVE"}})
                try:
                    results.append((f"ray, {workers} worker{'s' if workers > 1 else ''} x 1 thread",
                                    build(tmp, assets, f"ray{workers}", engine="ray", threads=1)))
                finally:
                    ray.shutdown()
        for label, r in results:
            print(f"   {label:<26} wall {r['wall_s']:6.1f} s   images generated {r['generated']} "
                  f"(minimum (L+1)xPxS = {r['minimum']}, per-LoRA base would be {r['naive']}); "
                  f"UNet calls {r['cost']['unet_forward_calls']}, CLIP encodings {r['cost']['clip_image_encodings']}")
        print("   (Ray walls include starting the worker processes and loading the models in each; not ray.init)")
        if not args.no_ray:
            cluster_section(tmp, assets)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(HOME, ignore_errors=True)


def cluster_section(tmp: Path, assets: dict) -> None:
    print(f"\n4. corpus build on a `ray start` cluster (head without CPUs + worker nodes of 1 CPU, 1 torch thread), "
          f"{len(BUILD_LORAS)} LoRAs x 8 prompts x 2 seeds, {STEPS} steps, joined with --ray-address:")
    for n in (1, 2):
        r = cluster_build(tmp, assets, n)
        print(f"   {n} worker node{'s' if n > 1 else ' '}  wall {r['wall_s']:6.1f} s  "
              f"{r['generated'] / r['wall_s']:.2f} images/s over the build (cluster start {r['start_s']:.0f} s, not counted)")
        for node, v in r["nodes"].items():
            print(f"      node {node}: {v['units']} units, {v['images_generated']} images, {v['images_per_s']:.2f} images/s, "
                  f"busy {v['busy_s']:.1f} s")


if __name__ == "__main__":
    main()
