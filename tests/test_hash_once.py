"""Model files hashed once (models/filehash.py): a second look reads no model file, a touched
file is read again, verify and --rehash read everything (issue 24)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import write_case

from carlos_audit.hashing import sha256_file
from carlos_audit.models import filehash
from carlos_audit.models.loading import resolve_base_source
from carlos_audit.casefolder.unit_store import hash_inputs

WATCHED: list = []  # [(folder, [opened paths])] while a test counts
_HOOKED = []


def _audit(event, args):
    if event == "open" and WATCHED and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.path.realpath(os.fsdecode(args[0]))
        for folder, opened in WATCHED:
            if p.startswith(folder + os.sep):
                opened.append(p)


class _Opened(list):
    """Opened paths; ``hashed()``: without model_index.json, which the loader reads to check the
    folder's weights (a read that is not hashing)."""

    def hashed(self) -> list:
        return [p for p in self if not p.endswith("model_index.json")]


@pytest.fixture
def opens():
    """Count the opens of files under a folder (a Python audit hook: every open() and os.open())."""
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED.append(True)

    def watch(folder: Path) -> list:
        opened = _Opened()
        WATCHED[:] = [(os.path.realpath(folder), opened)]
        return opened

    yield watch
    WATCHED.clear()


@pytest.fixture
def model_copy(carlos_home, tmp_path) -> Path:
    from carlos_audit.models.tiny import ensure_tiny_sd

    dst = tmp_path / "tiny-sd-copy"
    shutil.copytree(ensure_tiny_sd(), dst)
    return dst


def _n_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def test_a_second_look_reads_no_model_file_and_a_touched_file_is_read_again(model_copy, opens):
    first = opens(model_copy)
    src = resolve_base_source(str(model_copy))
    n = _n_files(model_copy)
    assert len(set(first.hashed())) == n - 1 and any(p.endswith("model_index.json") for p in first)
    assert {f["name"]: f["sha256"] for f in src.files}["unet/config.json"] == sha256_file(model_copy / "unet/config.json")

    second = opens(model_copy)
    again = resolve_base_source(str(model_copy))
    inputs = hash_inputs([{"role": "base_model", "path": str(model_copy)}])
    assert second.hashed() == [] and again.sha256 == src.sha256 == inputs[0]["sha256"]

    cfg = model_copy / "unet" / "config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, same bytes
    third = opens(model_copy)
    assert resolve_base_source(str(model_copy)).sha256 == src.sha256
    assert third.hashed() == [str(cfg.resolve())]

    cfg.write_text(cfg.read_text().replace("{", "{\n", 1))  # changed: read again, another hash
    fourth = opens(model_copy)
    assert resolve_base_source(str(model_copy)).sha256 != src.sha256 and fourth.hashed() == [str(cfg.resolve())]


def test_rehash_and_verify_read_every_model_file(model_copy, opens):
    resolve_base_source(str(model_copy))
    with filehash.rehashing():
        forced = opens(model_copy)
        resolve_base_source(str(model_copy))
        assert filehash.policy()["policy"] == "rehash"
    assert len(set(forced)) == _n_files(model_copy)
    assert filehash.policy()["policy"] == "stat-cache"


def test_evidence_files_are_always_hashed_afresh(tmp_path, opens):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"not really a lora")
    hash_inputs([{"role": "lora", "path": str(lora)}])
    seen = opens(tmp_path)
    hash_inputs([{"role": "lora", "path": str(lora)}])
    assert seen == [str(lora.resolve())]


def test_the_manifest_records_the_policy_and_verify_rehashes(lite_assets, carlos_home, tmp_path, opens):
    from carlos_audit.case.casefile import load_case
    from carlos_audit.fileio import read_json
    from carlos_audit.models.tiny import ensure_tiny_sd
    from carlos_audit.pipeline import run_case
    from carlos_audit.verify import verify_case

    cf = write_case(tmp_path, lite_assets, case_id="hashing", seeds="{ count = 1, start = 0 }", prompts="builtin:demo")
    out = tmp_path / "out"
    run_case(load_case(cf), out, progress=False)
    m = read_json(out / "manifest.json")
    assert m["base_model"]["hashing"]["policy"] == "stat-cache"
    seen = opens(ensure_tiny_sd())
    verify_case(out, sample=1)
    weights = [p for p in set(seen) if p.endswith(".safetensors")]
    assert len(weights) == len(list(ensure_tiny_sd().rglob("*.safetensors")))
