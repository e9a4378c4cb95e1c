"""The environment lock of a kit, and what differs between two environments.

The lock is every installed distribution with its version, from ``importlib.metadata`` (the
``pip freeze`` view, without asking pip), one ``name==version`` line each, sorted by name.

``install_lock()`` names the lock ``make setup`` installs from (``requirements.lock`` of a
checkout: exact versions with their sha256) by its sha256, and says whether the installed
versions are the locked ones; the kit records it (kit.json ``environment.install_lock``).
"""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

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
            out[normalise(name)] = (version.split() or [""])[0]  # "1.0 \\" of a hashed lock: the version
    return out


#: the lock `make setup` installs from, at the top of a checkout (README "A locked environment")
INSTALL_LOCK = "requirements.lock"


def install_lock(root: Path | None = None) -> dict | None:
    """The install lock of the checkout this package runs from (``root``: that checkout's top):
    {file, sha256, matches, differing}: ``differing`` lists each locked distribution whose
    installed version is another (or none). None where there is no lock (a wheel install)."""
    from carlos_audit.hashing import sha256_file

    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    path = root / INSTALL_LOCK
    if not path.is_file():
        return None
    pinned, installed = parse_lock(path.read_text("utf-8")), installed_distributions()
    differing = [f"{name} {version} locked, {installed.get(name) or 'none'} installed"
                 for name, version in pinned.items() if installed.get(name) != version]
    return {"file": INSTALL_LOCK, "sha256": sha256_file(path), "matches": not differing, "differing": differing}


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
