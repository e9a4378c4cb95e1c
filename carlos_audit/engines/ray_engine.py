"""Run a build's units as Ray tasks (``pip install .[ray]``).

Every unit is a task with ``max_retries``: a worker that dies (killed, out of memory, node lost)
has its unit run again elsewhere; units are idempotent and write their record last, so a retry
overwrites half-written files with identical bytes. Errors raised by a unit (AuditError: a
refused LoRA, a changed file) are not retried and stop the build with their message.

Each finalize task depends on the units of its case (Ray schedules it when they are done).
Workers keep the pipeline loaded between tasks (``max_calls=0``, also for GPU tasks) and run
torch with the build's thread count. Environment for the workers: when this module starts Ray
(no cluster initialised yet) it passes CARLOS_AUDIT_HOME, OMP_WAIT_POLICY, SOURCE_DATE_EPOCH and
the Hugging Face cache variables of the driver; on a multi-node cluster DEST, the LoRA folder
and CARLOS_AUDIT_HOME must be on a file system every node sees.
"""

from __future__ import annotations

import os
import sys

from carlos_audit.errors import AuditError

MAX_RETRIES = 3
FORWARD_ENV = ("CARLOS_AUDIT_HOME", "OMP_WAIT_POLICY", "SOURCE_DATE_EPOCH", "HF_HOME", "HF_HUB_CACHE",
               "HF_HUB_OFFLINE", "CARLOS_AUDIT_FASTPATH", "CARLOS_AUDIT_TORCH_COMPILE", "CUBLAS_WORKSPACE_CONFIG")


def _execute(unit_fn, unit, threads, *deps):
    """The Ray task: run one unit (``deps`` only order finalize after its case's units)."""
    import carlos_audit  # noqa: F401  (OMP_WAIT_POLICY before torch)

    return unit_fn(unit, threads)


def worker_env() -> dict:
    from carlos_audit.models.tiny import carlos_home

    env = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    env["CARLOS_AUDIT_HOME"] = str(carlos_home())
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def import_ray():
    try:
        import ray
    except ImportError:
        raise AuditError("the ray engine needs Ray: pip install 'carlos-audit[ray]' (or pip install 'ray[default]')") from None
    return ray


def run_ray(plan, *, address: str | None, gpus_per_task: float, threads: int | None, unit_fn,
            progress: bool = True) -> tuple[list, list]:
    from tqdm import tqdm

    ray = import_ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": worker_env()}, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        started = True
    try:
        task = ray.remote(max_calls=0)(_execute).options(max_retries=MAX_RETRIES, retry_exceptions=False, num_cpus=1,
                                                         num_gpus=gpus_per_task or 0)
        refs = {u.key: task.remote(unit_fn, u, threads) for u in plan.arm_units}
        fins = [task.remote(unit_fn, f, threads, *[refs[k] for k in plan.deps[f.key]]) for f in plan.finalize_units]
        pending = list(refs.values()) + fins
        bar = tqdm(total=len(pending), desc="units", unit="unit", disable=not progress, file=sys.stderr, leave=False)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # raise the first error at once
                bar.update(len(done))
        except ray.exceptions.RayTaskError as e:
            for r in pending:
                ray.cancel(r)
            cause = getattr(e, "cause", None)
            if isinstance(cause, AuditError):
                raise AuditError(str(cause)) from None
            raise
        finally:
            bar.close()
        return ray.get(list(refs.values())), ray.get(fins)
    finally:
        if started:
            ray.shutdown()
