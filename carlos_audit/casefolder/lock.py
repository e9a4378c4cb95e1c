"""The case-folder lock: one run at a time writes a case folder.

``case_lock(out)`` creates ``out/.carlos-audit.lock`` exclusively (O_CREAT | O_EXCL), holding the
process id, host name and start time of the run, and removes it when the run ends, however it
ends. A second run on the same folder is refused with a one-line error naming the holder. A lock
left by a process that died on this host (its pid no longer exists) is taken over; one held from
another host is never guessed stale: the message says which file to delete once that run is gone.
The lock is taken once per run, by its outermost step (pipeline.run_full or run_case); the lock
keeps no state in this process, so taking it again while held is refused like any other holder.
A corpus build
(engines/corpus_build.py) holds the same lock on its DEST for the whole build, whatever the engine: two
drivers never add rows to one corpus at once, and a driver killed mid-build leaves a lock that
the next driver on this host takes over.

Taking the lock also removes the temporary files a killed write left behind
(``remove_stale_temporaries``: fileio's ``.<name>.<random>.tmp`` of the case folder's own files;
nothing else is touched). Commands that only read a case folder (``analyse``, ``verify``) take no
lock (the folder may be read-only) but refuse a folder held by a live run (``refuse_if_held``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from carlos_audit.errors import AuditError, write_fault
from carlos_audit.records import REPORT_FILES

LOCK_NAME = ".carlos-audit.lock"
#: the case folder's own files (top level) and folders whose atomic-write temporaries are stale
#: once the lock is taken
CASE_FILES = ("case.toml", "run.json", "inputs.json", "manifest.json", "manifest.json.sha256", "metrics.json",
              "comparison.json") + REPORT_FILES
CASE_FOLDERS = ("images", "embeddings", "units", "figures")
#: fileio.write_bytes_atomic's temporary file: tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}


def _acquire(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as e:  # a read-only folder, no permission: one line
        fault = write_fault(e, path)
        if fault is None:
            raise
        raise fault from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f)
    return True


@contextmanager
def case_lock(out: Path, what: str = "case folder"):
    """Hold the lock of case folder ``out`` (created when missing) for the duration of the block.
    ``what`` names the folder in the refusal (a corpus build locks its DEST as "corpus folder")."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AuditError(f"output {out} exists and is not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not _acquire(path, record):
        held = _holder(path)
        if _stale(held, host):
            path.unlink(missing_ok=True)  # left by a run that died on this host
        if not _acquire(path, record):
            _remove_if_empty(out, created)
            raise AuditError(_refusal(what, out, path, _holder(path)))
    try:
        remove_stale_temporaries(out)
        yield
    finally:
        path.unlink(missing_ok=True)
        _remove_if_empty(out, created)


def refuse_if_held(out: Path, what: str = "case folder") -> None:
    """For a command that only reads ``out``: refused in one line while a live run holds its lock
    (a lock left by a dead process on this host is ignored); nothing is written."""
    path = Path(out) / LOCK_NAME
    if path.is_file():
        held = _holder(path)
        if not _stale(held, socket.gethostname()):
            raise AuditError(_refusal(what, Path(out), path, held))


def _stale(held: dict, host: str) -> bool:
    return held.get("host") == host and isinstance(held.get("pid"), int) and not _alive(held["pid"])


def _refusal(what: str, out: Path, path: Path, held: dict) -> str:
    return (f"{what} {out} is being written by another run (pid {held.get('pid')} on host {held.get('host')}, since "
            f"{held.get('started_utc')}); wait for it to finish, or delete {path} if that run is gone")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """The temporary files of the case folder's own files left by a killed atomic write, removed
    (called with the lock held: nobody else writes them). Returns what was removed."""
    out = Path(out)
    found = [p for p in out.glob(".*.tmp") if (m := TEMPORARY.match(p.name)) and m["name"] in CASE_FILES]
    for folder in CASE_FOLDERS:
        if (out / folder).is_dir():
            found += [p for p in (out / folder).rglob(".*.tmp") if TEMPORARY.match(p.name)]
    for p in found:
        if p.is_file():
            p.unlink(missing_ok=True)
    return found


def _remove_if_empty(out: Path, created: bool) -> None:
    """A folder the lock created for a run that wrote nothing is not left behind."""
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
