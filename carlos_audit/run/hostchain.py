"""The host chain of a run: everything a unit needs after the device has produced its images.

    PNG encode -> base-image cache -> embed (from memory) -> finite check -> hash + write (record last)

``finish_unit`` is that chain for one unit; ``run/profile.run_batch`` calls it straight after
generating (the build engines' units), and ``run/profile.run_arm`` hands it to a ``HostChain``:
a bounded pool of threads (PIL releases the GIL while it encodes, hashing and fsync too) that
works on batch k while the device generates batch k+1, so the device never waits for the disk.
At most ``depth`` generated units wait in memory; the next generation waits when the pool is
full. The bytes written do not depend on the pool: each unit is encoded, embedded and written
exactly as the serial chain does, one embedding at a time.

Images are embedded from memory: the RGB images the pipeline returned, which are exactly the
pixels the PNG stores (PNG is lossless; tests check the features are bit-identical to embedding
the decoded PNG, and ``verify`` re-embeds from the files). A unit taken from the base-image
cache is embedded from its decoded PNGs.

A failure in the pool stops the run: units not started are dropped, units being written finish,
and the error is one line. A unit is never half-written: its record is written last, atomically,
and a unit without a record is regenerated whole on resume.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from carlos_audit.errors import AuditError

#: Cost fields counted on the device side (generation) and on the host side (embedding).
HOST_COST_FIELDS = ("clip_forward_calls", "clip_image_encodings")

#: One embedding at a time: the embedder is one model, and its hook counts stay per unit.
EMBED_LOCK = threading.Lock()


@dataclass
class Produced:
    """A unit after the device: its images in memory (generated) or PNG bytes (from the cache)."""

    arm: object
    batch: list
    prompts_sent: list
    seeds: list
    source: str  # "generated" or "base-cache"
    images: list | None  # PIL RGB images as the pipeline returned them (generated)
    pngs: list | None  # PNG bytes (base-cache)
    cache_key: str | None  # where a generated base batch is put in the base-image cache
    cache_desc: dict | None
    device_cost: dict  # hook counts of the generation (device-side fields)


def finish_unit(s, job: Produced) -> dict:
    """Encode, cache, embed, check and write one unit (``s``: the run's Session). Returns the unit record."""
    import io

    from PIL import Image

    from carlos_audit.run import cost
    from carlos_audit.run.devices import device_record
    from carlos_audit.run.embed import image_features
    from carlos_audit.casefolder.unit_store import UnitOutput, png_bytes

    pngs = job.pngs if job.pngs is not None else [png_bytes(im) for im in job.images]
    if job.cache_key is not None and job.source == "generated":
        s.cache.put(job.cache_key, pngs, job.cache_desc)
    images = job.images if job.images is not None else [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    with EMBED_LOCK:
        counter = cost.counter_of(s.pipe)
        before = counter.snapshot()
        feats = image_features(s.embedder, images)
        host_cost = counter.delta(before)
    check_finite(job.arm.name, job.batch, images, feats)
    spent = {k: (host_cost if k in HOST_COST_FIELDS else job.device_cost).get(k, 0) for k in cost.FIELDS}
    spent["images_generated"] = len(job.batch) if job.source == "generated" else 0
    made_from = {"lora_sha256": job.arm.lora_sha256, "prompts_sha256": s.prompts_sha256,
                 "base_model_sha256": s.base_info.sha256, "embedder_sha256": s.embedder.sha256}
    return s.store.write_unit(job.arm.name, job.batch[0].batch,
                              UnitOutput(pngs, feats, [p.id for p in job.batch], job.prompts_sent, job.seeds,
                                         job.source, cost=spent, device=device_record(s.environment),
                                         inputs=made_from))


def check_finite(arm: str, batch: list, images, feats: np.ndarray) -> None:
    bad = []
    for p, im, f in zip(batch, images, feats):
        if not np.isfinite(f).all():
            bad.append(f"{p.id} (embedding not finite)")
        elif not np.asarray(im).any():
            bad.append(f"{p.id} (all-black image)")
    if bad:
        raise AuditError(f"arm {arm}: degenerate output for pairs {', '.join(bad[:8])}; metrics would be computed over garbage (on a GPU try dtype = \"float32\")")


def default_workers() -> int:
    """Host threads: ``CARLOS_AUDIT_HOST_WORKERS``, else half the cores (1..4). Bytes never depend on it."""
    env = os.environ.get("CARLOS_AUDIT_HOST_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class HostChain:
    """A bounded pool for ``finish_unit``. ``submit`` returns at once unless ``depth`` units
    already wait (then it waits for the oldest); ``close`` waits for every unit. The first
    failure stops the chain and is raised as one line (``AuditError``)."""

    def __init__(self, session, workers: int | None = None, depth: int | None = None, on_done=None):
        import torch
        from concurrent.futures import ThreadPoolExecutor

        self.session, self.on_done = session, on_done
        self.workers = workers or default_workers()
        self.depth = depth or self.workers + 1
        threads = torch.get_num_threads()
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="carlos-host",
                                       initializer=torch.set_num_threads, initargs=(threads,))
        self.pending: deque = deque()

    def __enter__(self) -> "HostChain":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the device side failed or was interrupted: what it generated is still written
            self._wait_all()

    def submit(self, job: Produced) -> None:
        self._collect(block=False)
        while len(self.pending) >= self.depth:
            self._collect(block=True)
        self.pending.append((job, self.pool.submit(finish_unit, self.session, job)))

    def close(self) -> None:
        try:
            while self.pending:
                self._collect(block=True)
        finally:
            self.pool.shutdown(wait=True)

    def _collect(self, block: bool) -> None:
        """Take finished units off the front (the oldest, waited for when ``block``)."""
        while self.pending and (block or self.pending[0][1].done()):
            job, fut = self.pending.popleft()
            try:
                record = fut.result()
            except BaseException as e:
                self._stop()
                raise _one_line(job, e) from None
            if self.on_done is not None:
                self.on_done(record)
            block = False

    def _stop(self) -> None:
        for _, fut in self.pending:
            fut.cancel()
        self._wait_all()

    def _wait_all(self) -> None:
        while self.pending:
            _, fut = self.pending.popleft()
            if not fut.cancelled():
                try:
                    fut.result()
                except BaseException:
                    pass
        self.pool.shutdown(wait=True)


def _one_line(job: Produced, e: BaseException) -> BaseException:
    if isinstance(e, (AuditError, KeyboardInterrupt)):
        return e
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return AuditError(f"arm {job.arm.name} batch {job.batch[0].batch}: the host chain failed ({type(e).__name__}: "
                      f"{first}); nothing half-written was kept: run the same command again to resume")
