"""Run a build's units in this process, in plan order: shared (base) units, LoRA units, then
the finalize unit of each LoRA, through the same driver code as the Ray engine (a unit returns
its files; the driver writes them). The pipeline stays loaded between units (held by the process's engines/units.UnitWorker)."""

from __future__ import annotations


def run_local(plan, *, threads: int | None, unit_fn, progress: bool = True) -> tuple[list, list, dict]:
    from carlos_audit.engines.driver import Driver
    from carlos_audit.engines.units import set_threads

    driver = Driver(plan, progress)
    before = set_threads(threads)
    try:
        for u in driver.arm_todo():
            driver.accept(u, unit_fn(u, threads))
        for f in driver.ready():
            files = driver.finalize_files(f)
            if files is not None:
                driver.accept(f, unit_fn(f, threads, files))
    finally:
        set_threads(before)
    return driver.results()
