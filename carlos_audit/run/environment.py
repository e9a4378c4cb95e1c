"""The software and hardware a run used, and the determinism settings it ran under."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def apply_determinism(device: str, tf32: bool = False) -> dict:
    """Settings that make repeated runs bit-exact on the same software and hardware. On CUDA,
    TF32 is off (float32 work stays float32; torch's cuDNN default is TF32 on) unless ``tf32``
    (the case's ``[base_model] tf32``); recorded."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    extra = {}
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        extra = {"tf32": {"matmul": bool(tf32), "cudnn": bool(tf32), "requested": bool(tf32)}}
    return extra | {
        "torch.use_deterministic_algorithms": True,
        "cudnn.benchmark": False if device.startswith("cuda") else None,
        "generators": "one CPU torch.Generator per image, seeded with the pair's seed",
        "batch_layout": "fixed by the protocol (prompt-major pairs, consecutive batches of batch_size)",
    }


def capture(device: str, dtype: str, determinism: dict, fastpath: dict | None = None) -> dict:
    """The environment record of a run (manifest ``environment``); ``fastpath``: the settings
    models/fastpath.py applied, recorded when there are any. case/signature.bits_environment says
    which of these fields change the numbers."""
    import torch

    from carlos_audit.case.signature import BIT_PACKAGES

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "packages": {d: _version(d) for d in BIT_PACKAGES + ("weasyprint",)},
        "device": device,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cuda": torch.version.cuda if device.startswith("cuda") or torch.cuda.is_available() else None,
        "gpu": None,
        "determinism": determinism,
    }
    if device.startswith("cuda"):  # the GPU actually used, its driver, libraries and flags (run/devices.py)
        from carlos_audit.run.devices import cuda_details

        env.update(cuda_details(device))
    if fastpath is not None:
        env["fastpath"] = fastpath
    return env


def git_commit() -> str | None:
    """The commit of the tool's own source tree, when it runs from a git checkout."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parents[2]
    if not (here / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
