"""Atomic file writes: a reader sees either the old file or the complete new one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from carlos_audit.hashing import json_default


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync'd and renamed. A full disk, a
    read-only folder or a permission error is one line (errors.WriteFault) and leaves no temp file."""
    from carlos_audit.errors import write_fault

    path = Path(path)
    try:
        _write_atomic(path, data)
    except OSError as e:
        fault = write_fault(e, path)
        if fault is None:
            raise
        raise fault from None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def json_dumps(obj) -> str:
    """The one JSON layout for files a person opens: sorted keys, 2-space indent. A typed record
    section is written as the JSON it came from (its ``to_json``)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False, default=json_default) + "\n"


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json_dumps(obj))


def read_json(path: str | Path):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)
