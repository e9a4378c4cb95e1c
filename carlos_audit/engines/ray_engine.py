"""Run a build's units as Ray tasks (``pip install .[ray]``), on a cluster joined with
``--ray-address`` / ``RAY_ADDRESS`` (engines/ray_connect.py) or on a Ray started here.

Every arm unit is a task with ``max_retries``: a worker that dies (killed, out of memory, node
lost) has its unit run again elsewhere. Workers write nothing into DEST: a task returns its
unit's files through Ray and the driver writes them (engines/driver.py), so worker nodes need no
access to DEST or to each other. When the last unit of a case is written, the driver submits
its finalize task with the case's records and embeddings. Errors raised by a unit (AuditError:
a refused LoRA, an input whose sha256 differs on a node) are not retried and stop the build
with their message.

Workers keep the pipeline loaded between tasks (``max_calls=0``, also for GPU tasks) and run
torch with the build's thread count. Environment for the workers: SOURCE_DATE_EPOCH,
OMP_WAIT_POLICY and the fast-path switches of the driver always; paths (CARLOS_AUDIT_HOME, the
Hugging Face cache) only when Ray is started here, since on a joined cluster each node has its
own (set them in the environment of `ray start` on that node).
"""

from __future__ import annotations

import os

from carlos_audit.engines.ray_connect import import_ray
from carlos_audit.errors import AuditError

MAX_RETRIES = 3
FORWARD_ENV = ("OMP_WAIT_POLICY", "SOURCE_DATE_EPOCH", "HF_HUB_OFFLINE", "CARLOS_AUDIT_FASTPATH",
               "CARLOS_AUDIT_TORCH_COMPILE", "CUBLAS_WORKSPACE_CONFIG")
FORWARD_PATHS = ("CARLOS_AUDIT_HOME", "HF_HOME", "HF_HUB_CACHE")


def _execute(unit_fn, unit, threads, *case_files):
    """The Ray task: run one unit; returns its result with its files."""
    import carlos_audit  # noqa: F401  (OMP_WAIT_POLICY before torch)

    return unit_fn(unit, threads, *case_files)


def worker_env(local: bool) -> dict:
    """Environment variables for the build's workers (paths only for a Ray started here)."""
    from carlos_audit.paths import carlos_home

    names = FORWARD_ENV + (FORWARD_PATHS if local else ())
    env = {k: os.environ[k] for k in names if os.environ.get(k)}
    if local:
        env["CARLOS_AUDIT_HOME"] = str(carlos_home())
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_ray(plan, *, address: str | None, gpus_per_task: float, threads: int | None, unit_fn,
            progress: bool = True) -> tuple[list, list, dict]:
    from carlos_audit.engines.driver import Driver
    from carlos_audit.engines.ray_connect import init_ray, resolve_address

    ray = import_ray()
    started = False
    if not ray.is_initialized():
        address = resolve_address(address)
        init_ray(address, {"env_vars": worker_env(local=address is None)})
        started = True
    driver = Driver(plan, progress)
    try:
        remote = ray.remote(max_calls=0)(_execute)
        task = remote.options(max_retries=MAX_RETRIES, retry_exceptions=False, num_cpus=1, num_gpus=gpus_per_task or 0)
        # a finalize unit is model-free (pipeline.finish_case): it holds no GPU
        finalize_task = remote.options(max_retries=MAX_RETRIES, retry_exceptions=False, num_cpus=1, num_gpus=0)
        running = {}

        def submit_ready():
            for f in driver.ready():
                files = driver.finalize_files(f)
                if files is not None:
                    running[finalize_task.remote(unit_fn, f, threads, files)] = f

        for u in driver.arm_todo():
            running[task.remote(unit_fn, u, threads)] = u
        submit_ready()
        try:
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                unit = running.pop(done[0])
                driver.accept(unit, ray.get(done[0]))  # raises the first error at once
                submit_ready()
        except ray.exceptions.RayError as e:  # a unit's error, or a unit lost more than MAX_RETRIES times
            for r in running:
                ray.cancel(r)
            cause = getattr(e, "cause", None)
            if isinstance(cause, AuditError):
                raise AuditError(str(cause)) from None
            if isinstance(e, ray.exceptions.RayTaskError):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise AuditError(f"unit {unit.key} failed on the cluster ({type(e).__name__}, after up to {MAX_RETRIES} "
                             f"retries): {first}; run the same command again to resume") from None
        return driver.results()
    finally:
        if started:
            ray.shutdown()
