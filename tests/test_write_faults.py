"""A full disk, a read-only folder, a permission error during a run: one line, no half-written
unit, and the same command resumes to the same bytes (issue 24)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_case

from carlos_audit.case.casefile import load_case
from carlos_audit.errors import WriteFault
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file
from carlos_audit.pipeline import run_case

SEEDS = "{ count = 1, start = 0 }"  # 8 pairs, 2 batches per arm


def _files(case_dir: Path) -> dict[str, str]:
    return {p.relative_to(case_dir).as_posix(): sha256_file(p) for p in sorted(case_dir.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "manifest.json.sha256", "run.json")
            and not p.relative_to(case_dir).as_posix().startswith(("report", "figures"))}


def _same_bytes(got: dict, want: dict, case_dir: Path, ref_dir: Path) -> None:
    """Every file of ``want`` with the same bytes; a unit record may differ only in where its
    bytes came from (``source``, ``cost``: a base batch written to the base-image cache before the
    fault is taken from it on resume), and the run record (units/generation.json) only in its batch
    counts (``stats``, as the manifest's run.stats)."""
    for rel, digest in want.items():
        if rel == "units/generation.json" and got.get(rel) != digest:  # the run record: only its batch counts differ
            again, first = read_json(case_dir / rel), read_json(ref_dir / rel)
            assert {k: v for k, v in again.items() if k != "stats"} == {k: v for k, v in first.items() if k != "stats"}, rel
            continue
        if rel.startswith("units/") and got.get(rel) != digest:
            rec = read_json(case_dir / rel)
            assert rec.pop("source") == "base-cache" and rec.pop("cost")["images_generated"] == 0, rel
            continue
        assert got.get(rel) == digest, rel


def _no_half_written_unit(case_dir: Path) -> None:
    """No temp file left, and every unit with a record has every file it names, intact."""
    assert not list(case_dir.rglob(".*.tmp"))
    for rec_path in (case_dir / "units").rglob("*.json") if (case_dir / "units").is_dir() else ():
        for e in read_json(rec_path)["pairs"]:
            assert sha256_file(case_dir / e["image"]) == e["image_sha256"]
            assert sha256_file(case_dir / e["embedding"]) == e["embedding_sha256"]


@pytest.fixture(scope="module")
def reference(lite_assets, carlos_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    cf = write_case(tmp, lite_assets, case_id="faults", seeds=SEEDS)
    shutil.rmtree(carlos_home / "base-cache", ignore_errors=True)
    out = tmp / "ref"
    run_case(load_case(cf), out, progress=False)
    return cf, out


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_write_fault_is_one_line_and_the_run_resumes_bit_exact(reference, carlos_home, tmp_path, monkeypatch, code):
    cf, ref = reference
    shutil.rmtree(carlos_home / "base-cache", ignore_errors=True)
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):  # the 9th durable write fails, as a full or read-only disk makes it
        calls.append(fd)
        if len(calls) == 9:
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    out = tmp_path / "case"
    with pytest.raises(WriteFault) as info:
        run_case(load_case(cf), out, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and errno.errorcode[code] in msg and "run the same command again" in msg
    assert not (out / "metrics.json").exists()
    _no_half_written_unit(out)
    monkeypatch.setattr(os, "fsync", real_fsync)
    run_case(load_case(cf), out, progress=False)
    _same_bytes(_files(out), _files(ref), out, ref)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_tmpfs_is_one_line_and_resumes_bit_exact(reference, carlos_home, tmp_path):
    """The CLI run into a 400 KB tmpfs (the case needs about 1.3 MB): one line, exit 4, no
    traceback; the tmpfs enlarged, the same command resumes to the reference bytes."""
    cf, ref = reference
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "400k"):
        pytest.skip("this kernel refused a tmpfs mount")
    try:
        out = mnt / "case"
        cmd = [sys.executable, "-m", "carlos_audit.cli", "run", str(cf), "--out", str(out), "--no-progress"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        first = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert first.returncode == 4, first.stderr[-2000:]
        lines = [ln for ln in first.stderr.splitlines() if ln.startswith("Error:")]
        assert len(lines) == 1 and "ENOSPC" in lines[0] and "Traceback" not in first.stderr
        _no_half_written_unit(out)
        assert subprocess.run(["mount", "-o", "remount,size=50m", str(mnt)]).returncode == 0
        second = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert second.returncode == 0, second.stderr[-2000:]
        _same_bytes(_files(out), _files(ref), out, ref)  # the CLI also writes the report: not compared
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
