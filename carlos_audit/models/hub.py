"""The one Hugging Face cache lookup: a hub repository's snapshot folder.

``hf_snapshot`` resolves ``org/name`` through ``huggingface_hub.snapshot_download`` — the local
cache only (``refs/main`` -> ``snapshots/<commit>``) unless the caller allows a download — in
``$HF_HUB_CACHE`` when it is set (else the library's default, ``$HF_HOME/hub``). Every reader of
the cache goes through it: the base-model and embedder loaders, ``check`` (``cached_snapshot``:
the snapshot holding the files it needs, or None), the variant of a hub base model and whether
open_clip would find its tagged weights offline. ``check`` and ``run`` therefore agree on what the
cache holds. Imports neither torch nor huggingface_hub until a lookup is made.
"""

from __future__ import annotations

import os
from pathlib import Path

from carlos_audit.errors import AuditError


def hf_hub_cache() -> Path:
    """The cache folder looked in (for messages)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def hf_snapshot(repo_id: str, allow_download: bool = False, what: str = "model") -> Path:
    """A hub repository's snapshot folder: the local Hugging Face cache only unless ``allow_download``."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=not allow_download, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except Exception as e:
        hint = "" if allow_download else " (only the local Hugging Face cache is searched; pass --allow-download to fetch it)"
        raise AuditError(f"{what} {repo_id!r} is not available locally{hint}: {type(e).__name__}") from None


def cached_snapshot(repo_id: str, files: tuple = ()) -> Path | None:
    """The cached snapshot of ``repo_id`` when it holds every one of ``files`` (glob patterns), else None.
    Never the network."""
    try:
        snap = hf_snapshot(repo_id)
    except AuditError:
        return None
    return snap if all(any(snap.glob(f)) for f in files) else None
