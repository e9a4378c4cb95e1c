"""The case-folder lock (casefolder/lock.py): a second run on a folder in use is refused, naming the holder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import write_case

from carlos_audit.cli import main
from carlos_audit.errors import AuditError
from carlos_audit.casefolder.lock import LOCK_NAME, case_lock


def _hold(folder, pid: int, host: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "started_utc": "2026-01-02T03:04:05Z"}))


def test_a_held_folder_is_refused_and_the_holder_named(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold(tmp_path / "case", sleeper.pid)
        with pytest.raises(AuditError, match=rf"pid {sleeper.pid} on host {socket.gethostname()}, since 2026-01-02T03:04:05Z"):
            with case_lock(tmp_path / "case"):
                pass
        assert (tmp_path / "case" / LOCK_NAME).is_file()  # the holder's lock is left alone
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _hold(tmp_path / "case", dead.pid)
    with case_lock(tmp_path / "case"):
        held = json.loads((tmp_path / "case" / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid()
        # no process-global state: a second taking in the same (live) process is refused like any
        # other holder, and the first holder's lock stays
        with pytest.raises(AuditError, match=rf"pid {os.getpid()} on host"):
            with case_lock(tmp_path / "case"):
                pass
        assert json.loads((tmp_path / "case" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "case" / LOCK_NAME).exists()
    _hold(tmp_path / "other", dead.pid, host="elsewhere")  # another host's lock is never guessed stale
    with pytest.raises(AuditError, match="on host elsewhere"):
        with case_lock(tmp_path / "other"):
            pass


def test_a_second_run_says_who_holds_the_folder(demo_assets, tmp_path):
    cf = write_case(tmp_path, demo_assets, case_id="locked")
    _hold(tmp_path / "out", os.getppid())
    r = CliRunner().invoke(main, ["run", str(cf), "--out", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 1 and r.output.startswith("Error: case folder") and f"pid {os.getppid()}" in r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_NAME]


def test_a_corpus_build_into_a_held_folder_is_refused_before_any_work(demo_assets, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(demo_assets["loras"]["target"], loras / "target.safetensors")
    template = write_case(tmp_path, demo_assets, case_id="tmpl")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold(tmp_path / "corpus", sleeper.pid)
        r = CliRunner().invoke(main, ["corpus", "build", str(loras), "--casefile", str(template),
                                      str(tmp_path / "corpus"), "--no-progress"])
    finally:
        sleeper.kill()
        sleeper.wait()
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith("Error: corpus folder") and f"pid {sleeper.pid}" in lines[0]
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == [LOCK_NAME]  # nothing planned or written
