"""Hashes used everywhere evidence is recorded (always sha256, hex)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_default(obj):
    """``json.dumps``'s fallback: a typed record section (record_sections.Section) is the JSON
    object it came from (its ``to_json``); anything else is not JSON."""
    if hasattr(obj, "to_json"):
        return obj.to_json()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def canonical_json(obj) -> bytes:
    """JSON bytes with sorted keys and no whitespace variance: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=json_default).encode()


def sha256_json(obj) -> str:
    return sha256_bytes(canonical_json(obj))


def tree_files(folder: Path, hasher=sha256_file) -> list[list[str]]:
    """Every file under ``folder`` as sorted ``[relative path, sha256]`` pairs, following symbolic
    links (a Hugging Face cache snapshot is links into ``blobs/``; a re-pointed link changes the
    hash). A link cycle is refused. ``hasher``: models/filehash.file_sha256 for model folders."""
    folder = Path(folder)
    entries = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if any(os.path.realpath(folder / a) == real for a in Path(root).relative_to(folder).parents):
            raise OSError(f"symbolic link cycle under {folder} at {root}")
        dirs.sort()
        for name in files:
            p = Path(root) / name
            if p.is_file():
                entries.append([p.relative_to(folder).as_posix(), hasher(p)])
    return sorted(entries)


def tree_sha256(folder: Path, hasher=sha256_file) -> str:
    """Hash of a model folder: sha256 over the sorted (relative path, file sha256) list, links followed."""
    return sha256_json(tree_files(folder, hasher))
