"""The environment lock of a kit, and what differs between two environments.

The lock is every installed distribution with its version, from ``importlib.metadata`` (the
``pip freeze`` view, without asking pip), one ``name==version`` line each, sorted by name.
"""

from __future__ import annotations

import importlib.metadata as md
import re

from carlos_audit.case.signature import BIT_ENVIRONMENT_FIELDS, BIT_PACKAGES

#: the run-time environment fields (manifest ``environment``) compared besides the packages
RUN_FIELDS = ("python", "machine", "platform", "device", "dtype", "torch_threads", "cuda", "gpu", "fastpath")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


#: fields and distributions whose difference can change generated images or features: the ones
#: of the reproducibility key (case/signature.py), the one definition of "same numbers"
NUMERIC_FIELDS = tuple(f for f in BIT_ENVIRONMENT_FIELDS if f != "packages")
NUMERIC_PACKAGES = tuple(normalise(p) for p in BIT_PACKAGES)


def installed_distributions() -> dict[str, str]:
    """{normalised name: version} of every installed distribution (first one found wins)."""
    out: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            out.setdefault(normalise(name), dist.version)
    return dict(sorted(out.items()))


def lock_text(dists: dict[str, str]) -> str:
    return "".join(f"{k}=={v}\n" for k, v in sorted(dists.items()))


def parse_lock(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[normalise(name)] = version.strip()
    return out


def diff_environment(then_lock: dict, now_lock: dict, then_run: dict, now_run: dict) -> list[dict]:
    """Every difference, one row each: {what, kit, here, numeric}. ``numeric`` says whether the
    difference can change the numbers (a package in NUMERIC_PACKAGES or a field in NUMERIC_FIELDS)."""
    rows = []
    for name in sorted(set(then_lock) | set(now_lock)):
        a, b = then_lock.get(name), now_lock.get(name)
        if a != b:
            rows.append({"what": f"package {name}", "kit": a, "here": b, "numeric": name in NUMERIC_PACKAGES})
    for key in RUN_FIELDS:
        a, b = then_run.get(key), now_run.get(key)
        if a != b:
            rows.append({"what": key, "kit": a, "here": b, "numeric": key in NUMERIC_FIELDS})
    return rows
