"""A locked environment (issue 33, item 10): `make setup` installs exact versions with hashes from
requirements.lock; pyproject.toml keeps its floors, which every locked version satisfies; the
kit's environment record names the lock by its sha256."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO
from packaging.requirements import Requirement

from carlos_audit.hashing import sha256_file
from carlos_audit.kit.envlock import INSTALL_LOCK, install_lock, normalise, parse_lock

LOCK = REPO / INSTALL_LOCK


def _entries() -> dict[str, list[str]]:
    """{name: [hashes]} of each requirement of the lock (its continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text("utf-8"))
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name = re.split(r"[=<>!~ ;\[]", line.strip(), 1)[0]
            out[normalise(name)] = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
            assert re.match(r"^[A-Za-z0-9_.-]+==[^ ]+ ", line), f"not an exact version: {line[:80]}"
    return out


def test_every_locked_distribution_is_exact_and_hashed():
    entries = _entries()
    assert len(entries) > 100
    assert [n for n, hashes in entries.items() if not hashes] == []
    pins = parse_lock(LOCK.read_text("utf-8"))
    assert set(pins) == set(entries)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_the_lock_satisfies_the_floors_and_covers_every_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = parse_lock(LOCK.read_text("utf-8"))
    wanted = project["dependencies"] + [r for extra in ("test", "ray") for r in project["optional-dependencies"][extra]]
    for spec in wanted:
        req = Requirement(spec)
        name = normalise(req.name)
        assert name in pins, f"{name} is not in {INSTALL_LOCK}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name} {pins[name]} does not satisfy {spec}"
    assert all(">=" in d or "==" in d for d in project["dependencies"])  # pyproject keeps floors, not the lock


def test_setup_installs_from_the_lock_with_hashes():
    make = (REPO / "Makefile").read_text()
    setup = make[make.index("$(STAMP):"):].split("\n\n")[0]
    assert "--require-hashes -r $(LOCK)" in setup and "LOCK   := requirements.lock" in make
    installs = [line for line in setup.splitlines() if "pip install" in line.replace("$(PIP)", "pip install")]
    assert all("--require-hashes" in line or "--no-deps" in line for line in installs), installs


def test_the_kit_names_the_lock_by_its_sha256():
    rec = install_lock(REPO)
    assert rec["file"] == INSTALL_LOCK and rec["sha256"] == sha256_file(LOCK)
    assert rec["matches"] == (rec["differing"] == [])
