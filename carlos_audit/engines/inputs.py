"""The inputs of a build, hashed once by the driver and checked by sha256 on every worker.

Workers find the inputs (template case file, prompt file, LoRA files, base model, embedder) at
the paths the case names, so on several machines those paths must hold the same files on every
node (a shared read-only mount, or copies made by the cluster's setup; the embedded tiny models
are built from code on each node). No file is trusted by name: the driver records each input's
sha256 in the plan, and a worker compares what it actually loaded (intake hashes, the loaded
model's tree hash) before running a unit; a node with a different file refuses the unit with a
message that names the node and the file, and the build stops.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from carlos_audit.errors import AuditError


def node_label() -> str:
    """Where this code runs: ``host/ip/node-id`` under Ray, ``host`` otherwise."""
    host = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return f"{host}/{ray.util.get_node_ip_address()}/{ctx.get_node_id()[:8]}"
    except ImportError:
        pass
    return host


def model_sha256(case) -> dict:
    """sha256 of the base model and the embedder as the loaders compute them (tree hash of a
    folder, file hash of a file), from this machine; the case's own ``sha256`` when this machine
    does not have the model (None: not checkable, e.g. open_clip weights named by tag)."""
    from carlos_audit.paths import expand_path
    from carlos_audit.models.filehash import file_sha256
    from carlos_audit.models.families import ensure_embedded
    from carlos_audit.models.tiny import ensure_tiny_clip
    from carlos_audit.models.world_registry import is_world_model, world_model_dir
    from carlos_audit.hashing import tree_sha256

    def of_path(p: Path) -> str | None:
        if p.is_dir():
            return tree_sha256(p, file_sha256)
        return file_sha256(p) if p.is_file() else None

    src = case.base_model.source
    embedded = ensure_embedded(src)  # a family's embedded tiny model
    if embedded is not None:
        base = of_path(embedded)
    elif is_world_model(src):
        base = of_path(world_model_dir(src))
    else:
        base = of_path(expand_path(src, case.base_dir))
    pre = case.embedder.pretrained
    if case.embedder.model == "embedded:tiny-clip":
        emb = of_path(ensure_tiny_clip())
    elif is_world_model(case.embedder.model):
        emb = of_path(world_model_dir(case.embedder.model))
    else:
        emb = of_path(expand_path(pre, case.base_dir)) if pre else None
    return {"base_model": base or _lower(case.base_model.sha256), "embedder": emb or _lower(case.embedder.sha256)}


def _lower(v):
    return v.lower() if v else None


def planned_inputs(case) -> tuple:
    """((role, path, sha256), ...) of the inputs every unit of this build checks, LoRA excepted
    (each unit carries its own LoRA's hash)."""
    from carlos_audit.run.intake import resolve_inputs
    from carlos_audit.casefolder.unit_store import hash_inputs

    paths = resolve_inputs(case)
    hashed = {e["role"]: e for e in hash_inputs([{"role": r, "path": str(p)} for r, p in paths.items() if r != "lora"])}
    models = model_sha256(case)
    out = []
    for role in ("casefile", "prompts"):
        if role in hashed:
            out.append((role, hashed[role]["path"], hashed[role]["sha256"]))
    for role, source in (("base_model", case.base_model.source), ("embedder", case.embedder.pretrained or case.embedder.model)):
        if models[role]:
            out.append((role, hashed[role]["path"] if role in hashed else source, models[role]))
    return tuple(out)


def check_inputs(unit, intake_inputs: list[dict], loaded: dict) -> None:
    """Compare what this worker hashed (intake) and loaded (models) with the plan; refuse otherwise."""
    got = {e["role"]: e["sha256"] for e in intake_inputs}
    got.update({k: v for k, v in loaded.items() if v})
    planned = list(unit.inputs) + [("lora", unit.lora_path, unit.lora_sha256)]
    for role, path, want in planned:
        have = got.get(role)
        if have is None:
            raise AuditError(f"node {node_label()}: {role} {path} is missing or could not be hashed here; "
                             f"the build planned sha256 {want}; refusing unit {unit.key}")
        if have != want:
            raise AuditError(f"node {node_label()}: {role} {path} has sha256 {have} here, the build planned {want} "
                             f"(a different file on this node); refusing unit {unit.key}")


def scratch_root() -> Path:
    """Node-local folder for a finalize unit's working copy (never the build's destination)."""
    from carlos_audit.paths import carlos_home

    root = Path(os.environ.get("CARLOS_AUDIT_SCRATCH", carlos_home() / "scratch"))
    root.mkdir(parents=True, exist_ok=True)
    return root
