"""Devices: what a CUDA device is (queried at one boundary, ``cuda_details``), the device record
each unit keeps, and the check that one shared arm comes from one device class.

A device class is what fixes the bits on that device: on the CPU the reproducibility key of
case/signature.py (machine, platform, python, thread count...); on CUDA the GPU model, driver,
CUDA / cuDNN / cuBLAS versions and the TF32 and determinism flags, not the CPU's thread count.
Only functions of this module and ``run/environment.capture`` ask torch.cuda anything, and only
for a CUDA device: a driver without a GPU plans a CUDA build without touching CUDA.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from carlos_audit.errors import AuditError

CUBLAS_DISTRIBUTIONS = ("nvidia-cublas-cu12", "nvidia-cublas-cu11", "nvidia-cublas-cu13", "nvidia-cublas")


def device_class(device: str | None) -> str:
    """"cuda" for any cuda[:n], else the device string ("cpu", "mps")."""
    d = str(device or "cpu")
    return "cuda" if d.startswith("cuda") else d


def device_index(device: str) -> int:
    m = re.match(r"^cuda:(\d+)$", device)
    return int(m.group(1)) if m else 0


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver version (Linux ``/proc/driver/nvidia/version``), else None."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9]+(?:\.[0-9]+)+)", text)
    return m.group(1) if m else None


def cublas_version() -> str | None:
    """The cuBLAS wheel torch loads (``nvidia-cublas-*``); None for a torch that bundles its own."""
    import importlib.metadata as md

    for dist in CUBLAS_DISTRIBUTIONS:
        try:
            return f"{dist}=={md.version(dist)}"
        except md.PackageNotFoundError:
            continue
    return None


def cuda_details(device: str) -> dict:
    """What fixes the bits on CUDA ``device``, queried from torch (the CUDA boundary)."""
    import torch

    i = device_index(device)
    props = torch.cuda.get_device_properties(i)
    return {
        "gpu": torch.cuda.get_device_name(i),
        "gpu_capability": ".".join(str(x) for x in torch.cuda.get_device_capability(i)),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "driver": nvidia_driver(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cublas": cublas_version(),
        "tf32": {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)},
        "determinism_flags": {"deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
                              "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
                              "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
                              "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")},
    }


def device_record(environment: dict) -> dict:
    """A unit record's ``device``: the kind of device it ran on (class and GPU model, not the
    index: cuda:3 and cuda:0 of one node write the same unit) and the key of its device class
    (the sha256 of the environment part that can change bits), compared across the units of
    one shared arm."""
    from carlos_audit.case.signature import bits_environment
    from carlos_audit.hashing import sha256_json

    return {"class": device_class(environment.get("device")), "gpu": environment.get("gpu"),
            "bits": sha256_json(bits_environment(environment))}


def check_one_class(shared_id: str, records: list[dict]) -> None:
    """Refuse a shared arm whose units ran on different device classes (different bits)."""
    seen = {}
    for rec in records:
        dev = rec.get("device")
        if dev:
            seen.setdefault(dev["bits"], (rec.get("batch"), dev))
    if len(seen) > 1:
        (b1, d1), (b2, d2) = list(seen.values())[:2]
        raise AuditError(f"shared arm {shared_id}: batch {b1} ran on {d1.get('gpu') or d1['class']} and batch {b2} "
                         f"on {d2.get('gpu') or d2['class']}, device classes whose "
                         "bits differ; a shared base arm must come from one device class: run the build on one "
                         "kind of device (or one build per kind)")
