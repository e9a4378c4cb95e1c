"""Reproduction tolerance: the demo case exported as a kit and reproduced (every pair, with the
comparison LoRA and the reference corpus) under torch thread counts; prints the figures that
docs/REPRODUCIBILITY.md and carlos_audit/kit/measured_tolerance.json quote.

    python bench/bench_reproduction.py                       # demo case run here with 1 thread
    python bench/bench_reproduction.py --case-dir reports/demo --threads 1 2

Without --case-dir the demo models, LoRAs and corpus are built in a temporary CARLOS_AUDIT_HOME
and the demo case is run with torch threads = 1 first. CUDA float16 / bfloat16 against CPU
float32 is not measured here (no GPU on the CPU runners; see bench/gpu_check.py where present).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def figures(rep: dict) -> dict:
    main = rep["metrics"]["main"]
    c = rep["conclusions"] or {}
    pix = [i["pixels"] for i in rep["images"] if i["pixels"]]
    diffs = [d["diff_cosine"] for d in rep["diffs"] if d["profile"] == "main"]
    return {
        "verdict": rep["verdict"],
        "images_identical": f"{rep['summary']['images_identical']}/{rep['summary']['images_compared']}",
        "feature_cosine_min": rep["summary"]["feature_cosine_min"],
        "feature_cosine_median": rep["summary"]["feature_cosine_median"],
        "max_pixel_diff": max((p["max_abs"] for p in pix), default=0.0),
        "psnr_db_min": rep["summary"]["psnr_db_min"],
        "diff_cosine_min_main": min(diffs) if diffs else None,
        "strength_rel_diff": main["strength"]["rel_diff"],
        "consistency_abs_diff": main["consistency"]["abs_diff"],
        "metrics_inside_each_others_ci": all(main[k][x] for k in ("strength", "consistency")
                                             for x in ("original_in_reproduction_ci", "reproduction_in_original_ci")),
        "percentiles_unchanged": c.get("percentiles_unchanged"),
        "neighbours_unchanged": c.get("neighbours_unchanged"),
        "environment_differences": [d["what"] for d in rep["environment"]["differences"]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case-dir", type=Path, default=None, help="a finished demo case folder (default: run one)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--work", type=Path, default=None, help="where kits and reproductions go (default: a temp folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="carlos-repro-bench-"))
    if args.case_dir is None:
        os.environ.setdefault("CARLOS_AUDIT_HOME", str(work / "home"))
    import torch

    from carlos_audit.demo import prepare_demo
    from carlos_audit.kit.export import export_case
    from carlos_audit.kit.reproduce import reproduce

    assets = prepare_demo()
    case_dir = args.case_dir
    if case_dir is None:
        from carlos_audit.case.casefile import load_case
        from carlos_audit.pipeline import run_full

        torch.set_num_threads(1)
        case_dir = work / "demo"
        t = time.perf_counter()
        run_full(load_case(REPO / "casefiles" / "demo.toml"), case_dir, progress=False)
        print(f"demo case run with 1 thread in {time.perf_counter() - t:.1f} s")
    kit = work / "demo-kit.zip"
    export_case(case_dir, kit)
    print(f"kit {kit.stat().st_size:,} bytes")
    rows = {}
    for n in args.threads:
        t = time.perf_counter()
        rep = reproduce(kit, work / f"repro-t{n}", lora=assets["loras"]["target"], comparisons=[assets["loras"]["derivative"]],
                        corpus=assets["corpus"], sample=None, threads=n, force=True, progress=False)
        rows[f"threads={n}"] = figures(rep) | {"seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
