"""Host-chain benchmark (issue 24): does the device wait for PNG encoding, hashing and writing?

    .venv/bin/python bench/bench_host_chain.py                 # ~1-2 min on 2 CPU cores
    .venv/bin/python bench/bench_host_chain.py --rate 2.5 --batches 16 --workers 2

Runs the real batch path of a run (run/profile.py produce_batch -> run/hostchain.py: PNG encode,
base-image cache, CLIP embedding from memory with the embedded tiny CLIP, sha256, fsync'd atomic
writes, unit record last) on the base arm of a case store in a temporary folder, with a stand-in
generator in place of the diffusion pipeline: it yields 1024 x 1024 RGB batches of 4 (smooth
images with sensor-like noise, about as costly to encode as real ones) at a chosen rate in
images/s, sleeping as a device wait would (the GIL is free meanwhile). Prints:

- host ms/image, serial (the engines' run_batch: one unit after another) and pipelined (the
  HostChain of run_arm with the generator instant: the host chain's own throughput);
- for the chosen generation rate: wall time of run_arm, the generation time alone, the ratio
  wall / generation, and wall / max(generation, host pipelined). When the host chain is the
  faster of the two the device never waits: the ratio stays within 10% of 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
HOME = Path(tempfile.mkdtemp(prefix="carlos-bench-host-"))
os.environ["CARLOS_AUDIT_HOME"] = str(HOME)
sys.path.insert(0, str(REPO))

import carlos_audit  # noqa: E402,F401  (OMP_WAIT_POLICY before torch)

SIZE = 1024
BATCH = 4


def stand_in_images(n: int, seed: int = 0):
    """``n`` distinct 1024 x 1024 RGB images: smooth content (a bicubic-upsampled 48 px random
    image) plus noise of sigma 3, so PNG encoding costs about what it costs on a generated image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
        smooth = np.asarray(small.resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32)
        noisy = np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(noisy, "RGB"))
    return out


def make_session(root: Path, pool):
    from carlos_audit.models.embedders import load_embedder
    from carlos_audit.run.generate import GenerationParams
    from carlos_audit.run.profile import Session
    from carlos_audit.casefolder.unit_store import BaseImageCache, CaseStore

    emb = load_embedder("embedded:tiny-clip", None)
    params = GenerationParams(25, 5.0, SIZE, SIZE, "EulerDiscreteScheduler", "", "per-image")
    return Session(None, CaseStore(root / "case"), None, SimpleNamespace(sha256="bench"), emb, params, [],
                   BaseImageCache(root / "base-cache"), {"device": "bench"}, BATCH)


def pairs_for(n_batches: int):
    from carlos_audit.case.protocol import enumerate_pairs, load_prompts

    prompts, _ = load_prompts("builtin:demo")
    seeds = list(range((n_batches * BATCH + len(prompts) - 1) // len(prompts)))
    return enumerate_pairs(prompts, seeds, BATCH)[: n_batches * BATCH]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=None,
                    help="generation images/s (default: 0.8 x the measured pipelined host rate)")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, default=None, help="host threads (default: run/hostchain.default_workers)")
    args = ap.parse_args()

    import torch

    from carlos_audit.run import profile
    from carlos_audit.run.arms import Arm
    from carlos_audit.run.hostchain import default_workers

    workers = args.workers or default_workers()
    os.environ["CARLOS_AUDIT_HOST_WORKERS"] = str(workers)
    pool = stand_in_images(8)
    delay = {"s_per_image": 0.0}

    def generator(pipe, prompts, seeds, params):
        time.sleep(delay["s_per_image"] * len(prompts))
        return [pool[(s * 3 + len(p)) % len(pool)] for p, s in zip(prompts, seeds)]

    profile.generate_batch = generator  # the stand-in device; everything after it is the real path
    arm = Arm("base", None, 0.0, False)
    pairs = pairs_for(args.batches)
    n = len(pairs)

    def fresh(tag: str):
        root = HOME / tag
        shutil.rmtree(root, ignore_errors=True)
        return make_session(root, pool)

    print(f"bench_host_chain: {n} images of {SIZE}x{SIZE} in batches of {BATCH}, {workers} host thread(s), "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}", flush=True)
    s = fresh("warm")
    profile.run_batch(s, arm, pairs[:BATCH])  # warm-up (imports, first allocations), not timed
    s = fresh("serial")
    serial = timed(lambda: [profile.run_batch(s, arm, b) for b in profile.batches(pairs)])
    print(f"host ms/image serial     {1000 * serial / n:8.1f}", flush=True)
    s = fresh("pipelined")
    piped = timed(lambda: profile.run_arm(s, arm, pairs, progress=False))
    print(f"host ms/image pipelined  {1000 * piped / n:8.1f}  ({serial / piped:.2f}x)", flush=True)

    rate = args.rate or 0.8 * n / piped
    delay["s_per_image"] = 1.0 / rate
    generation = n / rate
    s = fresh("overlap")
    wall = timed(lambda: profile.run_arm(s, arm, pairs, progress=False))
    bound = max(generation, piped)
    print(f"generation {rate:.2f} images/s: generation {generation:.2f} s, host pipelined {piped:.2f} s, "
          f"serial sum {generation + serial:.2f} s", flush=True)
    print(f"wall {wall:.2f} s   wall / generation {wall / generation:.3f}   wall / max(generation, host) "
          f"{wall / bound:.3f}   {'OK' if wall <= 1.10 * bound else 'OVER'} (target <= 1.10)", flush=True)
    shutil.rmtree(HOME, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
