"""Model files hashed once: the sha256 of a base-model or embedder file, remembered by what the
file system says about it, so a run does not re-read 4-14 GB of weights it hashed before.

A hash is reused only when the file's real path, size, modification time, inode, device and
status-change time (ctime, which no user can set back) all equal those it was computed for;
any write, replacement, ``touch`` or re-link misses and the file is read again. Entries live
in ``$CARLOS_AUDIT_HOME/hash-cache/`` (one small JSON file per entry, written atomically).

``verify`` and ``run --rehash`` hash every file again (``rehashing()``); evidence files (the
LoRA, the case and prompt files) are always hashed afresh, never through this cache. The
manifest records the policy in force (``policy()``: base_model.hashing).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from carlos_audit.hashing import sha256_file, sha256_json

POLICY_NAME = "stat-cache"
#: whether model files are hashed again in the current context (set only by ``rehashing()``;
#: a context variable, scoped to the block, not a process-wide dict)
REHASH: ContextVar[bool] = ContextVar("carlos_audit_rehash", default=False)


def cache_dir() -> Path:
    from carlos_audit.paths import carlos_home

    return carlos_home() / "hash-cache"


def stat_key(path: Path) -> dict:
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev}


def file_sha256(path: str | Path) -> str:
    """sha256 of a model file, from the cache when its stat key matches (see the module doc)."""
    import json

    from carlos_audit.fileio import write_json_atomic

    path = Path(path)
    if REHASH.get():
        return sha256_file(path)
    key = stat_key(path)
    entry = cache_dir() / f"{sha256_json(key)}.json"
    try:
        cached = json.loads(entry.read_text("utf-8"))
        if cached.get("key") == key and len(cached.get("sha256", "")) == 64:
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    if stat_key(path) == key:  # unchanged while it was read: safe to remember
        try:
            write_json_atomic(entry, {"key": key, "sha256": digest})
        except Exception:  # a cache that cannot be written only costs time
            pass
    return digest


@contextmanager
def rehashing(on: bool = True):
    """Within the block every model file is read and hashed again (``verify``, ``--rehash``)."""
    token = REHASH.set(bool(on) or REHASH.get())
    try:
        yield
    finally:
        REHASH.reset(token)


def policy() -> dict:
    """The manifest's record of how the model files' hashes were obtained in this process."""
    if REHASH.get():
        return {"policy": "rehash", "detail": "every model file read and hashed during this run (--rehash)"}
    return {"policy": POLICY_NAME,
            "detail": "a model file's sha256 is reused from $CARLOS_AUDIT_HOME/hash-cache only when its real path, "
                      "size, mtime, ctime, inode and device equal those it was hashed with; verify and --rehash hash "
                      "again; the LoRA, case and prompt files are always hashed afresh"}
