"""One case on N devices (issue 24): 2 CPU worker processes write the same case folder, file for
file, as 1 worker, each with the thread count of the process that started them."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import write_case

from carlos_audit.case.casefile import load_case
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file
from carlos_audit.run.devices_run import parse_devices, run_units_on_devices
from carlos_audit.pipeline import run_case


def _files(case_dir):
    out = {p.relative_to(case_dir).as_posix(): sha256_file(p) for p in sorted(case_dir.rglob("*"))
           if p.is_file() and p.name not in ("run.json", "manifest.json", "manifest.json.sha256", ".lock")}
    m = read_json(case_dir / "manifest.json")
    m.pop("run")
    return out, m


@pytest.mark.slow
def test_two_workers_write_what_one_worker_writes(lite_assets, carlos_home, tmp_path):
    cf = write_case(tmp_path, lite_assets, case_id="devices", seeds="{ count = 1, start = 0 }", steps=2)
    results = {}
    for n in (1, 2):
        shutil.rmtree(carlos_home / "base-cache", ignore_errors=True)
        out = tmp_path / f"w{n}"
        workers = run_units_on_devices(load_case(cf), out, ["cpu"] * n)
        assert len(workers) == n and all(w["torch_threads"] == torch.get_num_threads() for w in workers)
        assert len({w["pid"] for w in workers}) == n and sum(w["units"] for w in workers) == len(
            list((out / "units").rglob("*.json")))
        run_case(load_case(cf), out, progress=False)
        m = read_json(out / "manifest.json")
        assert m["run"]["stats"] and all(s["generated_batches"] == 0 for s in m["run"]["stats"].values())
        results[n] = _files(out)
    assert results[2][0] == results[1][0]  # every file's sha256
    assert results[2][1] == results[1][1] | {"case": results[2][1]["case"]}


def test_devices_are_one_class():
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    with pytest.raises(AuditError, match="mixes device classes"):
        parse_devices("cpu,cuda:0")
    with pytest.raises(AuditError, match="cpu or cuda:N"):
        parse_devices("tpu:0")
