"""A run binds its inputs (issue 33, items 1, 6 and 8): a resume with another LoRA or an edited
prompt file is refused in one line, --force starts over, verify checks every unit record's
bindings; an unreadable unit record is regenerated; stale temporary files are removed when the
lock is taken; report/sign take the case folder's lock, analyse/verify refuse a held folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import write_case

from carlos_audit.case.casefile import load_case
from carlos_audit.cli import main
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file
from carlos_audit.pipeline import run_case
from carlos_audit.run import profile as profile_mod
from carlos_audit.casefolder.lock import LOCK_NAME

PROMPTS = "a tabby cat sleeping on a windowsill\na bowl of fruit on a table\na lighthouse at dusk\na red bicycle\n"


class _StopAt:
    """generate_batch that raises KeyboardInterrupt (as Ctrl-C or a kill would end the run) on
    its k-th call, before generating; counts the calls."""

    def __init__(self, real, stop_at: int | None = None):
        self.real, self.stop_at, self.calls = real, stop_at, 0

    def __call__(self, pipe, prompts, seeds, params):
        if self.stop_at is not None and self.calls + 1 == self.stop_at:
            raise KeyboardInterrupt
        self.calls += 1
        return self.real(pipe, prompts, seeds, params)


@pytest.fixture
def no_base_cache(monkeypatch):
    monkeypatch.setattr(profile_mod.BaseImageCache, "get", lambda self, key, n: None)


def _interrupted(case_file, out, monkeypatch, stop_at: int = 4):
    """Run the case and stop it on generation call ``stop_at``: with 2 units per arm, call 4 stops
    after the base arm and the first LoRA unit. Returns the unit records written."""
    real = profile_mod.generate_batch
    monkeypatch.setattr(profile_mod, "generate_batch", _StopAt(real, stop_at))
    with pytest.raises(KeyboardInterrupt):
        run_case(load_case(case_file), out, progress=False)
    monkeypatch.setattr(profile_mod, "generate_batch", real)
    return sorted(p.relative_to(out).as_posix() for p in (out / "units").rglob("b*.json"))


def _resume(case_file, out, *flags):
    r = CliRunner().invoke(main, ["run", str(case_file), "--out", str(out), "--no-progress", *flags])
    return r, [ln for ln in r.output.splitlines() if ln.strip()]


def test_a_resume_with_the_lora_file_swapped_is_refused_and_force_starts_over(lite_assets, tmp_path, monkeypatch,
                                                                              no_base_cache):
    lora = tmp_path / "evidence.safetensors"
    shutil.copy(lite_assets["loras"]["target"], lora)
    cf = write_case(tmp_path, lite_assets, lora=str(lora), seeds="[0]", case_id="swap")
    out = tmp_path / "out"
    units = _interrupted(cf, out, monkeypatch)
    assert units == ["units/base/b00000.json", "units/base/b00001.json", "units/lora/b00000.json"]
    old = sha256_file(lora)
    assert read_json(out / "inputs.json")["inputs"]["lora"] == old
    shutil.copy(lite_assets["loras"]["strong"], lora)  # the file replaced between the kill and the resume
    new = sha256_file(lora)

    r, lines = _resume(cf, out)
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"Error: refusing to resume {out}: its units were made from other inputs (lora: sha256 {old[:12]}")
    assert f"{new[:12]}… now" in lines[0] and "--force" in lines[0]
    assert sorted(p.relative_to(out).as_posix() for p in (out / "units").rglob("b*.json")) == units  # nothing generated
    assert not (out / "manifest.json").exists()

    res = run_case(load_case(cf), out, progress=False, force=True)  # --force: the run starts over
    assert res.manifest.lora["sha256"] == new and res.manifest.custody_ok
    assert read_json(out / "inputs.json")["inputs"]["lora"] == new
    made = [read_json(p)["inputs"] for p in sorted((out / "units" / "lora").glob("b*.json"))]
    assert len(made) == 2 and {m["lora_sha256"] for m in made} == {new}
    base = [read_json(p)["inputs"] for p in sorted((out / "units" / "base").glob("b*.json"))]
    assert {m["lora_sha256"] for m in base} == {None}
    assert {m["prompts_sha256"] for m in made + base} == {res.manifest.protocol.prompts_sha256}
    assert {m["base_model_sha256"] for m in made + base} == {res.manifest.base_model.sha256}

    # verify checks every unit record (not a sample): one unit made from another prompt fails, named
    r = CliRunner().invoke(main, ["verify", str(out), "--sample", "0"])
    assert r.exit_code == 0 and "unit records bound to the inputs" in r.output, r.output
    rec_path = out / "units" / "lora" / "b00001.json"
    rec = read_json(rec_path)
    rec["pairs"][1]["prompt"] = "a red sports car on a racetrack, tgtstyle"
    rec_path.write_text(json.dumps(rec))
    r = CliRunner().invoke(main, ["verify", str(out), "--sample", "0"])
    assert r.exit_code != 0 and "lora/b00001 (prompt of p006_s0)" in r.output, r.output
    rec["pairs"][1]["prompt"] = read_json(out / "manifest.json")["pairs"][5]["arms"]["lora"]["prompt"]
    rec["inputs"]["lora_sha256"] = old  # a unit claiming the old LoRA
    rec_path.write_text(json.dumps(rec))
    r = CliRunner().invoke(main, ["verify", str(out), "--sample", "0"])
    assert r.exit_code != 0 and "lora/b00001 (lora_sha256)" in r.output, r.output


def test_a_resume_with_the_prompt_file_edited_is_refused(lite_assets, tmp_path, monkeypatch, no_base_cache):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    cf = write_case(tmp_path, lite_assets, prompts=str(prompts), seeds="[0, 1]", case_id="edited")
    out = tmp_path / "out"
    units = _interrupted(cf, out, monkeypatch)
    assert units == ["units/base/b00000.json", "units/base/b00001.json", "units/lora/b00000.json"]
    prompts.write_text(PROMPTS.replace("a tabby cat sleeping on a windowsill", "a red sports car on a racetrack"))
    r, lines = _resume(cf, out)
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"Error: refusing to resume {out}: its units were made from other inputs (prompts: sha256 ")
    assert "(and 1 more)" in lines[0] and "--force" in lines[0]  # the prompt set's hash differs too
    assert sorted(p.relative_to(out).as_posix() for p in (out / "units").rglob("b*.json")) == units


def test_a_truncated_unit_record_is_regenerated_and_stale_temporaries_removed(lite_assets, tmp_path, monkeypatch,
                                                                              no_base_cache, capfd):
    cf = write_case(tmp_path, lite_assets, seeds="[0]", case_id="truncated")
    out = tmp_path / "out"
    _interrupted(cf, out, monkeypatch)
    unit = out / "units" / "lora" / "b00000.json"
    unit.write_bytes(unit.read_bytes()[:40])  # a unit record cut short
    stale = [out / ".manifest.json.k2j4_x9a.tmp", out / "units" / "lora" / ".b00001.json.abcd1234.tmp",
             out / "images" / "lora" / ".p001_s0.png.0a1b2c3d.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    foreign = out / ".notes.txt.abcd1234.tmp"  # not one of the case folder's files: left alone
    foreign.write_bytes(b"mine")
    capfd.readouterr()
    counted = _StopAt(profile_mod.generate_batch)
    monkeypatch.setattr(profile_mod, "generate_batch", counted)
    res = run_case(load_case(cf), out, progress=False, force=False)
    err = capfd.readouterr().err
    stats = res.manifest.run["stats"]
    assert stats["base"]["skipped_batches"] == 2 and stats["lora"]["generated_batches"] == 2  # the unreadable unit too
    assert counted.calls == sum(a["generated_batches"] for a in stats.values())
    notes = [ln for ln in err.splitlines() if "unreadable" in ln]
    assert notes == [f"Note: unit record {unit} is unreadable (truncated?); the unit counts as not done and is generated again"]
    assert read_json(unit)["arm"] == "lora" and res.manifest.custody_ok and len(res.manifest.pairs) == 8
    assert not any(p.exists() for p in stale) and foreign.read_bytes() == b"mine"


def test_commands_that_write_take_the_lock_and_readers_refuse_a_held_folder(tmp_path):
    folder = tmp_path / "case"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (folder / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                    "started_utc": "2026-01-02T03:04:05Z"}))
        for args in (["report", str(folder)], ["analyse", str(folder)], ["verify", str(folder), "--sample", "0"],
                     ["sign", str(folder), "--key", str(tmp_path / "k.pem"), "--cert", str(tmp_path / "c.pem")]):
            r = CliRunner().invoke(main, args)
            lines = [ln for ln in r.output.splitlines() if ln.strip()]
            assert r.exit_code == 1 and len(lines) == 1, (args, r.output)
            assert lines[0].startswith(f"Error: case folder {folder} is being written by another run (pid {holder.pid}"), r.output
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid  # the holder's lock stays
    finally:
        holder.kill()
        holder.wait()
    # the holder gone: report takes the lock (and gives it back), refusing the unfinished folder in one line
    r = CliRunner().invoke(main, ["report", str(folder)])
    assert r.exit_code != 0 and "Traceback" not in r.output and not (folder / LOCK_NAME).exists()
    assert os.listdir(folder) == []
