"""Error rates of the weight-space reading (head-to-head) on generated families of LoRA pairs.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_weights_error.py           # print the table
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_weights_error.py --write   # and store it

Families and thresholds: tests/weight_families.py and carlos_audit/lora/weights.py. With
``--write`` the table is stored as carlos_audit/lora/weight_error_rates.json, which the report
cites next to each weight-space reading (regenerate it whenever a threshold changes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from carlos_audit.fileio import write_json_atomic
from carlos_audit.lora.weights import ERROR_RATES_FILE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the LoRA-pair families are test code
from weight_families import measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--write", action="store_true", help=f"store the table as {Path(ERROR_RATES_FILE).name}")
    args = ap.parse_args()
    t0 = time.time()
    table = measure(args.reps)
    th = table["thresholds"]
    print(f"{args.reps} pairs per row; thresholds: same >= {th['same_cosine']}, rescaled when |norm ratio - 1| > "
          f"{th['rescale_tolerance']}, partial >= {th['partial_cosine']}\n")
    print("| family | parameter | expected reading | correct | error rate | median cosine | readings given |")
    print("|---|---|---|---|---|---|---|")
    for r in table["rows"]:
        given = ", ".join(f"{k} {v}" for k, v in r["counts"].items() if v)
        print(f"| {r['family']} | {r['parameter']} | {r['expected']} | {r['correct']}/{r['n']} | {r['error_rate']:.0%} | "
              f"{r['cosine_median']:.4f} | {given} |")
    if args.write:
        write_json_atomic(ERROR_RATES_FILE, table)
        print(f"\nwrote {ERROR_RATES_FILE}")
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
