"""The trained world's models (issue 30; trained by the scripts in ``world/``), shipped as package data in
``carlos_audit/models/world/`` and loadable by name through the same code as real checkpoints:

- ``embedded:world-sd``: a diffusers ``StableDiffusionPipeline`` folder (``models/loading.py``, ``from_pretrained``);
- ``embedded:world-clip``: a transformers ``CLIPModel`` folder (``models/embedders.py``, the ``hf:`` path).

Each folder is pinned here by its tree hash (``hashing.tree_sha256`` with ``models/filehash.file_sha256``, the hash
the loaders record); a folder whose files changed is refused with one line naming it.
"""

from __future__ import annotations

from pathlib import Path

from carlos_audit.errors import AuditError

WORLD_DIR = Path(__file__).with_name("world")
WORLD_SD = "embedded:world-sd"
WORLD_CLIP = "embedded:world-clip"

#: name -> (folder under WORLD_DIR, tree sha256 of that folder).
WORLD_MODELS = {
    WORLD_SD: ("pipeline", "8d907da3c0e69f09077c08afb16130ba0dc1d3c7bceda706f9503b1c7000c1cd"),
    WORLD_CLIP: ("clip", "b33362ab94c4c3f08e45158a9f5f5d8753d82ce806e778fa1a6f81086def7f56"),
}


def is_world_model(name: str) -> bool:
    return name in WORLD_MODELS


def world_model_dir(name: str, check: bool = True) -> Path:
    """The package folder of a world model, its tree hash checked against the pin (``check``)."""
    from carlos_audit.hashing import tree_sha256
    from carlos_audit.models.filehash import file_sha256

    sub, pinned = WORLD_MODELS[name]
    folder = WORLD_DIR / sub
    if not folder.is_dir():
        raise AuditError(f"{name}: the package folder {folder} is missing (reinstall carlos-audit)")
    if check and tree_sha256(folder, file_sha256) != pinned:
        raise AuditError(f"{name}: the files in {folder} do not match the pinned sha256 {pinned[:16]}... "
                         "(changed after install; reinstall carlos-audit)")
    return folder
