"""Run a build's units in this process, in plan order: shared (base) units, LoRA units, then
the finalize unit of each LoRA. The pipeline stays loaded between units (run/load.py LOADED)."""

from __future__ import annotations

import sys


def run_local(plan, *, threads: int | None, unit_fn, progress: bool = True) -> tuple[list, list]:
    from tqdm import tqdm

    from carlos_audit.engines.units import set_threads

    before = set_threads(threads)
    try:
        arm_results = [unit_fn(u, threads) for u in tqdm(plan.arm_units, desc="units", unit="unit",
                                                         disable=not progress, file=sys.stderr, leave=False)]
        fin_results = [unit_fn(u, threads) for u in tqdm(plan.finalize_units, desc="cases", unit="case",
                                                         disable=not progress, file=sys.stderr, leave=False)]
    finally:
        set_threads(before)
    return arm_results, fin_results
