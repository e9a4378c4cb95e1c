"""One case on N devices: ``run --devices cuda:0,cuda:1,...`` (or ``cpu,cpu`` on a machine
without a GPU: the same code path with CPU worker processes).

The units of the case ((arm, batch): the resume points of casefolder/unit_store.py) that are not done are
dealt round-robin to one worker process per device. Each worker loads the models once on its
device, with the thread count of this process, and runs the units it was dealt through the same
batch path as a one-device run (run/profile.produce_batch and the host chain), writing them
into the case folder (its record last). A unit's bytes depend only on its batch layout and on
the device class (case/signature.py), so the folder ends byte-identical to a one-device run of
the same class. Then the ordinary run (``run_full``) finds every unit done and writes metrics,
indicators, comparisons, manifest and report, as ever. A worker's failure is one line, after
the other workers finished the units they had started; the same command resumes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from carlos_audit.case.options import RunOptions
from carlos_audit.errors import AuditError


def parse_devices(spec: str) -> list[str]:
    """``cuda:0,cuda:1`` / ``cpu,cpu``: one worker per entry, all of one device class."""
    import re

    from carlos_audit.run.devices import device_class

    devices = [d.strip() for d in str(spec).split(",") if d.strip()]
    bad = [d for d in devices if not (d == "cpu" or re.fullmatch(r"cuda(:\d+)?", d))]
    if not devices or bad:
        raise AuditError(f"--devices {spec!r}: give a comma-separated list of cpu or cuda:N (e.g. cuda:0,cuda:1)")
    if len({device_class(d) for d in devices}) > 1:
        raise AuditError(f"--devices {spec!r} mixes device classes; one case runs on devices of one class "
                         "(their bits differ otherwise)")
    return devices


def case_units(case, paths: dict, inputs: list[dict]):
    """(arm plan, {batch: pairs}, the folder's binding of the inputs: run/intake.input_binding) of
    a case, from the case and its hashed inputs (no model loaded)."""
    from carlos_audit.case.protocol import batches, enumerate_pairs, load_prompts
    from carlos_audit.run.arms import plan_arms
    from carlos_audit.run.intake import input_binding

    sha = {e["role"]: e["sha256"] for e in inputs}
    comparisons = [{"adapter": "cmp" + r.rsplit("_", 1)[1], "sha256": sha[r]}
                   for r in sorted((r for r in paths if r.startswith("comparison_lora_")), key=lambda r: int(r.rsplit("_", 1)[1]))]
    prompts, _ = load_prompts(case.protocol.prompts, case.base_dir)
    pairs = enumerate_pairs(prompts, case.protocol.seeds, case.protocol.batch_size)
    return plan_arms(case, sha["lora"], comparisons), {b[0].batch: b for b in batches(pairs)}, input_binding(inputs, prompts)


def run_units_on_devices(case, out: Path, devices: list[str], options: RunOptions | None = None) -> dict:
    """Generate every unit of ``case`` not yet in ``out``, spread over ``devices`` (one process
    each). Returns, per worker that had units, {device, units, torch_threads, pid}. The caller
    then runs the case as usual (``run_full``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from carlos_audit.run.intake import bind_run, intake, prepare_case_dir
    from carlos_audit.casefolder.lock import case_lock
    from carlos_audit.casefolder.unit_store import CaseStore

    options = options or RunOptions()
    paths, inputs, _ = intake(case, allow_unsafe_pickle=options.allow_unsafe_pickle)
    with case_lock(out):
        prepare_case_dir(out, case, options.force)
        plan, by_batch, files = case_units(case, paths, inputs)
        bind_run(out, case, files, options.force)  # a resume with other inputs refused
        store = CaseStore(out)
        todo = [(a.name, b) for a in plan.arms.values() for b in sorted(by_batch) if store.unit_done(a.name, b) is None]
        dealt = [(d, todo[i::len(devices)]) for i, d in enumerate(devices)]
        jobs = [(case.raw_text, str(case.path), str(out), d, torch.get_num_threads(), units, options)
                for d, units in dealt if units]
        if not jobs:
            return [0] * len(devices)
        with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(worker, *job) for job in jobs]
            errors = [f.exception() for f in futures]  # waits for every worker
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        if isinstance(first, AuditError):
            raise AuditError(str(first))
        line = (str(first).strip().splitlines() or [""])[0][:200]
        raise AuditError(f"a device worker failed ({type(first).__name__}: {line}); run the same command again to resume")
    return [f.result() for f in futures]


def worker(case_text: str, case_path: str, out: str, device: str, threads: int, units: list, options: RunOptions) -> dict:
    """One device's process: load the case's models on ``device``, run the units dealt to it."""
    import carlos_audit  # noqa: F401  (OMP_WAIT_POLICY before torch)
    import torch

    from carlos_audit.case.casefile import parse_case
    from carlos_audit.run.hostchain import HostChain
    from carlos_audit.run.intake import bind_run, intake
    from carlos_audit.run.load import load_models
    from carlos_audit.run.profile import load_comparisons, make_session, produce_batch
    from carlos_audit.casefolder.unit_store import CaseStore

    torch.set_num_threads(int(threads))
    case = parse_case(case_text, Path(case_path))
    case = replace(case, base_model=replace(case.base_model, device=device))
    paths, inputs, inspection = intake(case, allow_unsafe_pickle=options.allow_unsafe_pickle)
    lp, emb, _, determinism = load_models(case, paths, inspection, options)
    plan, by_batch, files = case_units(case, paths, inputs)
    session, _ = make_session(case, CaseStore(Path(out)), lp, emb, determinism, files.prompts_sha256)
    bind_run(Path(out), case, session.binding(files), force=False)  # the models part, before any unit
    load_comparisons(lp.pipe, paths, inputs, options, convention=case.lora.convention)
    with HostChain(session) as chain:
        for arm, b in units:
            chain.submit(produce_batch(session, plan.arms[arm], by_batch[b]))
    import os

    return {"device": device, "units": len(units), "torch_threads": torch.get_num_threads(), "pid": os.getpid()}
