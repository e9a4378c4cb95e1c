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


def apply_determinism(device: str) -> dict:
    """Settings that make repeated runs bit-exact on the same software and hardware."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return {
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
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "determinism": determinism,
    }
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
